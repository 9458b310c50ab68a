"""The console script and the Hydra entry script start, print help, and reject bad keys."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_version_and_help():
    from nemo_aot import __version__

    out = _run("-m", "nemo_aot.cli", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"nemo-aot {__version__}"
    out = _run("-m", "nemo_aot.cli", "--help")
    assert out.returncode == 0
    for command in ("demo", "train", "convert", "score", "launch"):
        assert command in out.stdout


def test_help_loads_no_megatron_nemo_or_hydra():
    """`nemo-aot --help` imports every command's module: they load the heavy stacks lazily."""
    code = ("import sys\n"
            "from nemo_aot.cli import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = ('megatron', 'nemo', 'hydra', 'omegaconf', 'transformers', 'matplotlib')\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
            "assert not bad, bad\n")
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr


def test_train_typo_fails_naming_the_key_before_any_model():
    out = _run("-m", "nemo_aot.cli", "train", "recipe=demo", "trainer.max_stepz=3")
    assert out.returncode == 2
    assert "trainer.max_stepz" in out.stderr and "trainer.max_steps" in out.stderr


def test_train_impossible_layout_fails_before_any_model():
    out = _run("-m", "nemo_aot.cli", "train", "recipe=demo",
               "parallel.tensor_model_parallel_size=3")
    assert out.returncode == 2 and "num_attention_heads" in out.stderr


def test_train_without_a_recipe_names_the_choices():
    out = _run("-m", "nemo_aot.cli", "train", "init_from=bundled:tiny_sft.nemo")
    assert out.returncode == 2 and "recipe=<OPTION>" in out.stderr
    assert "llama3_8b" in out.stderr and "recipe=base" in out.stderr


def test_hydra_script_composes_the_same_tree(tmp_path):
    out = _run(os.path.join(ROOT, "scripts", "train_gpt_aot.py"), "--cfg", "job",
               "recipe=demo", "alignment.beta=0.05", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "beta: 0.05" in out.stdout and "sort_scope:" in out.stdout

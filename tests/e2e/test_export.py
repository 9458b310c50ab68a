"""`nemo-aot export`: a .nemo from any complete training checkpoint, at any layout, equal to
the policy the run itself exported (read back through the independent HF conversion)."""

import os
import shutil

import pytest

from conftest import make_init_nemo, run_cli, train_args


def hf_weights(nemo, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / f"hf_{os.path.basename(str(nemo))}_{len(os.listdir(tmp_path))}"
    run_cli(["convert", "nemo-to-hf", "--nemo", str(nemo), "--out", str(out)])
    weights = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            weights.update(load_file(str(out / name)))
    assert weights
    return weights


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].equal(b[key]), key


@pytest.fixture(scope="module")
def single(small_data, init_nemo, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_single")
    run_cli(["train", *train_args(small_data, out, f"init_from={init_nemo}",
                                  "checkpoint.keep_last=5")])
    return out


def test_newest_checkpoint_equals_the_runs_own_export(single, tmp_path):
    assert (single / "config.yaml").exists()
    steps = sorted(os.listdir(single / "checkpoints"))
    assert steps == ["step_00000004", "step_00000008"]
    assert all((single / "checkpoints" / s / "config.yaml").exists() for s in steps)
    before = sorted(os.listdir(single / "checkpoints" / steps[-1]))
    proc = run_cli(["export", "--checkpoint", str(single), "--out",
                    str(tmp_path / "latest.nemo")])
    assert "step_00000008" in proc.stdout
    assert sorted(os.listdir(single / "checkpoints" / steps[-1])) == before  # read-only
    end = hf_weights(single / "aot_policy.nemo", tmp_path)
    assert_same(hf_weights(tmp_path / "latest.nemo", tmp_path), end)
    # An earlier step is another policy, and a step folder can be named directly.
    run_cli(["export", "--checkpoint", str(single / "checkpoints"), "--step", "4", "--out",
             str(tmp_path / "s4.nemo")])
    run_cli(["export", "--checkpoint", str(single / "checkpoints" / steps[0]), "--out",
             str(tmp_path / "d4.nemo")])
    s4, d4 = hf_weights(tmp_path / "s4.nemo", tmp_path), hf_weights(tmp_path / "d4.nemo", tmp_path)
    assert_same(s4, d4)
    assert any(not s4[k].equal(end[k]) for k in end)


# Multi-minute (a TP2 run and two multi-rank exports): make test-slow.
@pytest.mark.slow
def test_layouts_export_the_same_policy(single, small_data, init_nemo, tmp_path):
    """A TP2 run exported by one process, and the single-process run exported by two
    processes at TP2, give the runs' own .nemo files. The TP2 run's vocabulary (300) is padded
    to 512 rows in its checkpoint, to 384 by the one-process export."""
    (tmp_path / "init300").mkdir()
    init300 = make_init_nemo(tmp_path / "init300", vocab_size=300)
    tp2 = tmp_path / "tp2"
    run_cli(["train", *train_args(small_data, tp2, f"init_from={init300}",
                                  "parallel.tensor_model_parallel_size=2")], nproc=2)
    run_cli(["export", "--checkpoint", str(tp2), "--out", str(tmp_path / "tp2_in_one.nemo")])
    assert_same(hf_weights(tmp_path / "tp2_in_one.nemo", tmp_path),
                hf_weights(tp2 / "aot_policy.nemo", tmp_path))
    run_cli(["export", "--checkpoint", str(single), "--out", str(tmp_path / "one_in_tp2.nemo"),
             "parallel.tensor_model_parallel_size=2"], nproc=2)
    assert_same(hf_weights(tmp_path / "one_in_tp2.nemo", tmp_path),
                hf_weights(single / "aot_policy.nemo", tmp_path))


def test_bad_requests_name_what_to_do(single, tmp_path):
    out = str(tmp_path / "x.nemo")
    proc = run_cli(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", out],
                   check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli(["export", "--checkpoint", str(single), "--step", "5", "--out", out],
                   check=False)
    assert proc.returncode == 2 and "complete steps: [4, 8]" in proc.stderr
    proc = run_cli(["export", "--checkpoint", str(single), "--out", out, "parallel.nope=1"],
                   check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr
    # A checkpoint that carries no config: the run's config.yaml is accepted instead.
    bare = tmp_path / "bare"
    shutil.copytree(single / "checkpoints" / "step_00000008", bare)
    os.remove(bare / "config.yaml")
    proc = run_cli(["export", "--checkpoint", str(bare), "--out", out], check=False)
    assert proc.returncode == 2 and "--config" in proc.stderr
    run_cli(["export", "--checkpoint", str(bare), "--config", str(single / "config.yaml"), "--out",
             str(tmp_path / "x.nemo")])
    assert_same(hf_weights(tmp_path / "x.nemo", tmp_path),
                hf_weights(single / "aot_policy.nemo", tmp_path))
    assert not os.path.exists(tmp_path / "nowhere")

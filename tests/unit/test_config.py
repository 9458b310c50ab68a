"""Every YAML under conf/ composes and validates; typos and impossible layouts fail early,
naming the key; the cross-section rules of AOTConfig.validate hold."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from config_stubs import DEMO_WITHOUT_CHECKPOINT, config_only_nemo, model_group
from nemo_aot.algorithms.config import (
    AOTConfig,
    compose_raw,
    config_hash,
    find_config_dir,
    required_keys,
    to_yaml,
)
from nemo_aot.algorithms.resolve import World, compose_config, resolve_config, resolve_stored
from nemo_aot.data.config import DataConfig

CONF = find_config_dir()
TOP_LEVEL = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{CONF}/*.yaml"))
GROUP_OPTIONS = sorted(os.path.relpath(p, CONF)[:-len(".yaml")]
                       for p in glob.glob(f"{CONF}/*/*.yaml"))
DEMO = DEMO_WITHOUT_CHECKPOINT
# Group options are composed on top of it; parallel layouts need a model they divide
# (llama3_70b: 64 heads, 8 KV groups, 80 layers).
CONTEXT = {"parallel": ["model=llama3_70b"],
           # expert-parallel layouts need a mixture-of-experts model (128 experts, 48 layers)
           "parallel/ep8_pp2": ["model=qwen3_30b_a3b"]}


def compose(*overrides, world_size=None):
    return compose_config("gpt_aot", [*DEMO, *overrides], world_size=world_size)


def _fill_required(config_name, overrides, root):
    """Overrides giving values to the keys a config marks ${required:...}: init_from gets a
    config-only .nemo of the config's own model section."""
    from nemo_aot.models.config import GPTModelConfig

    raw = compose_raw(config_name, overrides)
    required = required_keys(raw)
    model = GPTModelConfig.from_dict(OmegaConf.to_container(raw.model, resolve=True))

    def value(key):
        if key == "init_from":
            return config_only_nemo(model, root)
        return "null" if "validation" in key else "placeholder"

    return required, [f"{key}={value(key)}" for key in required]


def _compose_all(config_name, overrides, root):
    required, fills = _fill_required(config_name, overrides, root)
    if required:  # without values the config must refuse, naming every key
        with pytest.raises(ValueError) as err:
            compose_config(config_name, overrides)
        assert all(key in str(err.value) for key in required)
    return compose_config(config_name, overrides + fills)


def test_discovery_finds_the_shipped_configs():
    assert "gpt_aot" in TOP_LEVEL
    for option in ("model/tiny", "model/llama3_8b", "model/llama3_70b", "parallel/tp2",
                   "recipe/demo", "recipe/llama3_8b", "recipe/llama3_70b", "recipe/paper"):
        assert option in GROUP_OPTIONS


@pytest.mark.parametrize("config_name", TOP_LEVEL)
def test_top_level_config_composes(config_name, tmp_path):
    assert isinstance(_compose_all(config_name, ["recipe=demo"], tmp_path), AOTConfig)


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_group_option_composes(option, tmp_path):
    group, name = option.split("/")
    base = [] if group == "recipe" else DEMO
    # resolved for its planned world (trainer.num_nodes x trainer.devices, when set)
    context = CONTEXT.get(f"{group}/{name}", CONTEXT.get(group, []))
    _compose_all("gpt_aot", base + context + [f"{group}={name}"], tmp_path)


def test_train_needs_a_recipe():
    with pytest.raises(ValueError, match=r"(?s)recipe.*llama3_8b.*recipe=base"):
        compose_config("gpt_aot", ["init_from=bundled:tiny_sft.nemo"])


def test_demo_recipe_is_the_embedded_demo():
    cfg = compose_config("gpt_aot", ["recipe=demo"])
    assert cfg.model.num_layers == 2 and cfg.model.vocab_size == 512
    assert cfg.precision.precision == "fp32" and cfg.data.train_path.startswith("bundled:")
    assert 10 <= cfg.trainer.max_steps <= 100
    assert cfg.init_from == "bundled:tiny_sft.nemo"  # the packaged SFT policy
    assert cfg.data.tokenizer_path is None  # the tokenizer stored in it
    from nemo_aot.data.config import resolve_path

    assert os.path.isfile(resolve_path(cfg.init_from))
    resolve_config(AOTConfig(data=DataConfig(tokenizer_path="bundled:tokenizer")),
                   world=World(1))


def test_base_recipe_is_the_schema_defaults_on_your_data(tmp_path):
    cfg = _compose_all("gpt_aot", ["recipe=base"], tmp_path)
    defaults = AOTConfig()
    assert (cfg.optim, cfg.trainer, cfg.alignment, cfg.precision) == \
        (defaults.optim, defaults.trainer, defaults.alignment, defaults.precision)
    assert cfg.data.format == "trl_paired" and cfg.data.tokenizer_path is None


def test_recipes_lay_out_their_clusters(tmp_path):
    def recipe(name):
        return _compose_all("gpt_aot", [f"recipe={name}"], tmp_path)

@pytest.mark.parametrize("override, key, suggestion", [
    ("trainer.max_stepz=3", "trainer.max_stepz", "trainer.max_steps"),
    ("trainr.max_steps=3", "trainr", "trainer"),
    ("optim.learning_rate=1e-3", "optim.learning_rate", None),
    ("alignment.sort_scop=global", "alignment.sort_scop", "alignment.sort_scope"),
    ("model.num_layer=4", "model.num_layer", "model.num_layers"),
])
def test_typo_key_fails_naming_it(override, key, suggestion):
    with pytest.raises(ValueError) as err:
        compose_raw("gpt_aot", [*DEMO, override])
    assert key in str(err.value)
    if suggestion:
        assert f"Did you mean {suggestion}" in str(err.value)


def test_typo_in_a_yaml_file_fails_naming_it(tmp_path):
    shutil.copytree(CONF, tmp_path / "conf")
    with open(tmp_path / "conf" / "model" / "llama3_8b.yaml", "a") as f:
        f.write("rotary_bse: 10000.0\n")
    with pytest.raises(ValueError, match=r"model.rotary_bse.*Did you mean model.rotary_base"):
        compose_config("gpt_aot", [*DEMO, "model=llama3_8b"], config_dir=str(tmp_path / "conf"))


def test_wrong_type_and_unknown_option_fail():
    with pytest.raises(ValueError, match="trainer.max_steps"):
        compose("trainer.max_steps=abc")
    with pytest.raises(ValueError, match="model/llama3_9b"):
        compose("model=llama3_9b")


@pytest.mark.parametrize("overrides, world_size, match", [
    (["parallel.tensor_model_parallel_size=3"], None, "num_attention_heads"),
    (["parallel=tp2"], 3, "not divisible"),
    (["parallel.pipeline_model_parallel_size=4", "data.uniform_step_length=true"], None,
     "num_layers"),
    (["parallel.sequence_parallel=true"], None, "sequence_parallel"),
    (["parallel=pp2", "parallel.virtual_pipeline_model_parallel_size=2", "model.num_layers=4",
      "trainer.global_batch_size=12"], 2, "multiple of parallel.pipeline_model_parallel_size"),
    (["trainer.devices=4"], 2, "trainer.devices"),
])
def test_impossible_layout_fails_at_compose(overrides, world_size, match):
    with pytest.raises(ValueError, match=match):
        compose(*overrides, world_size=world_size)


def test_world_size_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3"):
        compose("parallel=tp2")


@pytest.mark.parametrize("overrides, world_size, match", [
    (["trainer.global_batch_size=16", "trainer.micro_batch_size=8"], 4, "global_batch_size"),
    (["trainer.global_batch_size=18"], None, "global_batch_size"),
    (["data.max_seq_length=512"], None, "data.max_seq_length"),
    (["alignment.loss_type=dpo", "alignment.sort_scope=global"], None, "sort_scope"),
    (["alignment.loss_type=aot_paired", "alignment.sort_scope=micro", "trainer.micro_batch_size=1"],
     None, "exactly DPO"),
    (["alignment.sort_scope=data_parallel", "trainer.micro_batch_size=1"], 1, "exactly DPO"),
    (["data=bundled_unpaired", "alignment.loss_type=aot_paired"], None,
     r"alignment.loss_type=aot_paired trains on paired data, but data.format=trl_unpaired gives "
     r"unpaired data; use alignment.loss_type=aot_unpaired"),
    (["data=bundled_unpaired", "trainer.micro_batch_size=1", "alignment.sort_scope=global"], None,
     "micro_batch_size must be >= 2"),
    (["parallel.pipeline_model_parallel_size=2"], None, "uniform_step_length"),
    (["parallel=tp2_sp", "data.pad_to_multiple_of=3"], None, "pad_to_multiple_of"),
    (["precision.precision=bf16", "precision.transformer_impl=transformer_engine",
      "precision.fp8=hybrid", "data.pad_to_multiple_of=8"], None, "multiple of 16"),
    (["precision.precision=bf16", "precision.transformer_impl=transformer_engine",
      "precision.fp8=hybrid", "precision.fp8_param=true", "data.pad_to_multiple_of=16"], None,
     "use_distributed_optimizer"),
    (["trainer.max_steps=null", "trainer.max_epochs=null"], None, "max_steps"),
    (["trainer.nonfinite=ignore"], None, "trainer.nonfinite"),
    (["trainer.grad_clip=-1"], None, "trainer.grad_clip"),
    (["optim.min_lr=1.0"], None, "optim.min_lr"),
    (["optim.lr_decay_style=step"], None, "optim.lr_decay_style"),
    (["checkpoint.keep_last=0"], None, "checkpoint.keep_last"),
    (["checkpoint.resume=maybe"], None, "checkpoint.resume"),
    (["logging.wandb_mode=cloud"], None, "logging.wandb_mode"),
    (["alignment.beta=0"], None, "alignment"),
    (["alignment.sft_loss_weight=-0.5"], None, r"alignment\.sft_loss_weight must be .* >= 0"),
    (["data.length_policy=cut"], None, "data.length_policy"),
])
def test_cross_field_rules(overrides, world_size, match):
    with pytest.raises(ValueError, match=match):
        compose(*overrides, world_size=world_size)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "aot_paired"])
def test_two_file_unpaired_data_refuse_a_paired_loss(loss_type):
    """data.format=auto with a negatives file is unpaired data: a paired loss would treat rows
    i and i + B/2 as pairs (it used to train, silently wrong)."""
    with pytest.raises(ValueError, match=rf"alignment.loss_type={loss_type} trains on paired "
                                         r"data, but data.train_negatives_path .* gives unpaired "
                                         r"data; use alignment.loss_type=aot_unpaired"):
        compose(f"alignment.loss_type={loss_type}", "alignment.sort_scope=micro",
                "data.train_path=bundled:unpaired/train.jsonl", "data.validation_path=null",
                "data.train_negatives_path=bundled:unpaired/train.jsonl")
    compose("alignment.loss_type=aot_unpaired", "data.train_path=bundled:unpaired/train.jsonl",
            "data.validation_path=null", "data.train_negatives_path=bundled:unpaired/train.jsonl")


def test_auto_detected_unpaired_records_refuse_a_paired_loss_when_read(tmp_path):
    """format=auto on one file: the first record decides the kind, checked where it is read,
    before any model is built, with the same message."""
    from nemo_aot.algorithms.resolve import World, resolve_run
    from nemo_aot.algorithms.run import build_data

    run = resolve_run([*DEMO, "alignment.loss_type=dpo", "alignment.sort_scope=micro",
                       "data.train_path=bundled:unpaired/train.jsonl", "data.validation_path=null",
                       "data.tokenizer_path=bundled:tokenizer"], world=World(1))
    assert run.data_kind is None
    with pytest.raises(ValueError, match=r"alignment.loss_type=dpo trains on paired data, but "
                                         r".*unpaired/train.jsonl \(trl_unpaired records, read "
                                         r"with data.format=auto\) gives unpaired data"):
        build_data(run, str(tmp_path), 0, 1)


def test_valid_variants_pass():
    compose("parallel=tp2_pp2", world_size=8)  # DP 2
    compose("alignment.loss_type=dpo", "alignment.sort_scope=micro")
    assert compose("alignment.sft_loss_weight=1").alignment.sft_loss_weight == 1.0
    compose("alignment.sort_scope=data_parallel", "trainer.micro_batch_size=1",
                               "trainer.global_batch_size=4", world_size=4)


def test_yaml_round_trip_and_hash(tmp_path):
    cfg = compose("model=llama3_1_8b", "data.max_seq_length=128")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = resolve_stored(str(path)).config
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert again.model.rope_scaling.factor == 8.0
    assert config_hash(compose("optim.lr=2e-3")) != config_hash(compose())
    path.write_text(to_yaml(cfg) + "extra_section: 1\n")
    with pytest.raises(ValueError, match="extra_section"):
        resolve_stored(str(path))


def test_conf_ships_inside_the_package():
    package_conf = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__import__("nemo_aot").__file__))), "nemo_aot", "conf")
    assert os.path.isfile(os.path.join(package_conf, "gpt_aot.yaml"))
    assert compose_config(config_dir=package_conf, overrides=DEMO) == compose()
    with pytest.raises(ValueError, match="not found"):
        find_config_dir("/nonexistent/conf")


def test_infrastructure_modules_do_not_import_megatron_or_nemo():
    code = ("import sys\n"
            "import nemo_aot.algorithms.config, nemo_aot.algorithms.checkpointing\n"
            "import nemo_aot.algorithms.signals, nemo_aot.algorithms.reporting\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('megatron', 'nemo', 'wandb')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_compose_inside_an_outer_hydra_keeps_its_state():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose("trainer.max_steps=3", "optim.warmup_steps=1")
        assert cfg.trainer.max_steps == 3 and GlobalHydra.instance().is_initialized()
    assert not GlobalHydra.instance().is_initialized()


def test_plain_dicts_are_checked_against_the_schema():
    from nemo_aot.algorithms.resolve import resolve_composed

    cfg = resolve_composed({"trainer": {"max_steps": 5}, "optim": {"warmup_steps": 1},
                         "precision": {"precision": "fp32"},
                         "data": {"tokenizer_path": "bundled:tokenizer"}}).config
    assert cfg.trainer.max_steps == 5 and cfg.model.num_query_groups == 2
    with pytest.raises(ValueError, match=r"optim.betas.*Known keys"):
        resolve_composed({"optim": {"betas": [0.9, 0.95]}})


@pytest.mark.parametrize("override, key, suggestion", [
    ("++alignment.betta=3", "alignment.betta", "alignment.beta"),
    ("+lora_rank=8", "lora_rank", None),
    ("++model.dpo.ref_policy_kl_penalty=0.1", "model.dpo", None),
    ("+trainer.max_stepz=3", "trainer.max_stepz", "trainer.max_steps"),
])
def test_added_keys_are_checked_against_the_schema(override, key, suggestion):
    """Hydra's + and ++ add keys a struct config lacks; nothing the schema lacks may pass."""
    with pytest.raises(ValueError) as err:
        compose(override)
    assert f"{key}: no such key" in str(err.value)
    if suggestion:
        assert f"Did you mean {suggestion}" in str(err.value)
    assert compose("++alignment.beta=3").alignment.beta == 3  # known keys may use them


def test_the_checkpoint_defines_the_architecture(tmp_path):
    """Layout rules run against init_from's model, not the recipe's model group: TP 8 divides
    an 8B checkpoint's heads even though the tiny default model has 4."""
    big = model_group("llama3_8b")
    nemo = config_only_nemo(big, tmp_path)
    cfg = compose(f"init_from={nemo}", "parallel.tensor_model_parallel_size=8", world_size=8)
    assert cfg.model == big and cfg.model.num_attention_heads == 32
    with pytest.raises(ValueError, match="num_attention_heads"):
        compose("parallel.tensor_model_parallel_size=8", world_size=8)  # the tiny model
    with pytest.raises(ValueError, match=r"model.num_layers=4 contradicts init_from"):
        compose(f"init_from={nemo}", "model.num_layers=4")
    assert compose(f"init_from={nemo}", "model.num_layers=32").model.num_layers == 32
    with pytest.raises(ValueError, match=r"init_from: .*nowhere.nemo does not exist"):
        compose(f"init_from={tmp_path}/nowhere.nemo")


def test_print_config_shows_the_checkpoint_architecture(tmp_path):
    nemo = config_only_nemo(model_group("llama3_8b"), tmp_path)
    out = subprocess.run([sys.executable, "-m", "nemo_aot.cli", "train", "--print-config",
                          "recipe=llama3_8b", f"init_from={nemo}", "data.train_path=t.jsonl",
                          "data.validation_path=null", "parallel.tensor_model_parallel_size=8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "num_layers: 32" in out.stdout and "tensor_model_parallel_size: 8" in out.stdout

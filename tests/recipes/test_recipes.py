"""The recipe tier: every file in conf/recipe/ trains end to end, through the launcher the sbatch
script runs, scaled down only where it must be to run on 2 CPU cores:

* model: the bundled tiny policy (``bundled:tiny_sft.nemo``) as ``init_from``, extracted into a
  folder (as large checkpoints are passed); a mixture-of-experts recipe instead trains a tiny
  random-init model of its own family (its router, top-k, query/key norms and router losses;
  4 experts of the tiny width) with the bundled tokenizer, since the bundled policy is dense;
* expert parallelism: capped at 2;
* layout and world size: TP and PP capped at 2, DP at 2, at most 4 gloo ranks; sequence
  parallelism kept where TP stays above 1; ``trainer.num_nodes x devices`` set to match;
* batch sizes: micro-batch capped at 2, at most 2 accumulation steps;
* sequence length: capped at the tiny model's 256;
* data: the bundled arithmetic set in the recipe's own format, sized so that one epoch is a few
  steps longer than the recipe's warmup (the data are the user's in production).

Everything else is the recipe's own: the epoch or step limit, warmup and LR schedule, loss,
surrogate, beta, sort scope, reference policy, precision, optimizer, checkpoint and validation
cadence, time budget. A recipe added to conf/recipe/ is covered without touching this file.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(os.path.basename(p)[:-len(".yaml")]
                 for p in glob.glob(os.path.join(ROOT, "conf", "recipe", "*.yaml")))
TINY = "bundled:tiny_sft.nemo"
MAX_RANKS, CAP_TP, CAP_PP, CAP_DP, CAP_MICRO, CAP_ACCUMULATION, CAP_SEQ = 4, 2, 2, 2, 2, 2, 256
EXTRA_STEPS = 4  # an epoch lasts the warmup plus this many steps


def _composed(recipe):
    """The recipe's raw config with its required keys filled (architecture: the tiny policy)."""
    from nemo_aot.algorithms.config import compose_raw, required_keys

    fills = {"init_from": TINY, "data.train_path": "x", "data.validation_path": "null",
             "data.train_negatives_path": "x", "data.validation_negatives_path": "null"}
    raw = compose_raw("gpt_aot", [f"recipe={recipe}"])
    keys = required_keys(raw)
    return compose_raw("gpt_aot", [f"recipe={recipe}", *(f"{k}={fills[k]}" for k in keys)]), keys


def scale_down(recipe, data_dir, out_dir):
    """(overrides, ranks, expected stop reason, expected steps) of ``recipe`` at test size."""
    raw, required = _composed(recipe)
    t, p = raw.trainer, raw.parallel
    tp = min(p.tensor_model_parallel_size, CAP_TP)
    pp = min(p.pipeline_model_parallel_size, CAP_PP)
    world = t.num_nodes * t.devices if t.devices else tp * pp
    dp = min(max(world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size), 1),
             CAP_DP)
    while tp * pp * dp > MAX_RANKS:
        dp -= 1
    micro = min(t.micro_batch_size, CAP_MICRO)
    accumulation = min(t.global_batch_size // (t.micro_batch_size * max(world // (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size), 1)), CAP_ACCUMULATION)
    gbs = micro * dp * max(accumulation, 1)
    ranks = tp * pp * dp
    ep = min(p.expert_model_parallel_size, 2)
    overrides = [
        f"recipe={recipe}", f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.expert_model_parallel_size={ep}",
        f"parallel.pipeline_model_parallel_size={pp}",
        "parallel.virtual_pipeline_model_parallel_size=null",
        f"parallel.sequence_parallel={str(bool(p.sequence_parallel and tp > 1)).lower()}",
        "trainer.num_nodes=1", f"trainer.devices={ranks if t.devices else 'null'}",
        f"trainer.micro_batch_size={micro}", f"trainer.global_batch_size={gbs}",
        f"data.max_seq_length={min(raw.data.max_seq_length, CAP_SEQ)}",
        f"logging.output_dir={out_dir}", "logging.progress_bar=false"]
    if raw.model.get("num_moe_experts") is not None:
        overrides += _tiny_moe(raw.model)
    elif "init_from" in required:  # as users pass a large checkpoint: an extracted folder
        tiny = _tiny_linear_attention(data_dir) if raw.model.get("linear_attention") else \
            _tiny_of_family(raw.model, data_dir)
        overrides.append(f"init_from={tiny}")
    steps_per_epoch = None
    if "data.train_path" in required:
        steps_per_epoch = raw.optim.warmup_steps + EXTRA_STEPS
        overrides += _data(raw.data.format, data_dir, gbs * steps_per_epoch, micro, dp)
    if t.max_epochs is None:
        return overrides, ranks, "max_steps", t.max_steps
    if steps_per_epoch is None:  # the recipe brings its own data (the demo)
        return overrides, ranks, None, t.max_steps
    epoch_steps = steps_per_epoch * t.max_epochs
    if t.max_steps is not None and t.max_steps < epoch_steps:
        return overrides, ranks, "max_steps", t.max_steps
    return overrides, ranks, "max_epochs", epoch_steps


def _tiny_moe(model):
    """A random-init MoE model of the recipe's family at the tiny policy's size."""
    return ["init_from=null", "data.tokenizer_path=bundled:tokenizer", "model.num_layers=2",
            "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.kv_channels=16", "model.vocab_size=512",
            "model.encoder_seq_length=256", "model.max_position_embeddings=256",
            "model.num_moe_experts=4", f"model.moe_router_topk={min(model.moe_router_topk, 2)}",
            "model.moe_ffn_hidden_size=32",
            *(["model.moe_shared_expert_intermediate_size=24"]
              if model.get("moe_shared_expert_intermediate_size") else []),
            *(TINY_LINEAR_ATTENTION if model.get("linear_attention") else [])]


# A hybrid (Gated DeltaNet) mixture-of-experts recipe: one GDN and one full-attention layer.
TINY_LINEAR_ATTENTION = ["model.linear_attention.full_attention_interval=2",
                         "model.linear_attention.key_head_dim=16",
                         "model.linear_attention.value_head_dim=8",
                         "model.linear_attention.num_key_heads=2",
                         "model.linear_attention.num_value_heads=4"]


def _extracted_tiny(data_dir):
    from nemo_aot.data.config import resolve_path
    from nemo_aot.models.nemo_format import extract_nemo

    return extract_nemo(resolve_path(TINY), str(data_dir / "tiny_sft"))


# Architecture keys that make a family (conversion/families): a recipe whose model sets any of
# them trains a tiny model with the same ones; window sizes shrink to act at the tiny lengths.
FAMILY_KEYS = ("qkv_bias", "qk_layernorm", "layernorm_zero_centered_gamma",
               "post_sublayer_norms", "scale_embeddings", "activation", "softmax_scale",
               "sliding_window", "window_attn_skip_freq", "rotary_base_local", "rope_scaling",
               "share_embeddings_and_output_weights")
TINY_WINDOW, TINY_SKIP_FREQ = 16, 2


def _tiny_of_family(model, data_dir):
    """The tiny policy's size with the recipe model's family options: the bundled tiny policy
    itself for a Llama-architecture recipe, else the same size freshly initialized with them
    (extracted .nemo folder)."""
    import dataclasses

    from omegaconf import OmegaConf

    from nemo_aot.models.config import GPTModelConfig
    from nemo_aot.models.nemo_format import read_nemo_config

    tiny = _extracted_tiny(data_dir)
    base, _ = read_nemo_config(tiny)
    values = OmegaConf.to_container(model, resolve=True)
    options = {k: values[k] for k in FAMILY_KEYS if k in values}
    changed = GPTModelConfig.from_dict({**base.to_dict(), **options})
    if changed == base:
        return tiny
    if changed.sliding_window is not None:
        changed = dataclasses.replace(changed, sliding_window=TINY_WINDOW, window_attn_skip_freq=(
            None if changed.window_attn_skip_freq is None else TINY_SKIP_FREQ))
    return _fresh_nemo(changed, tiny, data_dir / "tiny_family")


def _fresh_nemo(cfg, tiny_dir, out_dir):
    """A randomly initialized model of ``cfg`` with the tiny policy's tokenizer, extracted."""
    from nemo_aot.conversion.convert import single_process_world
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.nemo_format import TOKENIZER_DIR, extract_nemo, save_nemo

    path = str(data_dir_file(out_dir, "tiny_family.nemo"))
    with single_process_world():
        parallel = ParallelConfig()
        initialize_model_parallel(parallel, cfg)
        chunks = build_model_chunks(cfg, to_transformer_config(cfg, parallel, "fp32"))
        save_nemo(path, cfg, chunks, os.path.join(tiny_dir, TOKENIZER_DIR))
    return extract_nemo(path, str(out_dir / "extracted"))


def data_dir_file(directory, name):
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)


def _tiny_linear_attention(data_dir):
    """A recipe for a hybrid Gated DeltaNet model starts from a tiny random one of the same
    family (converted from transformers' Qwen3.5), extracted like the tiny policy."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))
    from test_conversion_families import save_hf
    from test_conversion_qwen35 import build_qwen35_hf

    from nemo_aot.conversion import hf_to_nemo
    from nemo_aot.models.nemo_format import extract_nemo

    nemo = str(data_dir / "tiny_qwen35.nemo")
    hf_to_nemo(save_hf(build_qwen35_hf(), data_dir / "tiny_qwen35_hf"), nemo, dtype="fp32")
    return extract_nemo(nemo, str(data_dir / "tiny_qwen35"))


def _bundled(kind, n):
    from nemo_aot.data.config import resolve_path

    with open(resolve_path(f"bundled:{kind}/train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) >= n, f"bundled {kind} data has {len(rows)} rows, the recipe needs {n}"
    with open(resolve_path(f"bundled:{kind}/validation.jsonl")) as f:
        return rows[:n], [json.loads(line) for line in f]


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _data(fmt, data_dir, samples, micro, dp):
    """Bundled data in ``fmt``: ``samples`` training pairs (or sequences, unpaired)."""
    if fmt in ("trl_paired", "nemo_dpo", "auto"):
        train, val = _bundled("paired", samples)
        if fmt == "nemo_dpo":
            train, val = ([{"prompt": r["prompt"], "chosen_response": r["chosen"],
                            "rejected_response": r["rejected"]} for r in rows]
                          for rows in (train, val))
        return [f"data.train_path={_write(data_dir / 'train.jsonl', train)}",
                f"data.validation_path={_write(data_dir / 'val.jsonl', val)}"]
    # Unpaired: the same share of positives in every micro-batch as in the data.
    rows, val = _bundled("unpaired", 2 * samples)
    positives = [r for r in rows if r["label"]][:samples // 2]
    negatives = [r for r in rows if not r["label"]][:samples - len(positives)]
    if fmt == "trl_unpaired":
        return [f"data.train_path={_write(data_dir / 'train.jsonl', positives + negatives)}",
                f"data.validation_path={_write(data_dir / 'val.jsonl', val)}"]
    strip = [{k: v for k, v in r.items() if k != "label"} for r in positives + negatives]
    vpos = [{k: v for k, v in r.items() if k != "label"} for r in val if r["label"]]
    vneg = [{k: v for k, v in r.items() if k != "label"} for r in val if not r["label"]]
    return [f"data.train_path={_write(data_dir / 'pos.jsonl', strip[:len(positives)])}",
            f"data.train_negatives_path={_write(data_dir / 'neg.jsonl', strip[len(positives):])}",
            f"data.validation_path={_write(data_dir / 'vpos.jsonl', vpos)}",
            f"data.validation_negatives_path={_write(data_dir / 'vneg.jsonl', vneg)}"]


def _launch(overrides, ranks, status):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "nemo_aot.launcher", "--status-file", str(status), "--", "train"]
    if ranks == 1:
        cmd = [sys.executable, *launcher, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", *launcher, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _records(out_dir, split):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


# The production-shape recipes scale down to 4-rank runs of a minute or more each on 2 cores: they
# run in make test-slow (CI runs it too); the demo, the paper's and the LoRA recipe stay here.
SLOW_RECIPES = {"llama3_8b", "llama3_70b", "qwen3_8b", "gemma3_27b", "qwen3_30b_a3b",
                "mixtral_8x7b", "qwen3_5_9b", "qwen3_5_35b_a3b"}


def test_the_slow_recipes_exist():
    assert SLOW_RECIPES <= set(RECIPES), sorted(SLOW_RECIPES - set(RECIPES))


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow)
                                    if r in SLOW_RECIPES else r for r in RECIPES])
def test_recipe_trains_end_to_end(recipe, tmp_path):
    from nemo_aot.algorithms.resolve import compose_config

    out = tmp_path / "run"
    overrides, ranks, reason, steps = scale_down(recipe, tmp_path, out)
    cfg = compose_config("gpt_aot", overrides, world_size=ranks)
    _launch(overrides, ranks, tmp_path / "status.txt")

    status = dict(line.split("=", 1) for line in (tmp_path / "status.txt").read_text().split())
    assert status["complete"] == "true", status
    assert reason is None or status["stop_reason"] == reason, status
    train = _records(out, "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    # Policy == reference before the first update: every reward is exactly zero.
    assert train[0]["rewards/chosen"] == 0.0 and train[0]["rewards/rejected"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in train)

    # The recipe's LR schedule over the run's real length: warmup to the peak, then decay that
    # reaches min_lr at the last step and not before.
    o, lrs = cfg.optim, [r["lr"] for r in train]
    if o.warmup_steps:
        assert lrs[o.warmup_steps - 1] == pytest.approx(o.lr, rel=1e-6)
        assert lrs[:o.warmup_steps] == sorted(lrs[:o.warmup_steps])
    if o.lr_decay_style == "constant":
        assert lrs[-1] == pytest.approx(o.lr, rel=1e-6)
    else:
        assert lrs[-1] == pytest.approx(o.min_lr, abs=1e-9 + 1e-6 * o.lr)
        assert min(lrs[o.warmup_steps:-1]) > o.min_lr + 1e-9 * o.lr

    val = _records(out, "validation")
    interval = cfg.trainer.val_check_interval
    if interval and cfg.data.validation_path:
        assert [r["step"] for r in val] == [0, *range(interval, steps + 1, interval)]
    assert os.path.isfile(out / "aot_policy.nemo")
    final = out / "checkpoints" / f"step_{steps:08d}"
    assert (final / "COMPLETE.json").exists() and (final / "tokenizer" / "tokenizer.json").exists()

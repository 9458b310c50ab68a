"""Mixture of experts before launch: config and layout checks name the key, the expert-parallel
groups the dry run prints are megatron-core's, the memory plan's parameter count equals the
built model's on every rank (experts split over EP and ETP), and the MoE recipes plan to fit."""

import atexit
import dataclasses
import shutil
import tempfile

import pytest

from config_stubs import config_only_nemo, model_group
from multirank import run_multirank
from nemo_aot import launcher
from nemo_aot.distributed.parallel import ParallelConfig
from nemo_aot.models.config import GPTModelConfig

MOE = GPTModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, vocab_size=256, make_vocab_size_divisible_by=8,
                     qk_layernorm=True, num_moe_experts=4, moe_router_topk=2,
                     moe_ffn_hidden_size=48)


@pytest.mark.parametrize("fields, key", [
    (dict(moe_router_topk=5), "moe_router_topk"),
    (dict(moe_router_score_function="relu"), "moe_router_score_function"),
    (dict(moe_token_dispatcher_type="flex"), "moe_token_dispatcher_type"),
    (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
    (dict(moe_shared_expert_gate=True), "moe_shared_expert_gate"),
    (dict(moe_router_score_function="sigmoid", moe_router_topk_normalize=False),
     "moe_router_topk_normalize"),
    (dict(num_moe_experts=None, moe_ffn_hidden_size=48), "moe_ffn_hidden_size"),
])
def test_model_checks_name_the_key(fields, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        dataclasses.replace(MOE, **fields).validate()


def test_shared_expert_with_gate_is_expressible():
    from nemo_aot.models.config import moe_transformer_kwargs

    cfg = dataclasses.replace(MOE, moe_shared_expert_intermediate_size=64,
                              moe_shared_expert_gate=True, moe_router_score_function="sigmoid")
    cfg.validate()
    kwargs = moe_transformer_kwargs(cfg)
    assert kwargs["moe_shared_expert_intermediate_size"] == 64
    assert kwargs["moe_shared_expert_gate"] and kwargs["moe_router_dtype"] == "fp32"


@pytest.mark.parametrize("parallel, world, key", [
    (ParallelConfig(expert_model_parallel_size=3), 3, "must divide model.num_moe_experts"),
    (ParallelConfig(expert_model_parallel_size=2), 3, "expert_model_parallel_size"),
    (ParallelConfig(2, expert_model_parallel_size=2), 4, "sequence_parallel must be true"),
    (ParallelConfig(expert_model_parallel_size=0), 2, "positive integer"),
])
def test_layout_checks_name_the_key(parallel, world, key):
    with pytest.raises(ValueError, match=key):
        parallel.validate(world, MOE)


def test_expert_parallelism_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="model has no experts"):
        ParallelConfig(expert_model_parallel_size=2).validate(2, GPTModelConfig())


@pytest.mark.parametrize("world, etp, ep, pp", [(16, 1, 8, 2), (8, 2, 2, 1), (8, 1, 2, 2),
                                                 (16, 2, 4, 1)])
def test_expert_groups_are_megatrons(world, etp, ep, pp):
    from megatron.core.parallel_state import RankGenerator

    theirs = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1,
                           order="tp-cp-ep-dp-pp").get_ranks("ep")
    assert sorted(launcher.expert_groups(world, etp, ep, pp)) == sorted(theirs)


_STUBS = tempfile.mkdtemp(prefix="moe_layout_")
atexit.register(shutil.rmtree, _STUBS, ignore_errors=True)


def test_dry_run_prints_the_ep_groups(monkeypatch, capsys):
    import os

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))] + [
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(launcher, "resolve_hostnames", launcher.expand_nodelist)
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "0",
           "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_NODELIST": "gpu001,gpu002", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
           "SLURM_GPUS_ON_NODE": "8"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nemo = config_only_nemo(model_group("qwen3_30b_a3b"), _STUBS)
    code = launcher.main(["--dry-run", "--", "train", "recipe=qwen3_30b_a3b", f"init_from={nemo}",
                          "data.train_path=/p/train.jsonl", "data.validation_path=/p/val.jsonl"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "experts      ETP 1 x EP 8 x expert-DP 1 x PP 2: 16 of 128 experts" in out
    assert "EP groups    [0-7]; [8-15]" in out
    assert "span nodes" not in out


# ---------------------------------------------------------------- the plan's parameters
def _count(tp, pp, ep, etp):
    import mcore_utils as mu

    chunks, _ = mu.setup(tp, pp, sp=tp > 1, model_cfg=MOE, ep=ep, etp=etp)
    params = [p for c in chunks for p in c.module.parameters()]
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("tp, pp, ep, etp, world", [(1, 1, 1, None, 1), (1, 1, 2, None, 2),
                                                     (2, 1, 2, 1, 2), (1, 2, 2, None, 4)],
                         ids=str)
def test_stage_params_equal_the_built_moe_model(tp, pp, ep, etp, world):
    from nemo_aot.algorithms.config import AOTConfig
    from nemo_aot.algorithms.memory_plan import stage_params

    cfg = AOTConfig(model=MOE, parallel=ParallelConfig(
        tp, pp, None, tp > 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp))
    counts = run_multirank(_count, world, args=(tp, pp, ep, etp), timeout=300)
    assert stage_params(cfg)[0] == max(counts)

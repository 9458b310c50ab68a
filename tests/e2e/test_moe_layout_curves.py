"""A mixture-of-experts policy trained by the CLI for several optimizer steps follows the
single-process curve under expert parallelism: EP2 (two ranks, also DP2 for the attention),
EP2 x TP2 with sequence parallelism and EP2 x PP2 (four ranks each).

Every step's loss, gradient norm, rewards, log-probabilities and router losses (load-balancing
and z) are compared, so the router losses' gradients, the expert-parallel gradient reductions
and the optimizer's updates of expert weights all have to agree across layouts. All runs start
from one converted tiny Qwen3-MoE checkpoint (a random init is not layout-invariant: experts
are initialized per expert-parallel rank). The single process pads each micro-batch to its own
longest sequence; TP2's sequence parallelism pads to a multiple of 2 and PP2 pads every
micro-batch of a step to one length, so the router losses must not see padding tokens.

Router top-k is discontinuous: a token whose k-th and (k+1)-th router logits tie within
rounding could be routed differently by two layouts. The router weights are drawn with std 0.1
(logits of order 1, apart by far more than the layouts' ~1e-6 rounding differences) and the runs
are deterministic on CPU; larger weights (0.5) give a router that collapses onto two experts
within two updates (load-balancing loss 2.0), where expert parallelism would move no tokens
between ranks - the reference curve is asserted to stay balanced.
"""


import pytest

from conftest import convert_to_nemo, curve, history, run_cli, train_args

STEPS = 5
KEYS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen",
        "logps/rejected", "moe/load_balancing_loss", "moe/z_loss")
RUN = [f"trainer.max_steps={STEPS}", "checkpoint.save_interval=1000",
       "checkpoint.export_nemo_at_end=false", "data.validation_path=null",
       "alignment.sort_scope=micro", "model.moe_aux_loss_coeff=0.01",
       "model.moe_z_loss_coeff=0.001"]


@pytest.fixture(scope="module")
def moe_init(tmp_path_factory):
    """A tiny random Qwen3-MoE (4 experts, top-2) built with transformers, converted by the
    CLI."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=256, tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):  # the routers
                p.normal_(0.0, 0.1)
    return convert_to_nemo(model, tmp_path_factory.mktemp("moe_init"))


@pytest.fixture(scope="module")
def single(small_data, moe_init, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_single")
    run_cli(["train", *train_args(small_data, out, f"init_from={moe_init}", *RUN)])
    return out


LAYOUTS = {  # name: (overrides, ranks)
    "ep2": (["parallel.expert_model_parallel_size=2"], 2),
    "ep2xtp2": (["parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                 "parallel.sequence_parallel=true", "data.pad_to_multiple_of=2"], 4),
    "ep2xpp2": (["parallel.expert_model_parallel_size=2",
                 "parallel.pipeline_model_parallel_size=2", "data.uniform_step_length=true"], 4),
}


@pytest.mark.slow
@pytest.mark.xdist_group("moe_layout_curves")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layouts_follow_the_single_process_curve(name, single, small_data, moe_init,
                                                     tmp_path):
    layout, ranks = LAYOUTS[name]
    ref = history(single)
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.05  # the policy trains: a curve, not a constant
    # no collapsed router (2.0 = every token on the same two experts): tokens cross EP ranks
    assert all(r["moe/load_balancing_loss"] < 1.6 for r in ref), curve(ref, KEYS)
    run_cli(["train", *train_args(small_data, tmp_path, f"init_from={moe_init}", *RUN,
                                  *layout)], nproc=ranks, timeout=900)
    got = history(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    worst = 0.0
    for a, b in zip(ref, got):
        for key in KEYS:
            assert a[key] is not None and b[key] is not None, (a["step"], key)
            worst = max(worst, abs(b[key] - a[key]) / max(abs(a[key]), 1e-3))
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), (name, a["step"], key)
    print(f"{name}: worst relative difference {worst:.2e} over {STEPS} steps")

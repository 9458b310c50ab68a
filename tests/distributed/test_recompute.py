"""Activation recomputation reruns the forward where it says it does, and changes neither the
loss nor any gradient, at TP2, PP2 and TP2 x PP2.

Each layout builds the same model (seeded CPU init) once without recomputation and once per
variant, runs one step of two micro-batches through megatron's schedule and DDP, and compares the
loss and every reduced gradient (``main_grad``) with the plain run's. Calls of our SDPA core
attention (the local spec's, not megatron's) are counted: selective recomputation of core_attn
must rerun it in backward, which megatron does for whatever module the spec puts there.
"""

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank
from nemo_aot.models.performance import PerformanceConfig

# name -> (config, SDPA calls per plain call as a function of the layers of a pipeline stage):
# every recomputed layer reruns its core attention once in backward.
VARIANTS = {
    "selective_core_attn": (PerformanceConfig(recompute_granularity="selective"), lambda n: 2.0),
    # (layernorm recompute needs TransformerEngine in megatron-core 0.16: refused without it)
    "selective_attn_mlp": (PerformanceConfig(recompute_granularity="selective",
                                             recompute_modules=["core_attn", "mlp"]),
                           lambda n: 2.0),
    "full_uniform_1": (PerformanceConfig(recompute_granularity="full", recompute_method="uniform",
                                         recompute_num_layers=1), lambda n: 2.0),
    "full_uniform_2": (PerformanceConfig(recompute_granularity="full", recompute_method="uniform",
                                         recompute_num_layers=2), lambda n: 2.0),
    "full_block_1": (PerformanceConfig(recompute_granularity="full", recompute_method="block",
                                       recompute_num_layers=1), lambda n: 1 + 1 / n),
}


def _counted_step(tp, pp, overrides):
    """(loss pieces, [main_grad per parameter], SDPA forward calls) of one training step."""
    from nemo_aot.models.layer_specs import SDPAttention

    calls = [0]
    forward = SDPAttention.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    SDPAttention.forward = counting
    try:
        chunks, config = mu.setup(tp, pp, config_overrides=overrides)
        total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    finally:
        SDPAttention.forward = forward
    grads = [p.main_grad.detach().clone() for c in chunks for p in c.module.parameters()]
    return total, grads, calls[0]


def _compare(tp, pp):
    base_total, base_grads, base_calls = _counted_step(tp, pp, {})
    out = {}
    for name, (perf, _) in VARIANTS.items():
        perf.validate()
        perf.check_runtime()
        total, grads, calls = _counted_step(tp, pp, perf.recompute_kwargs())
        diffs = [float((g - b).abs().max()) for g, b in zip(grads, base_grads)]
        out[name] = (total, diffs, calls / base_calls, len(grads) == len(base_grads))
    return base_total, out


LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_matches_the_plain_step(layout):
    tp, pp = LAYOUTS[layout]
    per_stage = mu.TINY.num_layers // pp  # block recomputes 1 of them
    for rank, (base, variants) in enumerate(run_multirank(_compare, tp * pp, args=(tp, pp),
                                                          timeout=400)):
        for name, (total, diffs, calls, same_params) in variants.items():
            where = f"{layout} rank {rank} {name}"
            assert same_params, where
            if base is None:
                assert total is None, where
            else:
                assert torch.equal(total, base), where
            assert max(diffs) == 0.0, f"{where}: gradients differ by up to {max(diffs)}"
            expected = VARIANTS[name][1](per_stage)
            assert calls == expected, f"{where}: SDPA ran {calls}x the plain count, not {expected}x"

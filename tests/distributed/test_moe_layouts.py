"""Expert parallelism computes the single-process loss and gradients of a tiny MoE model.

As ``test_layout_invariance`` does for dense layouts: one rank saves the initial weights and
its reduced gradients of one step as megatron-core dist checkpoints; each layout loads the
initial weights, runs the same step and saves its gradients; both are read back as full tensors
by a single-rank model, so the comparison rests on megatron's own expert sharding metadata.

The step includes the load-balancing and z losses: megatron computes them per micro-batch
from the router's tokens, so every layout runs the same micro-batches as the reference (two
rows each; the reference runs all four of them on one rank). The loss is averaged per
micro-batch as the trainer's objective has megatron do it (``calculate_per_token_loss`` off):
under per-token scaling megatron-core 0.16 scales both router losses by the *local* token
count, which under TP's sequence parallelism is 1/TP of the tokens, so their gradients come out
TP times too small (measured: equal to the single process once the coefficients are multiplied
by TP); the trainer never uses that mode.
"""

import dataclasses

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

MOE = dataclasses.replace(
    mu.TINY, num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
    qk_layernorm=True, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
MICRO = 4  # micro-batches of the reference (two rows each)


def _reference(ckpt_dir, grad_dir):
    chunks, config = mu.setup(model_cfg=MOE, per_token_loss=False)
    mu.save(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=MICRO)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _layout(tp, pp, ep, dispatcher, ckpt_dir, grad_dir):
    from megatron.core import parallel_state

    model = dataclasses.replace(MOE, moe_token_dispatcher_type=dispatcher)
    # megatron's MoE layer trains under TP only with sequence parallelism
    chunks, config = mu.setup(tp, pp, sp=tp > 1, model_cfg=model, ep=ep, per_token_loss=False)
    mu.load(chunks, ckpt_dir)
    dp = parallel_state.get_data_parallel_world_size()
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=MICRO // dp)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _full(directory):
    return mu.full_state(directory, model_cfg=MOE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_ref")
    ckpt, grads = str(root / "init"), str(root / "grads")
    (total,) = run_multirank(_reference, 1, args=(ckpt, grads), timeout=240)
    (full_grads,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    return ckpt, total, full_grads


# name: (tp, pp, ep, dispatcher, world size); EP2 on two ranks is also DP2 for the attention.
LAYOUTS = {
    "ep2_alltoall": (1, 1, 2, "alltoall", 2),
    "ep2_allgather": (1, 1, 2, "allgather", 2),
    "ep2xtp2": (2, 1, 2, "alltoall", 4),
    "ep2xpp2": (1, 2, 2, "alltoall", 4),
}


@pytest.mark.slow
@pytest.mark.xdist_group("moe_layouts")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_single_process(name, reference, tmp_path):
    ckpt, ref_total, ref_grads = reference
    tp, pp, ep, dispatcher, world = LAYOUTS[name]
    grads = str(tmp_path / "grads")
    totals = run_multirank(_layout, world, args=(tp, pp, ep, dispatcher, ckpt, grads),
                           timeout=300)
    last_stage = [t for t in totals if t is not None]
    summed = torch.stack(last_stage).sum(0) / tp
    assert summed[1] == ref_total[1]
    torch.testing.assert_close(summed[0], ref_total[0], rtol=1e-5, atol=1e-5)
    (layout_grads,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    assert layout_grads.keys() == ref_grads.keys()
    worst = 0.0
    for key in ref_grads:
        assert ref_grads[key].abs().max() > 0, f"{key}: zero reference grad"
        worst = max(worst, (layout_grads[key] - ref_grads[key]).abs().max().item())
        torch.testing.assert_close(layout_grads[key], ref_grads[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=key: f"{name} {k}: {m}")
    print(f"{name}: loss diff {(summed[0] - ref_total[0]).abs().item():.2e}, "
          f"max grad diff {worst:.2e}")

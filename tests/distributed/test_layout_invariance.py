"""Any parallel layout computes the single-process loss and gradients of a tiny Llama model.

The reference runs on one rank and saves its initial weights as a megatron-core dist checkpoint;
every layout loads that checkpoint (so cross-layout loading is exercised too), runs one step
through megatron's schedule and DDP, and saves its reduced gradients the same way. Both are read
back as full tensors by a TP=1 model, so the comparison relies on megatron's own sharding
metadata, not on ours.
"""

import dataclasses

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank
from nemo_aot.models.config import RopeScaling


def _reference(ckpt_dir, grad_dir, model_cfg=mu.TINY):
    chunks, config = mu.setup(model_cfg=model_cfg)
    mu.save(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _layout(tp, pp, vpp, sp, ckpt_dir, grad_dir, model_cfg=mu.TINY):
    chunks, config = mu.setup(tp, pp, vpp, sp, model_cfg=model_cfg)
    mu.load(chunks, ckpt_dir)
    # 4 micro-batches make the interleaved schedule overlap sends to the same peer.
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=4 if vpp else 2)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _full(directory, model_cfg=mu.TINY):
    return mu.full_state(directory, model_cfg=model_cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    ckpt, grads = str(root / "init"), str(root / "grads")
    (total,) = run_multirank(_reference, 1, args=(ckpt, grads), timeout=240)
    (full_grads,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    return ckpt, total, full_grads


LAYOUTS = {
    "tp2": (2, 1, None, False, 2),
    "pp2": (1, 2, None, False, 2),
    "dp2": (1, 1, None, False, 2),
    "tp2_sp": (2, 1, None, True, 2),
    "tp2xpp2": (2, 2, None, False, 4),
    "pp2_vpp2": (1, 2, 2, False, 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    _check_layout(name, reference, tmp_path, mu.TINY)


# Every option of the newer families at once (Gemma 3's set; Qwen3's QK norm among them): QK
# and post-sublayer norms (their gradients summed over TP by megatron, by name or by the
# sequence_parallel mark), zero-centered norms, GeGLU, embedding scale, softmax scale, sliding
# window 8 < 16 tokens on odd layers with their own RoPE base, linear scaling on even ones.
FAMILY = dataclasses.replace(
    mu.TINY, qk_layernorm=True, layernorm_zero_centered_gamma=True, post_sublayer_norms=True,
    scale_embeddings=True, activation="geglu", softmax_scale=0.2, sliding_window=8,
    window_attn_skip_freq=2, rotary_base_local=10000.0, rotary_base=1000000.0,
    rope_scaling=RopeScaling(factor=8.0, rope_type="linear"),
    share_embeddings_and_output_weights=True)


@pytest.fixture(scope="module")
def family_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_ref")
    ckpt, grads = str(root / "init"), str(root / "grads")
    (total,) = run_multirank(_reference, 1, args=(ckpt, grads, FAMILY), timeout=240)
    (full_grads,) = run_multirank(_full, 1, args=(grads, FAMILY), timeout=240)
    return ckpt, total, full_grads


@pytest.mark.slow
@pytest.mark.xdist_group("layout_family_options")
@pytest.mark.parametrize("name", ["tp2_sp", "tp2xpp2"])
def test_family_options_layout_matches_single_process(name, family_reference, tmp_path):
    _check_layout(name, family_reference, tmp_path, FAMILY)


def _check_layout(name, reference, tmp_path, model_cfg):
    ckpt, ref_total, ref_grads = reference
    tp, pp, vpp, sp, world = LAYOUTS[name]
    grads = str(tmp_path / "grads")
    totals = run_multirank(_layout, world, args=(tp, pp, vpp, sp, ckpt, grads, model_cfg),
                           timeout=300)
    last_stage = [t for t in totals if t is not None]
    assert last_stage, "no rank reported a loss"
    # Each last-stage rank of a DP group reports its share; DP replicas split the batch.
    summed = torch.stack(last_stage).sum(0) / tp
    assert summed[1] == ref_total[1]
    torch.testing.assert_close(summed[0], ref_total[0], rtol=1e-5, atol=1e-5)
    (layout_grads,) = run_multirank(_full, 1, args=(grads, model_cfg), timeout=240)
    assert layout_grads.keys() == ref_grads.keys()
    for key in ref_grads:
        assert ref_grads[key].abs().max() > 0 or "bias" in key, f"{key}: zero reference grad"
        torch.testing.assert_close(layout_grads[key], ref_grads[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=key: f"{name} {k}: {m}")

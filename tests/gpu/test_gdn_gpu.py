"""Gated DeltaNet on a GPU: the torch kernels against the fp64 recurrence on the device, the
``fla`` kernels (when the image has them) against the torch ones, and one Qwen3.5 training step
(tiny, fp32, megatron's GatedDeltaNet) with fla against the same step on the torch path.

Skipped without CUDA; the fla comparisons also without ``fla``. Run: ``pytest -m gpu tests/gpu``
(part of ``scripts/gpu_check/run.sh``).
"""

import importlib.util
import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_fla = pytest.mark.skipif(importlib.util.find_spec("fla") is None,
                               reason="flash-linear-attention (fla) is not in this image")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "unit"))


def _inputs(dtype, length=200, seed=0):
    from test_gdn_kernels import _inputs as cpu_inputs

    return [t.detach().to("cuda", dtype).requires_grad_()
            for t in cpu_inputs(length, heads=4, v_heads=4, dk=64, dv=64, seed=seed)]


def test_torch_kernel_on_gpu_matches_the_fp64_recurrence():
    from test_gdn_kernels import naive_gated_delta_rule

    from nemo_aot.models.gdn_kernels import chunk_gated_delta_rule

    inputs = _inputs(torch.float32)
    out = chunk_gated_delta_rule(*inputs)[0]
    ref = naive_gated_delta_rule(*(t.detach().cpu().double() for t in inputs), scale=64 ** -0.5)
    torch.testing.assert_close(out.double().cpu(), ref[0], rtol=1e-4, atol=1e-4)


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_matches_the_torch_kernel(dtype):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_rule

    from nemo_aot.models.gdn_kernels import chunk_gated_delta_rule

    a, b = _inputs(dtype), _inputs(dtype)
    out_a = fla_rule(*a, use_qk_l2norm_in_kernel=True)[0]
    out_b = chunk_gated_delta_rule(*b, use_qk_l2norm_in_kernel=True)[0]
    weight = torch.randn_like(out_a)
    (out_a.float() * weight).sum().backward()
    (out_b.float() * weight).sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out_a.float(), out_b.float(), **tol)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), **tol)


def _qwen35_step(kernels):
    """Loss and gradients of one step of a tiny Qwen3.5 (fp32) with ``kernels`` in megatron's
    GatedDeltaNet module (None: what install_gdn_kernels chose)."""
    import dataclasses

    from megatron.core.ssm import gated_delta_net as gdn

    import mcore_utils as mu
    from nemo_aot.models.config import LinearAttention

    cfg = dataclasses.replace(
        mu.TINY, kv_channels=32, rotary_percent=0.25, qk_layernorm=True,
        layernorm_zero_centered_gamma=True, attention_output_gate=True,
        linear_attention=LinearAttention(full_attention_interval=2, key_head_dim=32,
                                         value_head_dim=32, num_key_heads=2, num_value_heads=4))
    saved = (gdn.chunk_gated_delta_rule, gdn.l2norm)
    if kernels is not None:
        gdn.chunk_gated_delta_rule, gdn.l2norm = kernels
    try:
        chunks, config = mu.setup(model_cfg=cfg)
        total = mu.train_step(chunks, config, mu.global_batch(seq=128))
        grads = {n: p.main_grad.float().clone() for n, p in chunks[0].module.named_parameters()}
    finally:
        gdn.chunk_gated_delta_rule, gdn.l2norm = saved
    return total, grads


@needs_fla
def test_qwen35_step_with_fla_matches_the_torch_path():
    from nemo_aot.models import gdn_kernels

    fla_loss, fla_grads = _qwen35_step(None)
    torch_loss, torch_grads = _qwen35_step((gdn_kernels.chunk_gated_delta_rule,
                                            gdn_kernels.l2norm))
    assert torch.isfinite(fla_loss).all() and torch.isfinite(torch_loss).all()
    torch.testing.assert_close(fla_loss, torch_loss, rtol=2e-2, atol=1e-2)
    for name, grad in fla_grads.items():
        scale = grad.abs().max().clamp_min(1e-3)
        assert (grad - torch_grads[name]).abs().max() <= 0.1 * scale, name

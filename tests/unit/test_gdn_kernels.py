"""The torch Gated DeltaNet kernels against the token-by-token recurrence (fp64, values and
gradients), against transformers' independent torch version, and megatron-core's
GatedDeltaNet module running forward/backward on CPU with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_aot.models import gdn_kernels as K


def naive_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None):
    """S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T; o_t = S_t^T q_t s."""
    batch, length, heads, _ = q.shape
    groups = v.shape[2] // heads
    q, k = q.repeat_interleave(groups, 2), k.repeat_interleave(groups, 2)
    state = (torch.zeros(batch, v.shape[2], q.shape[-1], v.shape[-1], dtype=q.dtype)
             if initial_state is None else initial_state)
    out = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta = (v[:, t] - predicted) * beta[:, t, :, None]
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], delta)
        out.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t] * scale))
    return torch.stack(out, 1), state


def _inputs(length, heads=2, v_heads=4, dk=8, dv=6, batch=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dk, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(batch, length, heads, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(batch, length, v_heads, dv, generator=gen, dtype=dtype)
    g = -F.softplus(torch.randn(batch, length, v_heads, generator=gen, dtype=dtype))
    beta = torch.rand(batch, length, v_heads, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (16, 8), (29, 8)])
def test_chunked_equals_recurrence_fp64_values_and_grads(length, chunk):
    inputs = _inputs(length)
    state0 = torch.randn(2, 4, 8, 6, dtype=torch.float64, requires_grad=True)
    out, state = K.chunk_gated_delta_rule(*inputs, initial_state=state0,
                                          output_final_state=True, chunk_size=chunk)
    ref, ref_state = naive_gated_delta_rule(*inputs, scale=8 ** -0.5, initial_state=state0)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=1e-12)
    weights = torch.randn_like(out), torch.randn_like(state)
    grads = torch.autograd.grad((out * weights[0]).sum() + (state * weights[1]).sum(),
                                [*inputs, state0])
    ref_grads = torch.autograd.grad((ref * weights[0]).sum() + (ref_state * weights[1]).sum(),
                                    [*inputs, state0])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_chunked_gradcheck():
    inputs = _inputs(5, heads=1, v_heads=2, dk=3, dv=2, batch=1)
    assert torch.autograd.gradcheck(
        lambda *xs: K.chunk_gated_delta_rule(*xs, chunk_size=2)[0], inputs)


def test_qk_l2norm_in_kernel_and_low_precision_output_dtype():
    q, k, v, g, beta = (t.detach() for t in _inputs(9))
    out = K.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, chunk_size=4)[0]
    ref = naive_gated_delta_rule(F.normalize(q, dim=-1, eps=0), F.normalize(k, dim=-1, eps=0),
                                 v, g, beta, scale=8 ** -0.5)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)  # eps=1e-6 inside the l2norm
    low = K.chunk_gated_delta_rule(*(t.bfloat16() for t in (q, k, v, g, beta)))[0]
    assert low.dtype == torch.bfloat16


def test_matches_transformers_torch_implementation():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

    q, k, v, g, beta = (t.detach().float() for t in _inputs(70))
    ours = K.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                                    output_final_state=True)
    theirs = hf.torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                                             output_final_state=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)


def test_causal_conv1d_equals_loop():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    y = K.causal_conv1d_fn(x, w, b, activation="silu")
    padded = F.pad(x, (3, 0))
    ref = torch.stack([(padded[..., t:t + 4] * w).sum(-1) for t in range(11)], -1) + b[:, None]
    torch.testing.assert_close(y, F.silu(ref), rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(lambda x, w: K.causal_conv1d_fn(x, w, b), (x, w))
    with pytest.raises(NotImplementedError, match="seq_idx"):
        K.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 11, dtype=torch.int32))


@pytest.fixture
def cpu_world():
    from nemo_aot.conversion.convert import single_process_world
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    with single_process_world():
        initialize_model_parallel(ParallelConfig())
        yield


def test_megatron_gated_delta_net_runs_on_cpu(cpu_world):
    """megatron-core's own GatedDeltaNet, built and run forward/backward with the torch kernels;
    its output equals a direct evaluation of the same parameters through the naive recurrence."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from nemo_aot.models.layer_specs import RMSNorm

    report = K.install_gdn_kernels()
    assert set(report) == {"gated_delta_rule", "causal_conv1d", "gated_norm"}
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                            experimental_attention_variant="gated_delta_net",
                            linear_attention_freq=1, linear_conv_kernel_dim=3,
                            linear_key_head_dim=4, linear_value_head_dim=5,
                            linear_num_key_heads=2, linear_num_value_heads=4,
                            activation_func=F.silu, use_cpu_initialization=True)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    module = GatedDeltaNet(cfg, GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear,
                                                        out_norm=RMSNorm,
                                                        out_proj=RowParallelLinear),
                           layer_number=1, pg_collection=groups)
    with torch.no_grad():
        module.out_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(13, 2, 16, requires_grad=True)  # [s, b, h]
    out, _ = module(x, attention_mask=None)
    out.square().sum().backward()
    assert out.shape == (13, 2, 16) and x.grad is not None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())

    # the same computation spelled out, through the naive recurrence
    with torch.no_grad():
        mixed = module.in_proj(x)[0].transpose(0, 1)
        qkv, z, b, a = mixed.split([8 + 8 + 20, 20, 4, 4], dim=-1)
        qkv = F.silu(F.conv1d(qkv.transpose(1, 2), module.conv1d.weight, padding=2,
                              groups=36)[..., :13]).transpose(1, 2)
        q, k, v = qkv.split([8, 8, 20], -1)
        q, k = (F.normalize(t.reshape(2, 13, 2, 4), dim=-1, eps=0) for t in (q, k))
        g = -module.A_log.exp() * F.softplus(a + module.dt_bias)
        core = naive_gated_delta_rule(q.double(), k.double(), v.reshape(2, 13, 4, 5).double(),
                                      g.double(), b.sigmoid().double(), scale=4 ** -0.5)[0]
        core = core.float()
        normed = core * torch.rsqrt(core.square().mean(-1, keepdim=True) + cfg.layernorm_epsilon)
        gated = normed * module.out_norm.weight * F.silu(z.reshape(2, 13, 4, 5))
        ref = module.out_proj(gated.reshape(2, 13, 20).transpose(0, 1))[0]
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=5e-5)  # fp32 module vs fp64

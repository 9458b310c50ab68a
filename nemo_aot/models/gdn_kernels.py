"""Gated DeltaNet kernels in plain torch, for hosts without ``fla`` / ``causal_conv1d``.

megatron-core's :class:`~megatron.core.ssm.gated_delta_net.GatedDeltaNet` calls the ``fla``
triton kernels (``chunk_gated_delta_rule``, ``l2norm``) and, when present, Tri Dao's
``causal_conv1d``; both need a CUDA GPU, and without ``fla`` the module refuses to build.
:func:`install_gdn_kernels` puts the functions below in their place where (and only where) the
packages are missing, so the same module runs on a laptop CPU, in CI over gloo, and on a GPU
image that lacks ``fla`` (slowly: the chunked scan is a python loop over chunks).

The recurrence (gated delta rule, Yang et al. 2024, arXiv 2412.06464, eq. 10), per head, with
state ``S`` [K, V], gate ``g_t <= 0`` and write strength ``beta_t`` in (0, 1)::

    S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,   o_t = S_t^T q_t * scale

:func:`chunk_gated_delta_rule` evaluates it chunk by chunk (the WY/UT form of the paper's sec.
3): within a chunk of C tokens the C sequential rank-one updates are condensed by one unit
lower-triangular solve, then one state update per chunk carries the rest. It computes in the
input dtype promoted to at least fp32 (fp64 stays fp64, so tests compare it with the
token-by-token recurrence to rounding), and is differentiable by autograd.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 64


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6,
           output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over ``dim``, in fp32 or wider (``fla.modules.l2norm``)."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    y = y * torch.rsqrt((y * y).sum(dim=dim, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, scale: Optional[float] = None,
                           initial_state: Optional[torch.Tensor] = None,
                           output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False,
                           cu_seqlens: Optional[torch.Tensor] = None,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, **unused):
    """The gated delta rule over a whole sequence (``fla.ops.gated_delta_rule`` signature).

    q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H: each q/k head serves HV/H
    consecutive value heads); g (log decay), beta: [B, T, HV]; initial_state [B, HV, K, V].
    Returns (o [B, T, HV, V] in q's dtype, the final state [B, HV, K, V] or None).
    """
    if cu_seqlens is not None:
        raise NotImplementedError(
            "the torch gated-delta kernel does not take cu_seqlens (packed sequences); "
            "megatron-core's GatedDeltaNet does not pass them either")
    out_dtype = q.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q, output_dtype=dtype), l2norm(k, output_dtype=dtype)
    groups = v.shape[2] // k.shape[2]
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # [B, T, H, *] -> [B, H, T, *] in the compute dtype
    q, k, v, g, beta = (t.transpose(1, 2).to(dtype) for t in (q, k, v, g, beta))
    length = q.shape[2]
    pad = (-length) % chunk_size
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))  # padded tokens: no decay, no write
    shape = (*q.shape[:2], -1, chunk_size)
    q, k, v = (t.reshape(*shape, t.shape[-1]) for t in (q * scale, k, v))
    g, beta = g.reshape(shape).cumsum(-1), beta.reshape(shape)  # g: log decay since chunk start

    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    # decay[i, j] = exp(g_i - g_j) for j <= i (masked before exp: the upper part would overflow)
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()
    k_beta = k * beta.unsqueeze(-1)
    # UT transform: T = (I + strict_lower(diag(beta) K K^T * decay))^-1, applied by a solve
    system = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(chunk_size, dtype=dtype, device=q.device)
    values = torch.linalg.solve_triangular(system + eye, v * beta.unsqueeze(-1), upper=False,
                                           unitriangular=True)
    read_keys = torch.linalg.solve_triangular(system + eye, k_beta * g.exp().unsqueeze(-1),
                                              upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * g.exp().unsqueeze(-1)
    k_to_end = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    chunk_decay = g[..., -1].exp()[..., None, None]

    batch, heads, chunks = q.shape[:3]
    state = (torch.zeros(batch, heads, k.shape[-1], v.shape[-1], dtype=dtype, device=q.device)
             if initial_state is None else initial_state.to(dtype))
    outputs = []
    for i in range(chunks):
        new = values[:, :, i] - read_keys[:, :, i] @ state  # what the state does not predict
        outputs.append(q_decayed[:, :, i] @ state + intra[:, :, i] @ new)
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ new
    o = torch.stack(outputs, dim=2).reshape(batch, heads, -1, v.shape[-1])[:, :, :length]
    return o.transpose(1, 2).to(out_dtype).contiguous(), (state if output_final_state else None)


def causal_conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     activation: Optional[str] = None, seq_idx: Optional[torch.Tensor] = None,
                     **unused) -> torch.Tensor:
    """Causal depthwise convolution (``causal_conv1d.causal_conv1d_fn`` signature).

    x: [B, D, T]; weight: [D, W]; output [B, D, T], token t sees tokens t-W+1 .. t.
    """
    if seq_idx is not None:
        raise NotImplementedError("the torch causal conv1d does not take seq_idx (packed "
                                  "sequences)")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d_fn: activation must be None, silu or swish, got "
                         f"{activation!r}")
    width = weight.shape[-1]
    y = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1,
                 groups=x.shape[1])[..., : x.shape[-1]]
    return (F.silu(y) if activation else y).to(x.dtype)


def fla_causal_conv1d(x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                      initial_state: Optional[torch.Tensor] = None,
                      output_final_state: bool = False,
                      cu_seqlens: Optional[torch.Tensor] = None, **unused):
    """Causal depthwise convolution (``fla.modules.convolution.causal_conv1d`` signature, which
    megatron-core 0.19 calls): x [B, T, D], weight [D, W]; returns (y [B, T, D], None)."""
    if cu_seqlens is not None or initial_state is not None or output_final_state:
        raise NotImplementedError("the torch causal conv1d takes neither packed sequences "
                                  "(cu_seqlens) nor a carried state")
    y = causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation)
    return y.transpose(1, 2), None


_REPORT: dict[str, str] = {}


def _gdn_modules() -> list:
    """The modules of megatron-core that hold the GDN kernels' names. 0.16-0.18: the module
    ``ssm.gated_delta_net``. 0.19: a package of that name whose ``common`` holds ``HAVE_FLA``
    and ``l2norm`` and whose ``gdn`` binds the kernels (``GatedDeltaNet`` reads them there);
    the package re-exports them (patched too, for code that reads them from it)."""
    import importlib

    modules = [importlib.import_module("megatron.core.ssm.gated_delta_net")]
    for part in ("common", "gdn"):
        try:
            modules.append(importlib.import_module(f"megatron.core.ssm.gated_delta_net.{part}"))
        except ImportError:  # 0.16-0.18: a plain module
            pass
    return modules


def install_gdn_kernels() -> dict[str, str]:
    """Give megatron-core's GatedDeltaNet the torch kernels where ``fla`` / ``causal_conv1d``
    did not import (idempotent; never replaces a kernel that did). Returns {kernel: which
    implementation runs, and why}. Found by name in whichever modules define them (the layout
    moved in megatron-core 0.19), not by release."""
    if _REPORT:
        return dict(_REPORT)
    modules = _gdn_modules()
    gdn_class = next(m for m in reversed(modules) if hasattr(m, "GatedDeltaNet")).GatedDeltaNet
    # where GatedDeltaNet's code looks the kernels up (0.16 leaves a failed import's names
    # undefined there): always set in these
    homes = [sys.modules[k.__module__] for k in gdn_class.__mro__
             if k.__module__.startswith("megatron.core.ssm")]
    fla = all(getattr(m, "HAVE_FLA", True) for m in modules) and all(
        getattr(m, "chunk_gated_delta_rule", True) is not None for m in modules)
    _REPORT["gated_delta_rule"] = "fla (triton)" if fla else \
        "torch chunked (nemo_aot.models.gdn_kernels; fla not importable)"
    if not fla:
        _replace(modules, homes, chunk_gated_delta_rule=chunk_gated_delta_rule,
                 l2norm=l2norm, HAVE_FLA=True)  # HAVE_FLA: the build-time guard
    # causal_conv1d_fn (Tri Dao's package, 0.16-0.18); causal_conv1d (fla's, 0.19)
    missing = {name: kernel for name, kernel in (("causal_conv1d_fn", causal_conv1d_fn),
                                                 ("causal_conv1d", fla_causal_conv1d))
               if any(getattr(m, name, False) is None for m in modules)}
    _REPORT["causal_conv1d"] = "torch depthwise conv1d (causal_conv1d not importable)" \
        if missing else "causal_conv1d (CUDA)"
    _replace(modules, homes, **missing)
    _REPORT["gated_norm"] = _eager_jit_methods_on_cpu(gdn_class)
    return dict(_REPORT)


def _replace(modules: list, homes: list, **names) -> None:
    """Set each of ``names`` in every module that defines it, and in ``homes``."""
    for module in modules:
        for name, value in names.items():
            if hasattr(module, name) or module in homes:
                setattr(module, name, value)


def _eager_jit_methods_on_cpu(module_class) -> str:
    """megatron wraps the output norm + gate (and, from 0.19, the input preparation) in its JIT
    fuser (torch.compile): on a host without CUDA that only costs compile time (~30 s per
    process here), so run them eagerly there. Looked up along the class's bases (0.19 defines
    them on a base class)."""
    fused = {}
    for klass in module_class.__mro__:
        for name, fn in vars(klass).items():
            eager = getattr(fn, "_torchdynamo_orig_callable", None)
            if eager is not None and name not in fused:
                fused[name] = (klass, eager)
    if torch.cuda.is_available() or not fused:
        return "megatron's JIT fuser" if fused else "eager"
    for name, (klass, eager) in fused.items():
        setattr(klass, name, eager)
    return "eager (no GPU: torch.compile would only cost compile time)"


def describe_gdn_kernels(report: dict[str, str]) -> str:
    """The start-up line, next to the fused-kernel line."""
    return "linear-attention kernels: " + "; ".join(f"{k}: {v}" for k, v in report.items())


__all__ = ["chunk_gated_delta_rule", "causal_conv1d_fn", "fla_causal_conv1d", "l2norm",
           "install_gdn_kernels", "describe_gdn_kernels"]

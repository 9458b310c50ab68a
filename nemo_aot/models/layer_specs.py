"""Layer specs for megatron-core GPTModel: TransformerEngine, or local modules + SDPA.

The local spec is megatron-core's own (ColumnParallelLinear / RowParallelLinear, MLP, RoPE) with
two modules of ours:

* :class:`RMSNorm` - torch's RMSNorm math in fp32 (the Hugging Face Llama order of operations), and
  usable with sequence parallelism: its weight is marked ``sequence_parallel`` so megatron's
  grad finalization all-reduces it over the TP group. (megatron's torch fallback norm refuses
  sequence parallelism outright.)
* :class:`SDPAttention` - core attention through
  ``torch.nn.functional.scaled_dot_product_attention``:
  flash / memory-efficient kernels on GPU, the math kernel on CPU, causal and GQA-aware without
  materializing the fp32 [b, heads, s, s] score tensor that megatron's unfused
  ``DotProductAttention`` allocates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import is_layer_window_attention


class RMSNorm(torch.nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalized in fp32 and cast back before the scale.

    With ``config.layernorm_zero_centered_gamma`` (Gemma): y = (1 + w) * x / sqrt(...), the
    scale applied in fp32 before the cast back (Gemma's order of operations); w starts at 0."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees a slice of the sequence, so each holds a
        # partial weight gradient; megatron sums params marked like this over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class SDPAttention(MegatronModule):
    """Causal, GQA-aware core attention on torch SDPA; drop-in for megatron's core_attention."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **unused):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the TransformerEngine layer spec")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(head_dim)
        # Sliding-window layers (megatron's window_size: (left, right) inclusive).
        self.window = (config.window_size if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        # query [sq, b, heads, d]; key/value [sk, b, groups, d] -> output [sq, b, heads * d]
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias need the TE spec")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        if self.window is not None:
            window = _window_mask(q.shape[2], k.shape[2], self.window, q.device)
            mask = window if mask is None else mask & window
        causal = mask is None and mask_type == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0
        with _maybe_fork_rng(dropout > 0):
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _window_mask(sq: int, sk: int, window: tuple, device) -> torch.Tensor:
    """[sq, sk] True where query i (aligned to the end of the keys) may attend key j:
    i - left <= j <= i + right."""
    left, right = window
    i = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return (j >= i - left) & (j <= i + right)


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed rows, megatron's convention (True = masked out), bool
    [rows, 1, L, L]: a token attends to the tokens of its own document at or before it. Padding
    (-1) attends to the padding before it, so no softmax row is empty (no NaN); its outputs are
    never read."""
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    length = doc_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def _maybe_fork_rng(active: bool):
    import contextlib

    if not active or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return contextlib.nullcontext()
    return tensor_parallel.get_cuda_rng_tracker().fork()


def local_layer_spec(attention_backend: str = "sdpa", model=None) -> ModuleSpec:
    """megatron-core's local GPT layer spec with our RMSNorm and (by default) SDPA attention;
    ``model`` (a GPTModelConfig) adds query/key norms and the mixture-of-experts MLP."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    moe = _moe_spec_args(model)
    if moe["moe_grouped_gemm"]:
        raise ValueError("model.moe_grouped_gemm=true needs the TransformerEngine layer spec "
                         "(its grouped linear); with precision.transformer_impl=local set "
                         "model.moe_grouped_gemm=false (one GEMM per local expert)")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **moe)
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attention = sub.self_attention.submodules
    if attention_backend == "sdpa":
        attention.core_attention = SDPAttention
    if moe["qk_layernorm"]:
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    return spec


def _moe_spec_args(model) -> dict:
    """The spec builders' arguments for query/key norms and experts (none without a model)."""
    if model is None:
        return {"num_experts": None, "moe_grouped_gemm": False, "qk_layernorm": False}
    if model.num_moe_experts is not None:
        from nemo_aot.models import moe_router

        moe_router.install()  # the z-loss over sequence-parallel shards with padding
    return {"num_experts": model.num_moe_experts, "moe_grouped_gemm": model.moe_grouped_gemm,
            "qk_layernorm": model.qk_layernorm}


def te_layer_spec(model=None) -> ModuleSpec:
    """TransformerEngine's fused spec (LayerNormLinear QKV/FC1, TE attention, FP8-capable)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise ValueError(
            "model.transformer_impl=transformer_engine needs TransformerEngine, which is not "
            "importable here; run inside an NGC PyTorch/NeMo container or set "
            "transformer_impl=local") from err
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(**_moe_spec_args(model))


def decoder_block_spec(config: TransformerConfig, layer_spec: ModuleSpec,
                       vp_stage: Optional[int] = None) -> ModuleSpec:
    """Wrap a layer spec into a block spec whose final norm is ours (SP-capable) on local."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    final_norm = RMSNorm if layer_spec.submodules.input_layernorm is RMSNorm else None
    if final_norm is None:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer_spec] * num_layers, layer_norm=final_norm))

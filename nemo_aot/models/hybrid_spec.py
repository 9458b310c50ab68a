"""The decoder block of hybrid linear-attention models (Qwen3.5): Gated DeltaNet layers and
gated softmax-attention layers in one megatron-core ``TransformerBlock``.

megatron-core builds these with ``get_transformer_block_with_experimental_attention_variant_spec``
(models/gpt/experimental_attention_variant_module_specs.py), which Megatron-Bridge's Qwen3.5
bridge uses; it is TransformerEngine-only. :func:`hybrid_block_spec` is the same construction
over the local modules: per layer, ``GatedDeltaNet`` (``ssm/gated_delta_net.py``) where the
pattern says linear attention, megatron's ``SelfAttention`` (output gate and QK norms from the
TransformerConfig) elsewhere; SwiGLU MLPs, or with ``num_moe_experts`` (Qwen3.5-MoE) megatron's
``MoELayer`` on every layer of both kinds (router, SwiGLU experts, and the shared expert with its
sigmoid gate when the config has one: ``SharedExpertMLP``); then the layers of this pipeline
stage. The norms are
ours (:mod:`nemo_aot.models.layer_specs`), zero-centred where the model says so; the GDN
output norm is :class:`HeadSharedRMSNorm`. (megatron's TE spec differs in checkpoint keys and
zero-centres the GDN output norm, so linear-attention models are built on this spec only.)

Without ``fla``/``causal_conv1d`` GatedDeltaNet runs on :mod:`nemo_aot.models.gdn_kernels`.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_aot.models.layer_specs import RMSNorm, SDPAttention

logger = logging.getLogger(__name__)


class HeadSharedRMSNorm(RMSNorm):
    """GatedDeltaNet's output norm (a plain RMSNorm, like Hugging Face's ``RMSNormGated``): one
    weight of value_head_dim shared by every value head. Under tensor parallelism each rank
    normalizes its own heads, so each holds a partial gradient of the shared weight, and
    megatron's grad finalization sums only sequence-parallel norms and q/k layernorms over TP;
    so the weight enters through megatron's copy to the TP region (identity forward, all-reduce
    of the gradient backward). Never marked sequence_parallel: every rank sees the whole
    sequence of its heads."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config, hidden_size, eps)
        self.zero_centered = False  # a plain weight (Hugging Face's RMSNormGated), never (1 + w)
        torch.nn.init.ones_(self.weight)
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        weight = self.weight
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            weight = copy_to_tensor_model_parallel_region(weight)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)


def _attention_spec(config: TransformerConfig, attention_backend: str) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    experts = config.num_moe_experts
    if experts is not None and config.moe_grouped_gemm:
        raise ValueError("model.moe_grouped_gemm=true needs the TransformerEngine layer spec, "
                         "and model.linear_attention (Gated DeltaNet) is built on the local "
                         "spec only; set model.moe_grouped_gemm=false (one GEMM per local "
                         "expert)")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm,
                                    num_experts=experts, moe_grouped_gemm=False)
    attention = spec.submodules.self_attention
    if config.qk_layernorm:
        attention.submodules.q_layernorm = RMSNorm
        attention.submodules.k_layernorm = RMSNorm
    if attention_backend == "sdpa":
        attention.submodules.core_attention = SDPAttention
    return spec


def _gdn_spec() -> ModuleSpec:
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=HeadSharedRMSNorm, out_proj=RowParallelLinear))


def hybrid_block_spec(config: TransformerConfig, attention_backend: str = "sdpa",
                      vp_stage: Optional[int] = None, transform_layer=None) -> ModuleSpec:
    """The block spec of this pipeline stage (local modules); ``transform_layer`` (e.g. the
    LoRA wrapping) is applied to every layer spec."""
    import copy

    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from nemo_aot.models.gdn_kernels import describe_gdn_kernels, install_gdn_kernels

    report = install_gdn_kernels()
    from nemo_aot.distributed.ranks import is_rank_zero

    if is_rank_zero() and not getattr(hybrid_block_spec, "_logged", False):
        logger.info(describe_gdn_kernels(report))
        hybrid_block_spec._logged = True
    norm = RMSNorm  # zero-centred where config.layernorm_zero_centered_gamma says so
    attention = _attention_spec(config, attention_backend)
    attention.submodules.input_layernorm = norm
    attention.submodules.pre_mlp_layernorm = norm
    linear = copy.deepcopy(attention)
    linear.submodules.self_attention = _gdn_spec()
    if transform_layer is not None:
        attention, linear = transform_layer(attention), transform_layer(linear)
    pattern = list(config.linear_attention_freq)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    layers = [linear if pattern[i] else attention for i in range(offset, offset + count)]
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=layers, layer_norm=norm))


__all__ = ["hybrid_block_spec", "HeadSharedRMSNorm"]

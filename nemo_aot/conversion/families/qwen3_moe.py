"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (query/key norms, its own
head_dim) with a softmax router over ``num_experts`` SwiGLU experts, top-k renormalized when
``norm_topk_prob``. Dense layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1) and a
sliding window are refused (``nemo_aot.conversion.moe``)."""

from __future__ import annotations

from nemo_aot.conversion import moe
from nemo_aot.conversion.families.base import register
from nemo_aot.conversion.families.moe_family import MoEFamilyBase


class Qwen3Moe(MoEFamilyBase):
    hf_classes = ("Qwen3MoeForCausalLM",)
    model_type = "qwen3_moe"
    options = {"qk_layernorm": True}
    experts = moe.QWEN3_MOE
    rope_types = ()


QWEN3_MOE = register(Qwen3Moe())

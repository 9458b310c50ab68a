"""Mixtral (8x7B, 8x22B): Mistral's attention with a softmax router over ``num_local_experts``
SwiGLU experts (``block_sparse_moe``), top-k renormalized. An active sliding window is refused
(``nemo_aot.conversion.moe``)."""

from __future__ import annotations

from nemo_aot.conversion import moe
from nemo_aot.conversion.families.base import register
from nemo_aot.conversion.families.moe_family import MoEFamilyBase


class Mixtral(MoEFamilyBase):
    hf_classes = ("MixtralForCausalLM",)
    model_type = "mixtral"
    experts = moe.MIXTRAL
    rope_types = ()


MIXTRAL = register(Mixtral())

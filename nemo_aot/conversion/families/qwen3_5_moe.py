"""Qwen3.5-MoE (Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5's hybrid layers (Gated DeltaNet
and gated full attention, :mod:`nemo_aot.conversion.families.qwen3_5`) with every layer's MLP a
mixture of experts (transformers' ``Qwen3_5MoeForCausalLM``, model_type ``qwen3_5_moe_text``;
the published checkpoints are the vision-language wrapper ``Qwen3_5MoeForConditionalGeneration``,
model_type ``qwen3_5_moe``).

The MLP (:data:`nemo_aot.conversion.moe.QWEN3_5_MOE`): a softmax router over ``num_experts``
SwiGLU experts of width ``moe_intermediate_size``, top ``num_experts_per_tok`` renormalized (the
router has no ``norm_topk_prob`` switch: always on), plus a shared expert of width
``shared_expert_intermediate_size`` on every token scaled by sigmoid(``shared_expert_gate`` . x).

=========================================  ===============================================
``mlp.gate``                                ``mlp.router``
``mlp.experts.{j}.gate_proj`` + ``up_proj``  ``mlp.experts.local_experts.{j}.linear_fc1``
``mlp.experts.{j}.down_proj``               ``mlp.experts.local_experts.{j}.linear_fc2``
``mlp.shared_expert.gate_proj`` +           ``mlp.shared_experts.linear_fc1``
``up_proj``
``mlp.shared_expert.down_proj``             ``mlp.shared_experts.linear_fc2``
``mlp.shared_expert_gate``                  ``mlp.shared_experts.gate_weight``
=========================================  ===============================================

Experts are read as ``save_pretrained`` writes them (one tensor per expert and projection) or
fused per layer (``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj``
[E, H, I], transformers' in-memory layout); export writes the per-expert tensors. The config has
no ``intermediate_size``: the model's ``ffn_hidden_size`` (used by no MoE layer) is set to the
shared expert's width.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

from nemo_aot.conversion import moe
from nemo_aot.conversion.engine import Mapping
from nemo_aot.conversion.families.base import register
from nemo_aot.conversion.families.qwen3_5 import Qwen35, VisionLanguage
from nemo_aot.models.config import GPTModelConfig


class Qwen35Moe(Qwen35):
    hf_classes = ("Qwen3_5MoeForCausalLM",)
    model_type = "qwen3_5_moe_text"
    options = {**Qwen35.options, "moe_shared_expert_gate": True,
               "moe_router_score_function": "softmax", "moe_router_topk_normalize": True,
               "moe_router_topk_scaling_factor": None}
    variable = ("num_moe_experts",)
    experts = moe.QWEN3_5_MOE

    # -- config
    def mlp_config(self, text: dict, source: str) -> tuple[dict, dict]:
        fields = self.experts.config_fields(text, source)
        return {**text, "intermediate_size": fields["moe_shared_expert_intermediate_size"]}, \
            fields

    def mismatches(self, cfg: GPTModelConfig) -> list[str]:
        out = super().mismatches(cfg)
        if cfg.num_moe_experts is None:
            out.append("num_moe_experts=None (family: a mixture of experts)")
        if cfg.num_moe_experts is not None and cfg.moe_shared_expert_intermediate_size is None:
            out.append("moe_shared_expert_intermediate_size=None (family: a shared expert)")
        return out

    def config_to_hf(self, cfg: GPTModelConfig, torch_dtype: str) -> dict:
        out = super().config_to_hf(cfg, torch_dtype)
        del out["intermediate_size"]  # no dense MLP in this family
        out.update(self.experts.export_fields(cfg))
        return out

    # -- tensors
    fused_experts = False
    """Read each layer's experts fused: ``mlp.experts.gate_up_proj`` [E, 2I, H] (per expert
    [gate; up], megatron's linear_fc1 rows) and ``mlp.experts.down_proj`` [E, H, I], expert
    ``j`` being slice ``j`` of each (import only: export writes per-expert tensors)."""

    def for_checkpoint(self, names: Iterable[str]) -> "Qwen35Moe":
        if not any(n.endswith(".mlp.experts.gate_up_proj") for n in names):
            return self
        fused = copy.copy(self)
        fused.fused_experts = True
        return fused

    def mlp_mappings(self, cfg: GPTModelConfig, hf: str, mc: str) -> list[Mapping]:
        table = self.experts.mappings(cfg.num_moe_experts, hf, mc)
        if not self.fused_experts:
            return table
        out = []
        for m in table:
            if ".local_experts." not in m.mcore:
                out.append(m)
                continue
            j = int(m.mcore.split(".local_experts.")[1].split(".")[0])
            name = "gate_up_proj" if m.kind == "gate_up" else "down_proj"
            out.append(Mapping((f"{hf}mlp.experts.{name}",), m.mcore, "expert", part=j))
        return out

    def mlp_shapes(self, cfg: GPTModelConfig, layer: str) -> dict[str, tuple[int, ...]]:
        shapes = self.experts.shapes(cfg, layer)
        if not self.fused_experts:
            return shapes
        h, f, e = cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.num_moe_experts
        shapes = {k: v for k, v in shapes.items() if ".mlp.experts." not in k}
        shapes.update({layer + "mlp.experts.gate_up_proj": (e, 2 * f, h),
                       layer + "mlp.experts.down_proj": (e, h, f)})
        return shapes


class Qwen35MoeVisionLanguage(VisionLanguage, Qwen35Moe):
    """The published layout: the text model read out of the vision-language wrapper."""

    hf_classes = ("Qwen3_5MoeForConditionalGeneration",)
    model_type = "qwen3_5_moe"
    export_as: Optional[str] = "Qwen3_5MoeForCausalLM"


QWEN3_5_MOE = register(Qwen35Moe())
QWEN3_5_MOE_VL = register(Qwen35MoeVisionLanguage())

"""The shared part of the mixture-of-experts families (Qwen3-MoE, Mixtral): the Llama layout
with every MLP replaced by a router and per-expert SwiGLU tensors, mapped by
``nemo_aot.conversion.moe`` (the tables, config fields and refusals live there)."""

from __future__ import annotations

from nemo_aot.conversion import moe
from nemo_aot.conversion.families.base import Family
from nemo_aot.models.config import GPTModelConfig


class MoEFamilyBase(Family):
    """A registry family over one ``moe.MoEFamily``."""

    experts: moe.MoEFamily
    variable = ("num_moe_experts",)
    specificity = 2

    def config_from_hf(self, hf: dict, source: str) -> GPTModelConfig:
        import dataclasses

        cfg = super().config_from_hf(hf, source)
        cfg = dataclasses.replace(cfg, **self.experts.config_fields(hf, source))
        cfg.validate(prefix=source)
        return cfg

    def config_to_hf(self, cfg: GPTModelConfig, torch_dtype: str) -> dict:
        out = super().config_to_hf(cfg, torch_dtype)
        out.update(self.experts.export_fields(cfg))
        return out

    def mismatches(self, cfg: GPTModelConfig) -> list[str]:
        out = super().mismatches(cfg)
        if cfg.num_moe_experts is None:
            out.append("num_moe_experts=None (family: a mixture of experts)")
        return out

    def mappings(self, cfg: GPTModelConfig):
        return moe.mappings(cfg, self.experts)

    def hf_shapes(self, cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
        return moe.hf_shapes(cfg, self.experts)

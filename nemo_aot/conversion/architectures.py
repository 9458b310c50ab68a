"""Former home of the per-architecture tables, kept for imports: the families now live in
:mod:`nemo_aot.conversion.families`, one file each."""

from __future__ import annotations

from typing import Optional

from nemo_aot.conversion.families import (
    REGISTRY,
    Family,
    family_for_hf,
    family_for_model,
    hf_config_from_model,
    model_config_from_hf,
)
from nemo_aot.conversion.families.llama import LLAMA
from nemo_aot.conversion.families.mistral import MISTRAL
from nemo_aot.conversion.families.qwen2 import QWEN2
from nemo_aot.models.config import GPTModelConfig

Architecture = Family
ARCHITECTURES = REGISTRY
IGNORABLE_SUFFIXES = Family.ignorable_suffixes
architecture_for_hf = family_for_hf


def architecture_for_model(cfg: GPTModelConfig, hf: Optional[dict] = None) -> Family:
    return family_for_model(cfg, hf)


def hf_shapes(cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
    return family_for_model(cfg).hf_shapes(cfg)


__all__ = ["Architecture", "ARCHITECTURES", "LLAMA", "MISTRAL", "QWEN2", "architecture_for_hf",
           "architecture_for_model", "model_config_from_hf", "hf_config_from_model", "hf_shapes",
           "IGNORABLE_SUFFIXES"]

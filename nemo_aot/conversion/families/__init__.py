"""The model families we convert, one file each, found by their Hugging Face class names.

Supported: Llama 2/3/3.x (``llama``), Mistral without an active sliding window (``mistral``),
Qwen2/2.5 (``qwen2``), Qwen3 dense (``qwen3``), Gemma 3 text (``gemma3``: also the text model
of the vision-language ``Gemma3ForConditionalGeneration``), Qwen3.5 (``qwen3_5``), Qwen3.5-MoE
(``qwen3_5_moe``), Qwen3-MoE and Mixtral (``qwen3_moe``, ``mixtral``). The engine
(:mod:`nemo_aot.conversion.engine`, :mod:`nemo_aot.conversion.convert`) never names a family.

Adding a family is one new file in this package plus tests:

1. Subclass :class:`~nemo_aot.conversion.families.base.Family`: its ``hf_classes`` and
   ``model_type``; ``options`` (the GPTModelConfig values that make its architecture, e.g.
   ``qk_layernorm=True``: these also pick the megatron-core spec options the model is built
   with); ``check`` to refuse, by key and value, whatever its configs can say that we cannot
   represent; and, where its layout differs from Llama's, ``config_from_hf`` /
   ``config_to_hf`` / ``mappings`` / ``hf_shapes``.
2. ``register(MyFamily())`` at the bottom of the file. Every module in this package is
   imported here, so nothing else needs editing.
3. Add a tiny random model to ``tests/unit/test_conversion_families.py`` ``FAMILIES``: the
   logits (TP1, TP2, PP2), bitwise round-trip, LoRA/PEFT and score tests pick it up.

A model feature megatron-core lacks belongs in the model's spec options
(:mod:`nemo_aot.models.family_options`), named by a GPTModelConfig field, not in a family file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Optional

from nemo_aot.conversion.families.base import REFUSED, REGISTRY, Family, register
from nemo_aot.models.config import GPTModelConfig

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def family_for_hf(hf: dict, source: str) -> Family:
    """The family of a Hugging Face config.json (its single ``architectures`` entry)."""
    names = hf.get("architectures") or []
    for name in names:
        if name in REFUSED:
            raise ValueError(f"{source}: architectures={names!r} is not supported: "
                             f"{REFUSED[name]}")
    known = [REGISTRY[n] for n in names if n in REGISTRY]
    if len(names) != 1 or not known:
        raise ValueError(f"{source}: architectures={names!r} is not supported; supported are "
                         f"{sorted(REGISTRY)}")
    return known[0]


def family_for_model(cfg: GPTModelConfig, hf: Optional[dict] = None) -> Family:
    """The family to export as: the source checkpoint's when known, else the most specific
    family whose architecture options the config has exactly."""
    if hf is not None:
        return family_for_hf(hf, "stored Hugging Face config")
    fitting = sorted({id(f): f for f in REGISTRY.values() if not f.mismatches(cfg)}.values(),
                     key=lambda f: -f.specificity)
    if not fitting:
        closest = min(set(REGISTRY.values()), key=lambda f: len(f.mismatches(cfg)))
        raise ValueError(f"no Hugging Face family describes this model; closest is "
                         f"{closest.hf_class}, which differs in {closest.mismatches(cfg)}")
    return fitting[0]


def model_config_from_hf(hf: dict, source: str = "config.json"
                         ) -> tuple[Family, GPTModelConfig]:
    """Translate a Hugging Face config.json dict; refuse what we cannot represent exactly."""
    family = family_for_hf(hf, source)
    return family, family.config_from_hf(hf, source)


def hf_config_from_model(cfg: GPTModelConfig, family: Family, torch_dtype: str,
                         token_ids: Optional[dict] = None) -> dict:
    """A config.json dict (transformers 4.x spelling, loaded by 4.x and 5.x) for ``cfg``."""
    wrong = family.mismatches(cfg)
    if wrong:
        raise ValueError(f"exporting as {family.hf_class}: the model does not fit this family: "
                         f"{'; '.join(wrong)}")
    out = family.config_to_hf(cfg, torch_dtype)
    out.update(token_ids or {})
    return out


__all__ = ["Family", "REGISTRY", "register", "family_for_hf", "family_for_model",
           "model_config_from_hf", "hf_config_from_model"]

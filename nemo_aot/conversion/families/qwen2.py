"""Qwen2 / Qwen2.5: the Llama layout with a bias on the Q, K and V projections."""

from __future__ import annotations

from nemo_aot.conversion.families.base import Family, refuse_sliding_window, register


class Qwen2(Family):
    hf_classes = ("Qwen2ForCausalLM",)
    model_type = "qwen2"
    options = {"qkv_bias": True}
    export_fields = {"use_sliding_window": False, "sliding_window": None}

    def check(self, hf: dict, source: str) -> None:
        refuse_sliding_window(hf, source, "use_sliding_window")


QWEN2 = register(Qwen2())

"""Mistral (v0.2/v0.3 and Mistral-Nemo: no active sliding window; head_dim may differ from
hidden/heads). The Llama layout; v0.1's 4096-token sliding window is refused."""

from __future__ import annotations

from nemo_aot.conversion.families.base import Family, refuse_sliding_window, register


class Mistral(Family):
    hf_classes = ("MistralForCausalLM",)
    model_type = "mistral"
    export_fields = {"sliding_window": None}
    specificity = -1  # same architecture as Llama: a model without a source config exports
    # as Llama, never as Mistral

    def check(self, hf: dict, source: str) -> None:
        refuse_sliding_window(hf, source, None)


MISTRAL = register(Mistral())

"""Llama 2, 3, 3.1 (``rope_type: llama3``) and 3.2 (tied embeddings): the reference layout."""

from __future__ import annotations

from nemo_aot.conversion.families.base import Family, refuse, register


class Llama(Family):
    hf_classes = ("LlamaForCausalLM",)
    model_type = "llama"
    export_fields = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    specificity = 0  # the plain architecture: what a model trained from scratch exports as

    def check(self, hf: dict, source: str) -> None:
        if hf.get("attention_bias"):
            refuse(source, "attention_bias", hf["attention_bias"], "Llama with linear-layer "
                   "biases has no megatron mapping here (only Qwen2's QKV bias is supported)")


LLAMA = register(Llama())

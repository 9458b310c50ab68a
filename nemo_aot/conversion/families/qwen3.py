"""Qwen3 (dense): the Llama layout plus an RMSNorm over each query and key head before RoPE
(``q_norm``/``k_norm`` -> megatron's ``q_layernorm``/``k_layernorm``), a head_dim of its own
(128 at every size, so 0.6B/1.7B/4B decouple it from hidden/heads), no QKV bias, tied embeddings
on the small sizes, rope_theta 1e6. YaRN context extension (``rope_scaling.rope_type: yarn``)
and an active sliding window are refused."""

from __future__ import annotations

from nemo_aot.conversion.families.base import Family, refuse, refuse_sliding_window, register


class Qwen3(Family):
    hf_classes = ("Qwen3ForCausalLM",)
    model_type = "qwen3"
    options = {"qk_layernorm": True}
    export_fields = {"attention_bias": False, "use_sliding_window": False,
                     "sliding_window": None}

    def check(self, hf: dict, source: str) -> None:
        if hf.get("attention_bias"):
            refuse(source, "attention_bias", hf["attention_bias"],
                   "Qwen3 has no QKV bias; a checkpoint with one is not a Qwen3 we know")
        refuse_sliding_window(hf, source, "use_sliding_window")


QWEN3 = register(Qwen3())

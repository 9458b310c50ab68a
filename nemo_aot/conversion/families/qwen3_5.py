"""Qwen3.5 dense: hybrid Gated DeltaNet + gated softmax attention (transformers'
``Qwen3_5ForCausalLM``; the published checkpoints are the vision-language wrapper
``Qwen3_5ForConditionalGeneration``).

Architecture (against Llama): per ``layer_types`` (or every ``full_attention_interval``-th
layer) a layer is full attention, the others Gated DeltaNet (megatron-core ``GatedDeltaNet``,
:mod:`nemo_aot.models.hybrid_spec`); full attention has an output gate (``q_proj`` rows are per
head [query; gate]), RMSNorm on each query and key head, and RoPE on the first
``partial_rotary_factor`` (0.25) of the 256-wide heads; every norm but the GDN output norm is
zero-centred (``1 + weight``), stored as is.

Tensors, Hugging Face -> megatron (per layer):

=========================================  ===============================================
``linear_attn.in_proj_qkv/_z/_b/_a``       ``self_attention.in_proj`` (rows stacked in that
                                           order; megatron's checkpoint splits them again)
``linear_attn.conv1d``, ``A_log``,          ``self_attention.conv1d``, ``A_log``, ``dt_bias``
``dt_bias``
``linear_attn.norm`` (plain RMSNorm)        ``self_attention.out_norm``
``linear_attn.out_proj``                    ``self_attention.out_proj``
``self_attn.q_proj`` + ``k_proj`` +         ``self_attention.linear_qkv`` (per group:
``v_proj``                                  queries, gates, key, value)
``self_attn.q_norm``/``k_norm``             ``self_attention.q_layernorm``/``k_layernorm``
=========================================  ===============================================

The vision-language layout keeps the text config under ``text_config`` and the text weights
under ``model.language_model.``. Conversion reads the language model only: the vision tower
(``model.visual.*``) and the multi-token-prediction head (``mtp.*``, which alignment does not
train) are left out, and the conversion logs how many tensors of each it dropped. Export writes
the text-only ``Qwen3_5ForCausalLM`` layout.
"""

from __future__ import annotations

from typing import Optional

from nemo_aot.conversion.engine import Mapping
from nemo_aot.conversion.families.base import (
    Family,
    common_config,
    output_mapping,
    refuse,
    register,
    rope_dict,
)
from nemo_aot.models.config import GPTModelConfig, LinearAttention

_LINEAR_KEYS = ("conv_kernel_dim", "key_head_dim", "value_head_dim", "num_key_heads",
                "num_value_heads")


class Qwen35(Family):
    hf_classes = ("Qwen3_5ForCausalLM",)
    model_type = "qwen3_5_text"
    options = {"qk_layernorm": True, "layernorm_zero_centered_gamma": True,
               "attention_output_gate": True}
    specificity = 3
    legacy_keys = ()
    prefix = "model."
    """Where the language model's tensors live."""
    dropped_prefixes = ("mtp.",)
    """Source tensors read past on purpose (logged): the multi-token-prediction head."""

    # -- config
    def text_config(self, hf: dict, source: str) -> dict:
        return hf

    def config_from_hf(self, hf: dict, source: str) -> GPTModelConfig:
        text = self.text_config(hf, source)
        self.check(text, source)
        theta, rope = rope_dict(text)
        partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor",
                                                                   0.25)))
        layers = int(text.get("num_hidden_layers") or 0)
        types = text.get("layer_types")
        linear = LinearAttention(
            full_attention_interval=int(text.get("full_attention_interval", 4)),
            layer_types=list(types) if types is not None else None,
            **{k: int(text.get(f"linear_{k}", getattr(LinearAttention, k)))
               for k in _LINEAR_KEYS})
        if types is not None and len(types) != layers:
            refuse(source, "layer_types", f"{len(types)} entries", f"num_hidden_layers={layers}")
        text, mlp = self.mlp_config(text, source)
        return common_config(text, source, **{**self.architecture(), **mlp},
                             rotary_base=theta, rotary_percent=partial, linear_attention=linear,
                             share_embeddings_and_output_weights=bool(
                                 hf.get("tie_word_embeddings",
                                        text.get("tie_word_embeddings", False))))

    def mlp_config(self, text: dict, source: str) -> tuple[dict, dict]:
        """(the text config as :func:`common_config` reads it, GPTModelConfig fields of the
        MLP): a dense SwiGLU MLP's width is intermediate_size, read there."""
        return text, {}

    def check(self, hf: dict, source: str) -> None:
        if hf.get("hidden_act", "silu") != "silu":
            refuse(source, "hidden_act", hf["hidden_act"], "Qwen3.5 is converted with silu only")
        if hf.get("attention_bias"):
            refuse(source, "attention_bias", True, "Qwen3.5 attention has no biases")
        if hf.get("quantization_config"):
            refuse(source, "quantization_config", "...", "convert an unquantized checkpoint")
        _, rope = rope_dict(hf)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            refuse(source, "rope_parameters.rope_type", rope_type,
                   "only default RoPE is implemented for Qwen3.5")

    def architecture(self) -> dict:
        arch = super().architecture()
        arch.pop("rotary_percent")  # Qwen3.5 rotates a fraction of each head: read, not fixed
        return arch

    def mismatches(self, cfg: GPTModelConfig) -> list[str]:
        out = super().mismatches(cfg)
        if cfg.linear_attention is None:
            out.append("linear_attention=None (family: Gated DeltaNet layers)")
        return out

    def config_to_hf(self, cfg: GPTModelConfig, torch_dtype: str) -> dict:
        la = cfg.linear_attention
        pattern = la.pattern(cfg.num_layers)
        out = {
            "architectures": [self.hf_class], "model_type": self.model_type,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.query_groups, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.layernorm_epsilon, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                                "partial_rotary_factor": cfg.rotary_percent},
            "layer_types": ["linear_attention" if p else "full_attention" for p in pattern],
            "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
            "initializer_range": cfg.init_method_std, "attention_bias": False,
            "attention_dropout": 0.0, "use_cache": True, "torch_dtype": torch_dtype,
        }
        out.update({f"linear_{k}": getattr(la, k) for k in _LINEAR_KEYS})
        return out

    def mlp_mappings(self, cfg: GPTModelConfig, hf: str, mc: str) -> list[Mapping]:
        """One layer's MLP tensors (``hf``/``mc``: the layer's prefixes)."""
        return [Mapping((hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                        mc + "mlp.linear_fc1.weight", "gate_up"),
                Mapping((hf + "mlp.down_proj.weight",), mc + "mlp.linear_fc2.weight")]

    def mlp_shapes(self, cfg: GPTModelConfig, layer: str) -> dict[str, tuple[int, ...]]:
        """Hugging Face shapes of one layer's MLP (``layer``: the template prefix)."""
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        return {layer + "mlp.gate_proj.weight": (f, h), layer + "mlp.up_proj.weight": (f, h),
                layer + "mlp.down_proj.weight": (h, f)}

    # -- tensors
    def mappings(self, cfg: GPTModelConfig) -> list[Mapping]:
        p = self.prefix
        table = [Mapping((p + "embed_tokens.weight",), "embedding.word_embeddings.weight",
                         "vocab")]
        for i, linear in enumerate(cfg.linear_attention.pattern(cfg.num_layers)):
            hf, mc = f"{p}layers.{i}.", f"decoder.layers.{i}."
            table += [*_layer(hf, mc, bool(linear)), *self.mlp_mappings(cfg, hf, mc)]
        return [*table, Mapping((p + "norm.weight",), "decoder.final_layernorm.weight"),
                output_mapping(cfg)]

    def hf_shapes(self, cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
        la, h, d, p = cfg.linear_attention, cfg.hidden_size, cfg.head_dim, self.prefix
        qk, v = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
        q, kv, L = cfg.num_attention_heads * d, cfg.query_groups * d, p + "layers.{i}."
        return {
            p + "embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
            p + "norm.weight": (h,), L + "input_layernorm.weight": (h,),
            L + "post_attention_layernorm.weight": (h,), **self.mlp_shapes(cfg, L),
            L + "self_attn.q_proj.weight": (2 * q, h), L + "self_attn.k_proj.weight": (kv, h),
            L + "self_attn.v_proj.weight": (kv, h), L + "self_attn.o_proj.weight": (h, q),
            L + "self_attn.q_norm.weight": (d,), L + "self_attn.k_norm.weight": (d,),
            L + "linear_attn.in_proj_qkv.weight": (2 * qk + v, h),
            L + "linear_attn.in_proj_z.weight": (v, h),
            L + "linear_attn.in_proj_b.weight": (la.num_value_heads, h),
            L + "linear_attn.in_proj_a.weight": (la.num_value_heads, h),
            L + "linear_attn.conv1d.weight": (2 * qk + v, 1, la.conv_kernel_dim),
            L + "linear_attn.A_log": (la.num_value_heads,),
            L + "linear_attn.dt_bias": (la.num_value_heads,),
            L + "linear_attn.norm.weight": (la.value_head_dim,),
            L + "linear_attn.out_proj.weight": (h, v),
        }


def _layer(hf: str, mc: str, linear: bool) -> list[Mapping]:
    if linear:
        a, s = hf + "linear_attn.", mc + "self_attention."
        mixer = [
            Mapping(tuple(f"{a}in_proj_{x}.weight" for x in ("qkv", "z", "b", "a")),
                    s + "in_proj.weight", "concat"),
            Mapping((a + "conv1d.weight",), s + "conv1d.weight"),
            Mapping((a + "A_log",), s + "A_log"),
            Mapping((a + "dt_bias",), s + "dt_bias"),
            Mapping((a + "norm.weight",), s + "out_norm.weight"),
            Mapping((a + "out_proj.weight",), s + "out_proj.weight"),
        ]
    else:
        a, s = hf + "self_attn.", mc + "self_attention."
        mixer = [
            Mapping((a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                    s + "linear_qkv.weight", "qkv_gated"),
            Mapping((a + "o_proj.weight",), s + "linear_proj.weight"),
            Mapping((a + "q_norm.weight",), s + "q_layernorm.weight"),
            Mapping((a + "k_norm.weight",), s + "k_layernorm.weight"),
        ]
    return [
        Mapping((hf + "input_layernorm.weight",), mc + "input_layernorm.weight"),
        *mixer,
        Mapping((hf + "post_attention_layernorm.weight",), mc + "pre_mlp_layernorm.weight"),
    ]


class VisionLanguage:
    """Mixin of the published layouts: the text model read out of the vision-language wrapper
    (settings under ``text_config``, weights under ``model.language_model.``), exported as the
    text-only class ``export_as``."""

    prefix = "model.language_model."
    dropped_prefixes = ("model.visual.", "mtp.")

    def text_config(self, hf: dict, source: str) -> dict:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{source}: {self.hf_class} needs a text_config section")
        return text


class Qwen35VisionLanguage(VisionLanguage, Qwen35):
    """The published layout: the text model read out of the vision-language wrapper."""

    hf_classes = ("Qwen3_5ForConditionalGeneration",)
    model_type = "qwen3_5"
    export_as: Optional[str] = "Qwen3_5ForCausalLM"


QWEN3_5 = register(Qwen35())
QWEN3_5_VL = register(Qwen35VisionLanguage())

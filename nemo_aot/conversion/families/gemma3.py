"""Gemma 3 text (``Gemma3ForCausalLM``: 1B, and the text towers' layout of 4B/12B/27B).

Differences from Llama, each a GPTModelConfig option the model is built with:

* RMSNorm scales by ``(1 + w)``: megatron's ``layernorm_zero_centered_gamma``, so the stored
  weight maps unchanged (bitwise round trip; adding 1 at conversion would round in bf16) and
  TE's fused norms apply it natively. Our local RMSNorm does it in fp32 as Gemma does.
* four norms per layer: ``input_layernorm``; ``post_attention_layernorm`` on the attention
  output (``linear_proj.post_layernorm``); ``pre_feedforward_layernorm`` (megatron's
  ``pre_mlp_layernorm``); ``post_feedforward_layernorm`` (``linear_fc2.post_layernorm``).
* QK norm (``q_norm``/``k_norm``), GeGLU with tanh-approximate GELU, the sqrt(hidden) input
  embedding scale, tied embeddings, softmax scale ``query_pre_attn_scalar**-0.5``.
* interleaved attention: ``layer_types`` (or the older ``sliding_window_pattern`` N: every
  N-th layer global) with ``sliding_window``; global layers use ``rope_theta`` and the linear
  ``rope_scaling`` (factor 8 on 4B+), sliding ones ``rope_local_base_freq`` unscaled. Read from
  4.x keys or 5.x's per-layer-type ``rope_parameters``.

Refused: logit soft-capping (``final_logit_softcapping``/``attn_logit_softcapping``, null in
every Gemma 3 release), bidirectional attention, attention biases, layer_types that no single
period N describes. Gemma 2 (soft-capping in every layer and at the output, which the fused
log-prob path and SDPA do not express) and the vision-language
``Gemma3ForConditionalGeneration`` are refused by name.
"""

from __future__ import annotations

import math
from typing import Optional

from nemo_aot.conversion.engine import Mapping
from nemo_aot.conversion.families.base import (
    ATTENTION,
    EMBEDDING,
    FINAL_NORM,
    MLP,
    QK_NORMS,
    REFUSED,
    Family,
    L,
    M,
    common_config,
    common_hf_config,
    llama_shapes,
    output_mapping,
    refuse,
    refuse_common,
    register,
    require,
    rope_scaling,
)
from nemo_aot.models.config import GPTModelConfig

ACTIVATION = "gelu_pytorch_tanh"
NORMS = (
    Mapping((L + "input_layernorm.weight",), M + "input_layernorm.weight"),
    Mapping((L + "post_attention_layernorm.weight",),
            M + "self_attention.linear_proj.post_layernorm.weight"),
    Mapping((L + "pre_feedforward_layernorm.weight",), M + "pre_mlp_layernorm.weight"),
    Mapping((L + "post_feedforward_layernorm.weight",), M + "mlp.linear_fc2.post_layernorm.weight"),
)


def skip_freq(layer_types: list, source: str) -> Optional[int]:
    """megatron's window_attn_skip_freq N for Hugging Face layer_types (layer i, from 0, is
    global iff (i + 1) % N == 0); None when every layer slides."""
    kinds = set(layer_types)
    if not kinds <= {"sliding_attention", "full_attention"}:
        refuse(source, "layer_types", sorted(kinds), "only sliding_attention and "
               "full_attention layers exist in Gemma 3")
    if "full_attention" not in kinds:
        return None
    n = layer_types.index("full_attention") + 1
    expected = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                for i in range(len(layer_types))]
    if layer_types != expected or n < 2:
        refuse(source, "layer_types", layer_types, "only a periodic pattern (every N-th layer "
               "global, N >= 2, as sliding_window_pattern describes) is represented")
    return n


def _rope(hf: dict, source: str):
    """(global theta, global scaling, local theta) from 5.x per-layer-type rope_parameters or
    4.x rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            refuse(source, "rope_parameters.sliding_attention.rope_type", local["rope_type"],
                   "Gemma 3's sliding layers use unscaled RoPE")
        return (float(full.get("rope_theta", 1e6)),
                rope_scaling(full, source, "rope_parameters.full_attention", ("linear",)),
                float(local.get("rope_theta", 1e4)))
    if params:  # one flat dict: the global layers' (a 5.x config of another shape)
        scaling, theta = params, params.get("rope_theta", hf.get("rope_theta", 1e6))
    else:
        scaling, theta = dict(hf.get("rope_scaling") or {}), hf.get("rope_theta", 1e6)
    return (float(theta), rope_scaling(scaling, source, allowed=("linear",)),
            float(hf.get("rope_local_base_freq", 1e4)))


class Gemma3(Family):
    hf_classes = ("Gemma3ForCausalLM",)
    model_type = "gemma3_text"
    options = {"qk_layernorm": True, "layernorm_zero_centered_gamma": True,
               "post_sublayer_norms": True, "scale_embeddings": True, "activation": "geglu"}
    variable = ("softmax_scale", "sliding_window", "window_attn_skip_freq",
                "rotary_base_local")
    rope_types = ("linear",)
    legacy_keys = ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern")

    def check(self, hf: dict, source: str) -> None:
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if hf.get(key) is not None:
                refuse(source, key, hf[key], "logit soft-capping is not implemented (Gemma 3 "
                       "releases set it to null)")
        for key in ("use_bidirectional_attention", "attention_bias"):
            if hf.get(key):
                refuse(source, key, hf[key], "not part of the Gemma 3 causal LM converted here")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or ACTIVATION
        if act != ACTIVATION:
            refuse(source, "hidden_activation", act, f"Gemma 3 uses {ACTIVATION} (GeGLU)")

    def config_from_hf(self, hf: dict, source: str) -> GPTModelConfig:
        refuse_common({k: v for k, v in hf.items() if k != "hidden_act"}, source)
        self.check(hf, source)
        theta, scaling, local_theta = _rope(hf, source)
        layers = int(require(hf, "num_hidden_layers", source))
        types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6))
            else "full_attention" for i in range(layers)]
        if len(types) != layers:
            refuse(source, "layer_types", types, f"needs one entry per layer ({layers})")
        window = hf.get("sliding_window")
        sliding = window is not None and "sliding_attention" in types
        return common_config(
            hf, source, **self.architecture(), rotary_base=theta, rope_scaling=scaling,
            share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)),
            softmax_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
            sliding_window=int(window) if sliding else None,
            window_attn_skip_freq=skip_freq(types, source) if sliding else None,
            rotary_base_local=local_theta if sliding else None)

    def config_to_hf(self, cfg: GPTModelConfig, torch_dtype: str) -> dict:
        out = common_hf_config(cfg, self, torch_dtype)
        scale = cfg.softmax_scale or cfg.head_dim ** -0.5
        scalar = scale ** -2
        n, layers = cfg.window_attn_skip_freq, cfg.num_layers
        sliding = cfg.sliding_window is not None
        types = ["sliding_attention" if sliding and (n is None or (i + 1) % n) else
                 "full_attention" for i in range(layers)]
        out.update(
            hidden_activation=ACTIVATION, attention_bias=False,
            query_pre_attn_scalar=round(scalar) if math.isclose(scalar, round(scalar))
            else scalar,
            sliding_window=cfg.sliding_window, layer_types=types,
            sliding_window_pattern=n if n is not None else (layers + 1 if sliding else 1),
            rope_local_base_freq=(cfg.rotary_base_local if cfg.rotary_base_local is not None
                                  else cfg.rotary_base),
            final_logit_softcapping=None, attn_logit_softcapping=None)
        return out

    def mappings(self, cfg: GPTModelConfig) -> list[Mapping]:
        return [EMBEDDING, FINAL_NORM, *NORMS, *ATTENTION, *QK_NORMS, *MLP, output_mapping(cfg)]

    def hf_shapes(self, cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
        h = cfg.hidden_size
        return {**llama_shapes(cfg), L + "pre_feedforward_layernorm.weight": (h,),
                L + "post_feedforward_layernorm.weight": (h,)}


GEMMA3 = register(Gemma3())
REFUSED["Gemma3ForConditionalGeneration"] = (
    "the vision-language Gemma 3 is not converted; convert a text-only Gemma3ForCausalLM "
    "checkpoint (e.g. google/gemma-3-1b-it)")
REFUSED["Gemma2ForCausalLM"] = (
    "Gemma 2 soft-caps attention and output logits (attn_logit_softcapping, "
    "final_logit_softcapping), which this package's SDPA attention and fused log-probs do not "
    "express; Gemma 3 (Gemma3ForCausalLM) is supported")

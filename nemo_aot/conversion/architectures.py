"""Per-architecture tables: Hugging Face config <-> GPTModelConfig, and tensor name mappings.

Supported: ``LlamaForCausalLM`` (Llama 2, 3, 3.1 with ``rope_type: llama3``, 3.2 with tied
embeddings), ``MistralForCausalLM`` (without an active sliding window) and ``Qwen2ForCausalLM``
(Qwen2 / Qwen2.5: QKV bias). All three share one tensor layout; they differ in which config
fields exist and which values we can represent. Anything we cannot represent exactly is refused
with a ValueError naming the field, never silently dropped.

Both Hugging Face config spellings are read: transformers 4.x (``rope_theta`` + ``rope_scaling``,
``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``). Exported configs use the 4.x spelling,
which both major versions load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from nemo_aot.conversion.engine import Mapping
from nemo_aot.models.config import GPTModelConfig, RopeScaling

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."

# One table serves all three families; Qwen2 adds the QKV bias rows.
_BASE_TABLE = (
    Mapping(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab"),
    Mapping(("model.norm.weight",), "decoder.final_layernorm.weight"),
    Mapping((_L + "input_layernorm.weight",), _M + "input_layernorm.weight"),
    Mapping((_L + "post_attention_layernorm.weight",), _M + "pre_mlp_layernorm.weight"),
    Mapping((_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
             _L + "self_attn.v_proj.weight"), _M + "self_attention.linear_qkv.weight", "qkv"),
    Mapping((_L + "self_attn.o_proj.weight",), _M + "self_attention.linear_proj.weight"),
    Mapping((_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
            _M + "mlp.linear_fc1.weight", "gate_up"),
    Mapping((_L + "mlp.down_proj.weight",), _M + "mlp.linear_fc2.weight"),
)
_OUTPUT = Mapping(("lm_head.weight",), "output_layer.weight", "vocab")
# With tied embeddings some checkpoints still store lm_head: it must equal the embedding.
_TIED_OUTPUT = Mapping(("lm_head.weight",), "embedding.word_embeddings.weight", "tied")
_QKV_BIAS = Mapping((_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias",
                     _L + "self_attn.v_proj.bias"), _M + "self_attention.linear_qkv.bias", "qkv")
# Derived buffers that older checkpoints carry; they hold no learned state.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


def _refuse(source: str, key: str, value: Any, why: str) -> None:
    raise ValueError(f"{source}: {key}={value!r} is not supported: {why}")


def _check_llama(hf: dict, source: str) -> None:
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            _refuse(source, key, hf[key], "Llama with linear-layer biases has no megatron "
                    "mapping here (only Qwen2's QKV bias is supported)")


def _check_sliding_window(hf: dict, source: str, flag: Optional[str]) -> None:
    window = hf.get("sliding_window")
    enabled = hf.get(flag, False) if flag else window is not None
    longest = hf.get("max_position_embeddings") or 0
    if enabled and window is not None and window < longest:
        _refuse(source, "sliding_window", window,
                f"sliding-window attention shorter than max_position_embeddings={longest} is "
                "not implemented; use a checkpoint whose sliding_window is null (e.g. "
                "Mistral-7B v0.2/v0.3)")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        _refuse(source, "layer_types", sorted(kinds), "only full attention layers are supported")


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face model class we convert to and from."""

    hf_class: str
    model_type: str
    qkv_bias: bool
    check: Callable[[dict, str], None]
    export_fields: dict = field(default_factory=dict)
    """Family-specific config.json fields written on export (all 'off')."""

    def mappings(self, cfg: GPTModelConfig) -> list[Mapping]:
        table = list(_BASE_TABLE)
        if self.qkv_bias:
            table.append(_QKV_BIAS)
        table.append(_TIED_OUTPUT if cfg.share_embeddings_and_output_weights else _OUTPUT)
        return table


LLAMA = Architecture("LlamaForCausalLM", "llama", False, _check_llama,
                     {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
MISTRAL = Architecture("MistralForCausalLM", "mistral", False,
                       lambda hf, src: _check_sliding_window(hf, src, None),
                       {"sliding_window": None})
QWEN2 = Architecture("Qwen2ForCausalLM", "qwen2", True,
                     lambda hf, src: _check_sliding_window(hf, src, "use_sliding_window"),
                     {"use_sliding_window": False, "sliding_window": None})
ARCHITECTURES = {a.hf_class: a for a in (LLAMA, MISTRAL, QWEN2)}


def architecture_for_hf(hf: dict, source: str) -> Architecture:
    names = hf.get("architectures") or []
    known = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if len(names) != 1 or not known:
        raise ValueError(f"{source}: architectures={names!r} is not supported; supported are "
                         f"{sorted(ARCHITECTURES)}")
    return known[0]


def _require(hf: dict, key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return hf[key]


def _rope(hf: dict, source: str) -> tuple[float, Optional[RopeScaling]]:
    params = dict(hf.get("rope_parameters") or {})  # transformers 5.x
    scaling = params or dict(hf.get("rope_scaling") or {})  # 4.x: theta lives outside
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        _refuse(source, "rope_scaling.rope_type", rope_type,
                "only 'default' and 'llama3' (Llama 3.1-style) RoPE are implemented; "
                "yarn/dynamic/linear/longrope scaling would silently change the model")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling lacks {missing}")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def model_config_from_hf(hf: dict, source: str = "config.json"
                         ) -> tuple[Architecture, GPTModelConfig]:
    """Translate a Hugging Face config.json dict; refuse what we cannot represent exactly."""
    arch = architecture_for_hf(hf, source)
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", hf["hidden_act"], "only SiLU (SwiGLU MLP) is supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(source, "partial_rotary_factor", hf["partial_rotary_factor"],
                "partial RoPE is not part of these families")
    if hf.get("quantization_config"):
        _refuse(source, "quantization_config", "...", "convert an unquantized checkpoint")
    arch.check(hf, source)
    theta, scaling = _rope(hf, source)
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    head_dim = hf.get("head_dim") or hidden // heads
    max_pos = int(_require(hf, "max_position_embeddings", source))
    cfg = GPTModelConfig(
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(hf, "intermediate_size", source)),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        vocab_size=int(_require(hf, "vocab_size", source)),
        encoder_seq_length=max_pos,
        max_position_embeddings=max_pos,
        rotary_base=theta,
        rope_scaling=scaling,
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=arch.qkv_bias,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    cfg.validate(prefix=source)
    return arch, cfg


def architecture_for_model(cfg: GPTModelConfig, hf: Optional[dict] = None) -> Architecture:
    """The family to export as: the source checkpoint's when known, else from the config."""
    if hf is not None:
        return architecture_for_hf(hf, "stored Hugging Face config")
    return QWEN2 if cfg.qkv_bias else LLAMA


def hf_config_from_model(cfg: GPTModelConfig, arch: Architecture, torch_dtype: str,
                         token_ids: Optional[dict] = None) -> dict:
    """A config.json dict (transformers 4.x spelling, loaded by 4.x and 5.x) for ``cfg``."""
    where = f"exporting as {arch.hf_class}"
    if cfg.qkv_bias != arch.qkv_bias:
        _refuse(where, "qkv_bias", cfg.qkv_bias, f"{arch.hf_class} has qkv_bias={arch.qkv_bias}")
    if cfg.bias:
        _refuse(where, "bias", cfg.bias, "these families have no bias on the other linears")
    if cfg.rotary_percent != 1.0:
        _refuse(where, "rotary_percent", cfg.rotary_percent, "partial RoPE is not supported")
    scaling = None
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                   "high_freq_factor": r.high_freq_factor,
                   "original_max_position_embeddings": r.original_max_position_embeddings}
    out = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.layernorm_epsilon, "rope_theta": cfg.rotary_base,
        "rope_scaling": scaling, "hidden_act": "silu",
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "initializer_range": cfg.init_method_std, "attention_dropout": 0.0,
        "use_cache": True, "torch_dtype": torch_dtype,
    }
    out.update(arch.export_fields)
    out.update(token_ids or {})
    return out


def hf_shapes(cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected Hugging Face tensor shapes, by name template ("{i}" = layer index)."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    return {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        _L + "input_layernorm.weight": (h,), _L + "post_attention_layernorm.weight": (h,),
        _L + "self_attn.q_proj.weight": (q, h), _L + "self_attn.k_proj.weight": (kv, h),
        _L + "self_attn.v_proj.weight": (kv, h), _L + "self_attn.q_proj.bias": (q,),
        _L + "self_attn.k_proj.bias": (kv,), _L + "self_attn.v_proj.bias": (kv,),
        _L + "self_attn.o_proj.weight": (h, q), _L + "mlp.gate_proj.weight": (f, h),
        _L + "mlp.up_proj.weight": (f, h), _L + "mlp.down_proj.weight": (h, f),
    }


__all__ = ["Architecture", "ARCHITECTURES", "LLAMA", "MISTRAL", "QWEN2", "architecture_for_hf",
           "architecture_for_model", "model_config_from_hf", "hf_config_from_model", "hf_shapes",
           "IGNORABLE_SUFFIXES"]

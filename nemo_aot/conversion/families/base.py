"""What every family file builds on: the :class:`Family` contract, the registry, and the parts
the Llama-style families share (tensor table, config fields, RoPE reading, refusals).

A family translates both ways and refuses, by key and value, what it cannot represent exactly:
nothing a checkpoint says is dropped silently. Both Hugging Face config spellings are read:
transformers 4.x (``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and 5.x
(``rope_parameters``, ``dtype``). Generated configs use the 4.x spelling, which both load.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from nemo_aot.conversion.engine import Mapping
from nemo_aot.models.config import GPTModelConfig, RopeScaling

L = "model.layers.{i}."
"""Hugging Face layer prefix; ``{i}`` is the layer index."""
M = "decoder.layers.{i}."
"""megatron-core layer prefix."""

EMBEDDING = Mapping(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab")
FINAL_NORM = Mapping(("model.norm.weight",), "decoder.final_layernorm.weight")
ATTENTION = (
    Mapping((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight",
             L + "self_attn.v_proj.weight"), M + "self_attention.linear_qkv.weight", "qkv"),
    Mapping((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight"),
)
MLP = (
    Mapping((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
            M + "mlp.linear_fc1.weight", "gate_up"),
    Mapping((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight"),
)
LLAMA_NORMS = (
    Mapping((L + "input_layernorm.weight",), M + "input_layernorm.weight"),
    Mapping((L + "post_attention_layernorm.weight",), M + "pre_mlp_layernorm.weight"),
)
QKV_BIAS = Mapping((L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias",
                    L + "self_attn.v_proj.bias"), M + "self_attention.linear_qkv.bias", "qkv")
QK_NORMS = (
    Mapping((L + "self_attn.q_norm.weight",), M + "self_attention.q_layernorm.weight"),
    Mapping((L + "self_attn.k_norm.weight",), M + "self_attention.k_layernorm.weight"),
)
OUTPUT = Mapping(("lm_head.weight",), "output_layer.weight", "vocab")
# With tied embeddings some checkpoints still store lm_head: it must equal the embedding.
TIED_OUTPUT = Mapping(("lm_head.weight",), "embedding.word_embeddings.weight", "tied")


def output_mapping(cfg: GPTModelConfig) -> Mapping:
    return TIED_OUTPUT if cfg.share_embeddings_and_output_weights else OUTPUT


def llama_shapes(cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor shapes of the Llama layout (plus QKV bias and per-head QK norms)."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.query_groups * d
    return {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        L + "input_layernorm.weight": (h,), L + "post_attention_layernorm.weight": (h,),
        L + "self_attn.q_proj.weight": (q, h), L + "self_attn.k_proj.weight": (kv, h),
        L + "self_attn.v_proj.weight": (kv, h), L + "self_attn.q_proj.bias": (q,),
        L + "self_attn.k_proj.bias": (kv,), L + "self_attn.v_proj.bias": (kv,),
        L + "self_attn.o_proj.weight": (h, q), L + "mlp.gate_proj.weight": (f, h),
        L + "mlp.up_proj.weight": (f, h), L + "mlp.down_proj.weight": (h, f),
        L + "self_attn.q_norm.weight": (d,), L + "self_attn.k_norm.weight": (d,),
    }


# ----------------------------------------------------------------------------- refusals
def refuse(source: str, key: str, value: Any, why: str) -> None:
    raise ValueError(f"{source}: {key}={value!r} is not supported: {why}")


def require(hf: dict, key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{source}: required field {key!r} is missing")
    return hf[key]


def refuse_common(hf: dict, source: str, act_key: str = "hidden_act",
                  activation: str = "silu") -> None:
    """What no family here represents: another activation, partial RoPE, quantized weights,
    biases on the linear layers (each family states its QKV bias itself)."""
    if hf.get(act_key, activation) != activation:
        refuse(source, act_key, hf[act_key], f"this family is converted with {activation} only")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse(source, "partial_rotary_factor", hf["partial_rotary_factor"],
               "partial RoPE is not part of these families")
    if hf.get("quantization_config"):
        refuse(source, "quantization_config", "...", "convert an unquantized checkpoint")
    if hf.get("mlp_bias"):
        refuse(source, "mlp_bias", hf["mlp_bias"], "MLP biases have no mapping here")


def refuse_sliding_window(hf: dict, source: str, flag: Optional[str]) -> None:
    """Families whose checkpoints may carry a sliding window that we do not represent (Mistral
    v0.1, Qwen2/Qwen3 with use_sliding_window): refuse an active one."""
    window = hf.get("sliding_window")
    enabled = hf.get(flag, False) if flag else window is not None
    longest = hf.get("max_position_embeddings") or 0
    if enabled and window is not None and window < longest:
        refuse(source, "sliding_window", window,
               f"sliding-window attention shorter than max_position_embeddings={longest} is "
               "not implemented for this family; use a checkpoint whose sliding_window is null "
               "(e.g. Mistral-7B v0.2/v0.3) or whose use_sliding_window is false")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        refuse(source, "layer_types", sorted(kinds), "only full attention layers are supported "
               "for this family")


# ----------------------------------------------------------------------------- RoPE
def rope_dict(hf: dict) -> tuple[float, dict]:
    """(theta, scaling dict) from either spelling: 5.x ``rope_parameters`` holds both, 4.x has
    ``rope_theta`` next to ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = params or dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), scaling


def rope_scaling(scaling: dict, source: str, key: str = "rope_scaling",
                 allowed: tuple[str, ...] = ("llama3",)) -> Optional[RopeScaling]:
    """The RopeScaling a Hugging Face scaling dict describes, or a refusal naming its type."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in allowed:
        refuse(source, f"{key}.rope_type", rope_type,
               f"only 'default' and {list(allowed)} RoPE are implemented for this family; "
               "other scalings (yarn/dynamic/longrope...) would silently change the model")
    if rope_type == "linear":
        if scaling.get("factor") is None:
            raise ValueError(f"{source}: linear rope scaling lacks 'factor'")
        return RopeScaling(factor=float(scaling["factor"]), rope_type="linear")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling lacks {missing}")
    return RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def rope_scaling_to_hf(scaling: Optional[RopeScaling]) -> Optional[dict]:
    if scaling is None:
        return None
    if scaling.rope_type == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {"rope_type": "llama3", "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


# ----------------------------------------------------------------------------- config fields
def common_config(hf: dict, source: str, **family: Any) -> GPTModelConfig:
    """A GPTModelConfig from the fields every family spells alike; ``family`` adds or overrides
    (rotary_base, rope_scaling, qkv_bias, qk_layernorm, ...). Validated."""
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    head_dim = hf.get("head_dim") or hidden // heads
    max_pos = int(require(hf, "max_position_embeddings", source))
    values = dict(
        num_layers=int(require(hf, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(require(hf, "intermediate_size", source)),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        vocab_size=int(require(hf, "vocab_size", source)),
        encoder_seq_length=max_pos,
        max_position_embeddings=max_pos,
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    values.update(family)
    cfg = GPTModelConfig(**values)
    cfg.validate(prefix=source)
    return cfg


def common_hf_config(cfg: GPTModelConfig, family: "Family", torch_dtype: str) -> dict:
    """The config.json fields every family spells alike (4.x spelling)."""
    return {
        "architectures": [family.hf_class], "model_type": family.model_type,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.layernorm_epsilon, "rope_theta": cfg.rotary_base,
        "rope_scaling": rope_scaling_to_hf(cfg.rope_scaling),
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "initializer_range": cfg.init_method_std, "attention_dropout": 0.0,
        "use_cache": True, "torch_dtype": torch_dtype,
    }


# ----------------------------------------------------------------------------- the contract
LLAMA_DEFAULTS = dict(qkv_bias=False, qk_layernorm=False, layernorm_zero_centered_gamma=False,
                      post_sublayer_norms=False, scale_embeddings=False, softmax_scale=None,
                      sliding_window=None, window_attn_skip_freq=None, rotary_base_local=None,
                      activation="swiglu", bias=False, rotary_percent=1.0,
                      num_moe_experts=None)
"""The model options of the plain Llama architecture; a family states where it differs."""


class Family:
    """One Hugging Face model family. Subclass, set the class attributes, override what differs
    from the Llama layout, and ``register`` one instance at the bottom of the family's file."""

    hf_classes: tuple[str, ...] = ()
    """Hugging Face ``architectures`` names read; the first is the one exported."""
    model_type: str = ""
    """config.json ``model_type`` written on export."""
    options: dict = {}
    """GPTModelConfig values that define this family's architecture (beyond LLAMA_DEFAULTS).
    A model exports as this family only when its config has exactly these values."""
    variable: tuple[str, ...] = ()
    """LLAMA_DEFAULTS keys this family reads per checkpoint (not fixed by the family)."""
    export_fields: dict = {}
    """Family-specific config.json fields written on export."""
    ignorable_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)
    """Source tensors that hold no learned state (derived buffers older checkpoints carry)."""
    dropped_prefixes: tuple[str, ...] = ()
    """Source tensors left out on purpose (e.g. a vision tower): read past and logged."""
    export_as: Optional[str] = None
    """Another registered class to export as (a wrapper layout read for its text model)."""
    specificity: int = 1
    """Among families whose options fit a model, the most specific exports it (Llama is 0)."""
    legacy_keys: tuple[str, ...] = ("rope_theta", "rope_scaling")
    """Generated 4.x-spelling keys added to a stored 5.x config on export (4.x reads only
    those)."""
    rope_types: tuple[str, ...] = ("llama3",)
    """RoPE scalings besides 'default' that this family's configs may carry."""

    @property
    def hf_class(self) -> str:
        return self.hf_classes[0]

    # -- config.json -> GPTModelConfig and back
    def config_from_hf(self, hf: dict, source: str) -> GPTModelConfig:
        """The model config a Hugging Face config.json describes; refuse what does not fit."""
        refuse_common(hf, source)
        self.check(hf, source)
        theta, scaling = rope_dict(hf)
        return common_config(hf, source, **self.architecture(), rotary_base=theta,
                             rope_scaling=rope_scaling(scaling, source, allowed=self.rope_types))

    def check(self, hf: dict, source: str) -> None:
        """Family-specific refusals (by key and value)."""

    def architecture(self) -> dict:
        """The fixed GPTModelConfig values of this family."""
        fixed = {**LLAMA_DEFAULTS, **self.options}
        return {k: v for k, v in fixed.items() if k not in self.variable}

    def config_to_hf(self, cfg: GPTModelConfig, torch_dtype: str) -> dict:
        """A config.json dict (4.x spelling) for ``cfg``, which ``describes`` accepted."""
        out = common_hf_config(cfg, self, torch_dtype)
        out["hidden_act"] = "silu"
        out.update(self.export_fields)
        return out

    def mismatches(self, cfg: GPTModelConfig) -> list[str]:
        """The architecture keys in which ``cfg`` differs from this family ([] = it fits)."""
        want = self.architecture()
        out = [f"{k}={getattr(cfg, k)!r} (family: {v!r})" for k, v in want.items()
               if getattr(cfg, k) != v]
        if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type not in self.rope_types:
            out.append(f"rope_scaling.rope_type={cfg.rope_scaling.rope_type!r} (family: "
                       f"{list(self.rope_types)})")
        return out

    # -- tensors
    def for_checkpoint(self, names: Iterable[str]) -> "Family":
        """This family as it reads a checkpoint holding these tensor names (a layout spelled
        more than one way picks its spelling here)."""
        return self

    def mappings(self, cfg: GPTModelConfig) -> list[Mapping]:
        """Hugging Face <-> megatron tensors; ``{i}`` rows repeat per layer."""
        table = [EMBEDDING, FINAL_NORM, *LLAMA_NORMS, *ATTENTION, *MLP]
        if cfg.qkv_bias:
            table.append(QKV_BIAS)
        if cfg.qk_layernorm:
            table.extend(QK_NORMS)
        return [*table, output_mapping(cfg)]

    def hf_shapes(self, cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
        """Expected Hugging Face tensor shapes by name template ("{i}" = layer index)."""
        return llama_shapes(cfg)


REGISTRY: dict[str, Family] = {}
"""Hugging Face class name -> family; filled by the family files as they are imported."""
REFUSED: dict[str, str] = {}
"""Hugging Face class name -> why it is not converted (a known class, named in the error)."""


def register(family: Family) -> Family:
    for name in family.hf_classes:
        if name in REGISTRY:
            raise RuntimeError(f"{name} is registered twice ({type(REGISTRY[name]).__name__}, "
                               f"{type(family).__name__})")
        REGISTRY[name] = family
    return family


__all__ = ["Family", "REGISTRY", "REFUSED", "register", "refuse", "require", "refuse_common",
           "refuse_sliding_window", "rope_dict", "rope_scaling", "rope_scaling_to_hf",
           "common_config", "common_hf_config", "llama_shapes", "output_mapping", "L", "M",
           "LLAMA_DEFAULTS"]

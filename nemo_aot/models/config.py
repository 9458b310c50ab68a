"""Model architecture config for Llama-family GPT models, and its megatron-core translation.

One typed record describes the architecture (the keys follow NeMo's MegatronGPTModel
``model_config.yaml`` so `.nemo` files stay readable by NeMo tooling); parallel layout and
precision come from :class:`nemo_aot.distributed.parallel.ParallelConfig` and are combined only
when the megatron ``TransformerConfig`` is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = {
    "swiglu": torch.nn.functional.silu,  # gated SiLU (Llama, Mistral, Qwen)
    "geglu": functools.partial(torch.nn.functional.gelu, approximate="tanh"),  # Gemma
}
"""Gated MLP activations by config name: act(gate) * up."""


@dataclass
class RopeScaling:
    """RoPE frequency scaling: Llama-3.1-style (``rope_type: llama3`` in Hugging Face configs),
    or linear position interpolation (``linear``: every frequency divided by ``factor``; Gemma 3's
    global layers). It applies to the layers that use ``rotary_base``."""

    factor: float = 8.0
    """Wavelength scale (llama3: of the low-frequency band; linear: of every frequency)."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the base model was pretrained at."""
    rope_type: str = "llama3"
    """'llama3' or 'linear' (only ``factor`` counts)."""


@dataclass
class GPTModelConfig:
    """Architecture of a decoder-only model: the Llama layout (Llama 2/3/3.x, Mistral, Qwen2)
    plus the options of newer families (Qwen3, Gemma 3), each off by default."""

    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """Width of the SwiGLU MLP (per branch)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None means multi-head attention (= num_attention_heads)."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (before padding for tensor parallelism)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding table is padded to a multiple of this times the TP size."""
    encoder_seq_length: int = 256
    """Longest sequence the model is trained on."""
    max_position_embeddings: int = 256
    """Longest sequence the position encoding supports."""
    position_embedding_type: str = "rope"
    """Only 'rope' is supported (the Llama family)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rotary_percent: float = 1.0
    """Fraction of the head dimension that is rotated."""
    rope_scaling: Optional[RopeScaling] = None
    """Llama-3.1-style frequency scaling, or None."""
    normalization: str = "RMSNorm"
    """'RMSNorm' (Llama family)."""
    layernorm_epsilon: float = 1e-5
    """Norm epsilon (HF rms_norm_eps)."""
    activation: str = "swiglu"
    """'swiglu' (gated SiLU MLP) or 'geglu' (gated tanh-approximate GELU, Gemma)."""
    bias: bool = False
    """Bias on the linear layers other than QKV."""
    qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2)."""
    # -- options of newer families (Qwen3, Gemma 3); the defaults are the Llama architecture
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)."""
    layernorm_zero_centered_gamma: bool = False
    """Every norm scales by (1 + weight), the stored weight being the offset from 1 (Gemma)."""
    post_sublayer_norms: bool = False
    """A norm on the attention output and one on the MLP output, each before its residual add
    (Gemma 2/3: post_attention_layernorm, post_feedforward_layernorm)."""
    scale_embeddings: bool = False
    """Multiply the input embeddings by sqrt(hidden_size), rounded to the parameter dtype
    (Gemma); the tied output layer uses the unscaled table."""
    softmax_scale: Optional[float] = None
    """Attention logit scale; None is 1/sqrt(head_dim) (Gemma: query_pre_attn_scalar**-0.5)."""
    sliding_window: Optional[int] = None
    """Sliding-window attention: a token attends to itself and the sliding_window - 1 tokens
    before it (Hugging Face's sliding_window); None is full causal attention everywhere."""
    window_attn_skip_freq: Optional[int] = None
    """With sliding_window: layers N, 2N, ... (1-based) attend globally, the others slide
    (Gemma 3: 6, its sliding_window_pattern); None: every layer slides."""
    rotary_base_local: Optional[float] = None
    """RoPE theta of the sliding-window layers (Gemma 3's rope_local_base_freq, unscaled);
    None: they use rotary_base (and rope_scaling) like the global layers."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding (Llama-3.2-1B/3B, small Qwen2)."""
    init_method_std: float = 0.02
    """Std of the normal weight init for freshly initialized models."""
    attention_backend: str = "sdpa"
    """Core attention without TE: 'sdpa' (torch scaled_dot_product_attention) or 'unfused'
    (megatron's DotProductAttention, materializes [b, heads, s, s])."""

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self, prefix: str = "model") -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"{prefix}.{key}: {msg}")

        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "vocab_size", "encoder_seq_length", "max_position_embeddings"):
            if int(getattr(self, key)) <= 0:
                bad(key, f"must be a positive integer, got {getattr(self, key)}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"must divide hidden_size={self.hidden_size} "
                "(or set kv_channels explicitly)")
        if self.num_attention_heads % self.query_groups:
            bad("num_query_groups", f"{self.query_groups} must divide num_attention_heads="
                f"{self.num_attention_heads}")
        if self.position_embedding_type != "rope":
            bad("position_embedding_type", "only 'rope' is supported (Llama family)")
        if self.normalization != "RMSNorm":
            bad("normalization", "only 'RMSNorm' is supported (Llama family)")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.attention_backend not in ("sdpa", "unfused"):
            bad("attention_backend", f"must be 'sdpa' or 'unfused', got {self.attention_backend!r}")
        if self.encoder_seq_length > self.max_position_embeddings:
            bad("encoder_seq_length", f"{self.encoder_seq_length} exceeds max_position_embeddings="
                f"{self.max_position_embeddings}")
        if self.rope_scaling is not None and self.rope_scaling.factor < 1.0:
            bad("rope_scaling.factor", "must be >= 1")
        self._validate_family_options(bad)

    def _validate_family_options(self, bad) -> None:
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ("llama3",
                                                                                 "linear"):
            bad("rope_scaling.rope_type", f"must be 'llama3' or 'linear', got "
                f"{self.rope_scaling.rope_type!r}")
        if self.sliding_window is not None:
            if int(self.sliding_window) <= 0:
                bad("sliding_window", f"must be a positive integer or null, got "
                    f"{self.sliding_window}")
            if self.attention_backend != "sdpa":
                bad("attention_backend", "sliding_window needs 'sdpa' (or the TE spec)")
        elif self.window_attn_skip_freq is not None or self.rotary_base_local is not None:
            bad("sliding_window", "window_attn_skip_freq and rotary_base_local describe "
                "sliding-window layers; set sliding_window too or leave them null")
        if self.window_attn_skip_freq is not None and int(self.window_attn_skip_freq) <= 1:
            bad("window_attn_skip_freq", f"must be >= 2 (every N-th layer global), got "
                f"{self.window_attn_skip_freq}")
        if self.softmax_scale is not None and not float(self.softmax_scale) > 0:
            bad("softmax_scale", f"must be positive, got {self.softmax_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model config") -> "GPTModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("rope_scaling"), dict):
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        return cls(**values)


def params_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def to_transformer_config(model: GPTModelConfig, parallel, precision: str = "fp32",
                          **overrides):
    """Build megatron-core's TransformerConfig from the architecture and the parallel layout."""
    from megatron.core.transformer import TransformerConfig

    model.validate()
    dtype = params_dtype(precision)
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[model.activation],
        add_bias_linear=model.bias,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Without CUDA: initialize the full weight on the CPU with one seed, then shard it (the
        # same checkpoint-free model at every TP/PP layout). On a GPU host, each rank allocates
        # and initializes only its shard, on the device (megatron's model-parallel RNG): the
        # full master weights of a 70B model on every rank's CPU take minutes. Initialization
        # stays on even when a checkpoint overwrites the weights: megatron marks tensor-parallel
        # parameters (which the grad norm needs) only while initializing them; only a read-only
        # export turns it off.
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=True,
    )
    kwargs.update(_family_options(model))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _family_options(model: GPTModelConfig) -> dict[str, Any]:
    """megatron-core's own switches for the options of newer families. Its window_size is
    (left, right) inclusive: Hugging Face's sliding_window w is (w - 1, 0)."""
    window = None if model.sliding_window is None else (int(model.sliding_window) - 1, 0)
    return dict(qk_layernorm=model.qk_layernorm,
                layernorm_zero_centered_gamma=model.layernorm_zero_centered_gamma,
                softmax_scale=model.softmax_scale, window_size=window,
                window_attn_skip_freq=model.window_attn_skip_freq)


def default_tiny() -> GPTModelConfig:
    """The embedded default: a Llama-style model small enough to align on a laptop CPU."""
    return GPTModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176,
                          num_attention_heads=4, num_query_groups=2, vocab_size=512)


__all__ = ["GPTModelConfig", "RopeScaling", "to_transformer_config", "params_dtype",
           "default_tiny"]

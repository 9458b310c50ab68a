"""Model architecture config for Llama-family GPT models, and its megatron-core translation.

Mixture-of-experts models (Mixtral, Qwen3-MoE, and in general any router + experts MLP that
megatron-core's ``MoELayer`` computes) are the same record with ``num_moe_experts`` set: every
layer's MLP becomes ``num_moe_experts`` SwiGLU experts of width ``moe_ffn_hidden_size`` behind a
router that scores each token in fp32 (softmax or sigmoid), keeps the top ``moe_router_topk``
experts and, with ``moe_router_topk_normalize``, renormalizes their weights to sum to one;
optionally plus a shared expert every token passes (with or without a sigmoid gate). The keys
are megatron-core's ``TransformerConfig`` names.

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


LAYER_TYPES = ("linear_attention", "full_attention")


@dataclass
class LinearAttention:
    """Gated DeltaNet linear attention in place of softmax attention on some layers (Qwen3.5,
    Qwen3-Next): megatron-core's ``GatedDeltaNet`` (``experimental_attention_variant``
    gated_delta_net). Field names follow the Hugging Face config (``linear_*``)."""

    full_attention_interval: int = 4
    """Every N-th layer (1-based) is full softmax attention, the others Gated DeltaNet."""
    layer_types: Optional[list] = None
    """Per layer 'linear_attention' or 'full_attention' (Hugging Face layer_types); when set it
    replaces full_attention_interval."""
    conv_kernel_dim: int = 4
    """Width of the causal depthwise convolution over q, k, v."""
    key_head_dim: int = 128
    """Query/key head dimension."""
    value_head_dim: int = 128
    """Value (and output-gate) head dimension."""
    num_key_heads: int = 16
    """Query/key heads."""
    num_value_heads: int = 32
    """Value heads: a multiple of num_key_heads (each q/k head serves a group of them)."""

    def pattern(self, num_layers: int) -> list[int]:
        """Per layer 1 = linear attention, 0 = full attention (megatron's
        ``linear_attention_freq`` list)."""
        if self.layer_types is not None:
            return [int(t == "linear_attention") for t in self.layer_types]
        return [0 if (i + 1) % self.full_attention_interval == 0 else 1
                for i in range(num_layers)]

    def validate(self, num_layers: int, bad) -> None:
        for key in ("full_attention_interval", "conv_kernel_dim", "key_head_dim",
                    "value_head_dim", "num_key_heads", "num_value_heads"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                bad(f"linear_attention.{key}", f"must be a positive integer, got {value!r}")
        if self.num_value_heads % self.num_key_heads:
            bad("linear_attention.num_value_heads", f"{self.num_value_heads} must be a multiple "
                f"of linear_attention.num_key_heads={self.num_key_heads}")
        if self.layer_types is not None:
            wrong = sorted({str(t) for t in self.layer_types} - set(LAYER_TYPES))
            if wrong or len(self.layer_types) != num_layers:
                bad("linear_attention.layer_types", f"must list {num_layers} entries (one per "
                    f"layer) from {list(LAYER_TYPES)}, got {len(self.layer_types)} entries"
                    + (f" with {wrong}" if wrong else ""))


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
    """RMSNorm over each query and key head before RoPE (Qwen3, Qwen3-MoE, Gemma 3)."""
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
    num_moe_experts: Optional[int] = None
    """Routed experts per layer (mixture of experts); null = a dense SwiGLU MLP."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each routed expert's SwiGLU MLP; null = ffn_hidden_size."""
    moe_router_score_function: str = "softmax"
    """Router scores: 'softmax' (Mixtral, Qwen3-MoE) or 'sigmoid' (DeepSeek-V3 style)."""
    moe_router_topk_normalize: bool = True
    """Renormalize the top-k weights to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob). With
    softmax and false, the weights are the softmax over all experts, kept for the top k."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiply the routing weights by this (DeepSeek's routed_scaling_factor); null = 1."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert every token passes (added to the routed experts' output);
    null = no shared expert."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(w . x), a learned per-token gate
    (Qwen2-MoE / Qwen3.5-MoE style); needs moe_shared_expert_intermediate_size."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (Switch-style, per sequence batch) added to the
    policy loss; 0 = off. A run's choice: with init_from, this run's value is used."""
    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss (mean squared logsumexp of the router logits); 0 = off.
    A run's choice: with init_from, this run's value is used."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach experts on other expert-parallel ranks: 'alltoall' (sends each token
    only where it is routed) or 'allgather' (every rank sees every token). A run's choice."""
    moe_grouped_gemm: bool = False
    """Run a rank's local experts as one grouped GEMM (TransformerEngine's grouped linear on
    the TE spec); false = one GEMM per expert (the sequential fallback, also the CPU path).
    A run's choice."""

    RUN_KEYS = ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_token_dispatcher_type",
                "moe_grouped_gemm")
    """Keys that choose how a run executes or trains, not what the checkpoint computes: with
    ``init_from`` the run's values replace the checkpoint's."""

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size
    # -- hybrid linear-attention models (Qwen3.5)
    attention_output_gate: bool = False
    """Softmax attention output multiplied by sigmoid of a per-head gate that the query
    projection also produces (Qwen3.5 / Qwen3-Next gated attention)."""
    linear_attention: Optional[LinearAttention] = None
    """Gated DeltaNet layers (see LinearAttention); None: every layer is softmax attention."""

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
        self._validate_moe(bad)
        if not 0.0 < float(self.rotary_percent) <= 1.0:
            bad("rotary_percent", f"must be in (0, 1], got {self.rotary_percent}")
        if self.linear_attention is not None:
            self.linear_attention.validate(self.num_layers, bad)
            if self.is_moe and self.moe_grouped_gemm:
                bad("moe_grouped_gemm", "true needs the TransformerEngine layer spec, and "
                    "model.linear_attention (Gated DeltaNet) is built on the local spec only; "
                    "set moe_grouped_gemm=false")

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

    def _validate_moe(self, bad) -> None:
        if not self.is_moe:
            moe_only = [k for k in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
                        if getattr(self, k) is not None]
            if moe_only or self.moe_shared_expert_gate:
                bad((moe_only or ["moe_shared_expert_gate"])[0],
                    "is set but num_moe_experts is null (a dense model); set num_moe_experts")
            return
        for key in ("num_moe_experts", "moe_router_topk"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(key, f"must be a positive integer, got {value!r}")
        if self.moe_router_topk > self.num_moe_experts:
            bad("moe_router_topk", f"{self.moe_router_topk} exceeds num_moe_experts="
                f"{self.num_moe_experts}")
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                bad(key, f"must be a positive integer or null, got {value!r}")
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            bad("moe_router_score_function", "must be 'softmax' or 'sigmoid', got "
                f"{self.moe_router_score_function!r}")
        if (self.moe_router_score_function == "sigmoid" and not self.moe_router_topk_normalize
                and self.moe_router_topk > 1):
            bad("moe_router_topk_normalize", "false with sigmoid scores and top-k > 1: "
                "megatron-core always renormalizes sigmoid top-k weights; set it to true")
        factor = self.moe_router_topk_scaling_factor
        if factor is not None and not factor > 0:
            bad("moe_router_topk_scaling_factor", f"must be > 0 or null, got {factor!r}")
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            value = getattr(self, key)
            if not value >= 0:
                bad(key, f"must be >= 0 (0 switches it off), got {value!r}")
        if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
            bad("moe_token_dispatcher_type", "must be 'alltoall' or 'allgather', got "
                f"{self.moe_token_dispatcher_type!r}")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            bad("moe_shared_expert_gate", "needs a shared expert: set "
                "moe_shared_expert_intermediate_size")

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
        if isinstance(values.get("linear_attention"), dict):
            values["linear_attention"] = _nested(LinearAttention, values["linear_attention"],
                                                 f"{source}: linear_attention")
        return cls(**values)


def _nested(cls, values: dict, source: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; known keys are {sorted(known)}")
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
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor,
    )
    kwargs.update(_family_options(model))
    kwargs.update(moe_transformer_kwargs(model))
    kwargs.update(_linear_attention_options(model))
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


def moe_transformer_kwargs(model: GPTModelConfig) -> dict[str, Any]:
    """The TransformerConfig fields of a mixture-of-experts model ({} for a dense one)."""
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_score_function=model.moe_router_score_function,
        # softmax: top-k of the logits then softmax over those k = the softmax over all experts
        # renormalized over the top k (Mixtral, Qwen3-MoE's norm_topk_prob); pre-softmax keeps
        # the un-renormalized weights.
        moe_router_pre_softmax=(model.moe_router_score_function == "softmax"
                                and not model.moe_router_topk_normalize),
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_dtype="fp32",  # router logits, scores and aux losses in fp32
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_z_loss_coeff=model.moe_z_loss_coeff or None,
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_grouped_gemm=model.moe_grouped_gemm,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def _linear_attention_options(model: GPTModelConfig) -> dict[str, Any]:
    """megatron-core's gated attention and Gated DeltaNet fields (its experimental attention
    variant); nothing for a model without them."""
    out: dict[str, Any] = {}
    if model.attention_output_gate:
        out["attention_output_gate"] = True
    la = model.linear_attention
    if la is not None:
        out.update(experimental_attention_variant="gated_delta_net",
                   linear_attention_freq=la.pattern(model.num_layers),
                   linear_conv_kernel_dim=la.conv_kernel_dim,
                   linear_key_head_dim=la.key_head_dim,
                   linear_value_head_dim=la.value_head_dim,
                   linear_num_key_heads=la.num_key_heads,
                   linear_num_value_heads=la.num_value_heads)
    return out


def default_tiny() -> GPTModelConfig:
    """The embedded default: a Llama-style model small enough to align on a laptop CPU."""
    return GPTModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176,
                          num_attention_heads=4, num_query_groups=2, vocab_size=512)


__all__ = ["GPTModelConfig", "RopeScaling", "LinearAttention", "to_transformer_config",
           "params_dtype", "default_tiny", "moe_transformer_kwargs"]

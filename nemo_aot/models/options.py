"""Runtime options of the AOT model: precision and the transformer implementation.

The architecture lives in :mod:`nemo_aot.models.config` (it travels inside the .nemo), the
objective in :mod:`nemo_aot.losses.config`; these are per-run choices. Each field's docstring is
its user-facing help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

FP8_FORMATS = ("e4m3", "hybrid")
# The compute capability each FP8 recipe needs: FP8 GEMMs from Ada/Hopper on; block-scaled
# recipes need their hardware scaling (blockwise: Hopper's TE kernels; MXFP8: Blackwell).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0),
                      "mxfp8": (10, 0)}
FP8_RECIPES = tuple(FP8_MIN_CAPABILITY)


@dataclass
class PrecisionConfig:
    """Numerics and the transformer implementation."""

    precision: str = "bf16"
    """Parameter/activation dtype: bf16, fp16 or fp32 (CPU runs use fp32 unless told)."""
    transformer_impl: str = "local"
    """local (megatron-core modules + SDPA attention) or transformer_engine (TE spec, FP8)."""
    fp8: Optional[str] = None
    """FP8 format under TransformerEngine: e4m3 or hybrid (e4m3 forward, e5m2 backward)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe megatron-core supports: delayed, tensorwise, mxfp8, blockwise."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_amax_compute_algo: str = "max"
    """Delayed scaling: max or most_recent."""
    fp8_param: bool = False
    """Keep parameters in FP8 (saves memory; needs the distributed optimizer)."""

    def validate(self, prefix: str = "precision") -> None:
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"{prefix}.precision must be bf16, fp16 or fp32, got "
                             f"{self.precision!r}")
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(f"{prefix}.transformer_impl must be local or transformer_engine, "
                             f"got {self.transformer_impl!r}")
        if self.fp8 is None:
            if self.fp8_param:
                raise ValueError(f"{prefix}.fp8_param needs {prefix}.fp8 to be set")
            return
        if self.fp8 not in FP8_FORMATS:
            raise ValueError(f"{prefix}.fp8 must be one of {list(FP8_FORMATS)} or null, got "
                             f"{self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"{prefix}.fp8_recipe must be one of {list(FP8_RECIPES)}")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"{prefix}.fp8_amax_compute_algo must be max or most_recent")
        if self.transformer_impl != "transformer_engine":
            raise ValueError(f"{prefix}.fp8={self.fp8!r} needs {prefix}.transformer_impl="
                             "transformer_engine (FP8 GEMMs come from TransformerEngine)")
        if self.precision == "fp32":
            raise ValueError(f"{prefix}.fp8 needs precision bf16 or fp16 for the non-FP8 parts")

    def check_runtime(self, prefix: str = "precision") -> None:
        """Start-up checks against this machine: TE importable, GPU with FP8 support."""
        import torch

        if self.transformer_impl == "transformer_engine":
            try:
                import transformer_engine  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"{prefix}.transformer_impl=transformer_engine but TransformerEngine is not "
                    "importable; run in an NGC PyTorch/NeMo container or set "
                    f"{prefix}.transformer_impl=local (and {prefix}.fp8=null)") from None
        if self.fp8 is not None:
            if not torch.cuda.is_available():
                raise ValueError(f"{prefix}.fp8 needs a CUDA GPU; set {prefix}.fp8=null on CPU")
            check_fp8_device(self.fp8_recipe, torch.cuda.get_device_capability(), prefix)


def check_fp8_device(recipe: str, capability: tuple, prefix: str = "precision") -> None:
    """Refuse an FP8 recipe this GPU (``capability`` = (major, minor)) cannot run."""
    need, have = FP8_MIN_CAPABILITY[recipe], tuple(capability)
    if have >= need:
        return
    usable = [r for r, c in FP8_MIN_CAPABILITY.items() if have >= c]
    fix = (f"use {prefix}.fp8_recipe={' or '.join(usable)}" if usable
           else f"set {prefix}.fp8=null (no FP8 on this GPU)")
    raise ValueError(f"{prefix}.fp8_recipe={recipe} needs compute capability >= "
                     f"{need[0]}.{need[1]}; this GPU is {have[0]}.{have[1]}: {fix}")


PEFT_SCHEMES = ("none", "lora")
# megatron-core's names of a GPT layer's linear layers, in layer order: the attention's fused
# QKV (column-parallel) and output projection (row-parallel), the MLP's fused gate/up
# (column-parallel) and down projection (row-parallel).
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# Gated DeltaNet layers (model.linear_attention) have in_proj (column-parallel: q, k, v, gate,
# beta, alpha) and out_proj (row-parallel) in place of linear_qkv / linear_proj.
LINEAR_ATTENTION_LORA_TARGETS = ("in_proj", "out_proj")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on the frozen policy (``peft=lora``)."""

    scheme: str = "none"
    """none (train every weight) or lora (train low-rank adapters only; the base weights stay
    frozen, and the optimizer, its state and the checkpoints hold the adapters only)."""
    rank: int = 16
    """LoRA rank r: each adapted weight W [out, in] gets B [out, r] @ A [r, in]."""
    alpha: float = 32.0
    """LoRA alpha: the adapter's output is scaled by alpha / rank (Hugging Face PEFT's rule)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (the base path has none)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Which linear layers of every transformer layer get an adapter: any of linear_qkv
    (q/k/v_proj in Hugging Face), linear_proj (o_proj), linear_fc1 (gate/up_proj), linear_fc2
    (down_proj); on models with Gated DeltaNet layers also in_proj (linear_attn.in_proj_qkv/z/
    b/a) and out_proj (linear_attn.out_proj). A layer without a listed module skips it."""
    adapter_from: Optional[str] = None
    """Start the adapters from a Hugging Face PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors, e.g. one this package exported) or from a LoRA training
    checkpoint folder (a run's step_N); the base weights come from init_from. null = fresh
    adapters (B = 0: the policy starts as the base model)."""

    @property
    def enabled(self) -> bool:
        return self.scheme == "lora"

    def validate(self, prefix: str = "peft") -> None:
        if self.scheme not in PEFT_SCHEMES:
            raise ValueError(f"{prefix}.scheme must be one of {list(PEFT_SCHEMES)}, got "
                             f"{self.scheme!r}")
        if not self.enabled:
            if self.adapter_from is not None:
                raise ValueError(f"{prefix}.adapter_from needs {prefix}.scheme=lora (use "
                                 "peft=lora)")
            return
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"{prefix}.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"{prefix}.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{prefix}.dropout must be in [0, 1), got {self.dropout!r}")
        targets = list(self.target_modules or [])
        known = LORA_TARGETS + LINEAR_ATTENTION_LORA_TARGETS
        unknown = [t for t in targets if t not in known]
        if unknown or not targets:
            raise ValueError(f"{prefix}.target_modules must be a non-empty subset of "
                             f"{list(known)}, got {targets!r}"
                             + (f" (unknown: {unknown})" if unknown else ""))
        if len(set(targets)) != len(targets):
            raise ValueError(f"{prefix}.target_modules lists a module twice: {targets!r}")
        if self.adapter_from is not None and not str(self.adapter_from).strip():
            raise ValueError(f"{prefix}.adapter_from is empty; set it to a folder or to null")

"""Runtime options of the AOT model: precision and the transformer implementation.

The architecture lives in :mod:`nemo_aot.models.config` (it travels inside the .nemo), the
objective in :mod:`nemo_aot.losses.config`; these are per-run choices. Each field's docstring is
its user-facing help.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


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
            raise ValueError(f"{prefix}.precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(f"{prefix}.transformer_impl must be local or transformer_engine, "
                             f"got {self.transformer_impl!r}")
        if self.fp8 is None:
            if self.fp8_param:
                raise ValueError(f"{prefix}.fp8_param needs {prefix}.fp8 to be set")
            return
        if self.fp8 not in FP8_FORMATS:
            raise ValueError(f"{prefix}.fp8 must be one of {list(FP8_FORMATS)} or null, got {self.fp8!r}")
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
            major, minor = torch.cuda.get_device_capability()
            if (major, minor) < (8, 9):
                raise ValueError(
                    f"{prefix}.fp8 needs compute capability >= 8.9 (Ada/Hopper/Blackwell); this "
                    f"GPU is {major}.{minor}. Set {prefix}.fp8=null")

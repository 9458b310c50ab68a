"""Runtime options of the AOT model: the objective, the reference policy, and precision.

The architecture lives in :mod:`nemo_aot.models.config` (it travels inside the .nemo); these are
per-run choices. Each field's docstring is its user-facing help.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

LOSS_TYPES = ("aot_unpaired", "aot_paired", "dpo", "ipo")
SORT_SCOPES = ("micro", "data_parallel", "global")
REFERENCE_POLICIES = ("cached", "cpu_swap")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


@dataclass
class AlignmentConfig:
    """The preference objective (arXiv 2406.05882) and where its sort happens."""

    loss_type: str = "aot_unpaired"
    """aot_unpaired (chosen vs rejected rewards, any counts), aot_paired (policy vs reference
    margins), dpo or ipo."""
    beta: float = 0.1
    """Logistic scale (DPO/AOT), margin for the hinge-type surrogates, IPO's tau. The paper
    used 0.01 with the logistic surrogate."""
    surrogate: str = "logistic"
    """Convex surrogate h of the AOT/DPO losses: logistic, squared_hinge, least_squares, hinge."""
    label_smoothing: float = 0.0
    """cDPO flip probability in [0, 0.5); logistic surrogate only."""
    sort_scope: str = "data_parallel"
    """Which samples one sort sees: micro (this rank's micro-batch, TRL's behaviour),
    data_parallel (the micro-batch gathered over all DP ranks), global (the whole global batch,
    one extra no-grad forward per step)."""
    length_normalize: bool = False
    """Average response log-probs over tokens instead of summing them."""
    reference_policy: str = "cached"
    """cached: one scoring pass writes reference log-probs, reused across steps, epochs, runs;
    cpu_swap: reference weights kept in CPU memory and swapped in once per global batch."""
    reference_cache_dir: Optional[str] = None
    """Where cached reference log-probs live (default: <output_dir>/reference_cache)."""
    logprob_chunk_size: int = 1024
    """Sequence positions per chunk of the vocab-parallel log-softmax (bounds fp32 memory)."""
    reproduce_atol: float = 1e-3
    """global scope: the grad pass must reproduce the no-grad pass's rewards within this."""

    def validate(self, prefix: str = "alignment") -> None:
        from nemo_aot.losses.api import check_options

        for key, allowed in (("loss_type", LOSS_TYPES), ("sort_scope", SORT_SCOPES),
                             ("reference_policy", REFERENCE_POLICIES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{prefix}.{key} must be one of {list(allowed)}, got "
                                 f"{getattr(self, key)!r}")
        try:
            check_options(self.loss_type, self.beta, self.label_smoothing, self.surrogate)
        except ValueError as err:
            raise ValueError(f"{prefix}: {err}") from None
        if self.logprob_chunk_size < 1:
            raise ValueError(f"{prefix}.logprob_chunk_size must be >= 1")


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

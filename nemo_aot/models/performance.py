"""Speed and memory knobs that leave the result unchanged: activation recomputation,
data-parallel communication overlap, fused kernels.

Each knob maps onto megatron-core (the field docstrings say where); tests hold every one of them
to the result without it (loss and every gradient at TP2/PP2/TP2xPP2 under recomputation, the
training curve under overlap). What megatron-core would refuse, or accept and then fail on in
the middle of a step, is refused here first, naming the key:

=============================  ===============================================================
knob                           megatron-core
=============================  ===============================================================
recompute_granularity/method/  ``TransformerConfig.recompute_granularity``, ``recompute_method``,
num_layers/modules             ``recompute_num_layers``, ``recompute_modules``
overlap_grad_reduce,           ``DistributedDataParallelConfig.overlap_grad_reduce`` (+
                               ``config.grad_sync_func``, ``finalize_model_grads`` waits),
overlap_param_gather,          ``overlap_param_gather`` (+ its forward pre-hooks, see
align_param_gather,            ``MegatronGPTAOTModel.sync_params``), ``align_param_gather`` (+
ddp_bucket_size                ``config.param_sync_func``), ``bucket_size``
*_fusion                       the ``TransformerConfig`` flag of the same name
=============================  ===============================================================

Fusions are tri-state: null (the default) turns a fusion on where its kernel exists and pays
(:data:`KERNEL_PROBES`), true forces it on (an error at start-up where it cannot run), false
keeps it off. One INFO line on rank 0 says at start-up what is on and why the rest is off.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)

RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# The selective recompute modules of a dense model (megatron's others are MoE/MLA parts).
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")
FUSIONS = ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
           "gradient_accumulation_fusion")


@dataclass
class PerformanceConfig:
    """Memory and speed knobs; none of them changes what is computed."""

    recompute_granularity: Optional[str] = None
    """Activation recomputation (megatron TransformerConfig.recompute_granularity): null keeps
    every activation; selective recomputes the modules in recompute_modules during backward;
    full stores only the input of each recomputed transformer layer and reruns the layer."""
    recompute_method: Optional[str] = None
    """full only: uniform (recompute every layer, storing the input of each group of
    recompute_num_layers layers) or block (recompute the first recompute_num_layers layers of
    each pipeline stage, keep the others' activations)."""
    recompute_num_layers: Optional[int] = None
    """full only: layers per recomputed group (uniform; must divide the layers of a pipeline
    stage) or recomputed layers per pipeline stage (block)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """selective only: any of core_attn (the attention scores; the big saving with
    model.attention_backend=unfused), layernorm, mlp."""
    overlap_grad_reduce: bool = False
    """Reduce gradients bucket by bucket while backward still runs (megatron DDP
    overlap_grad_reduce) instead of in one collective after it."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather the updated parameters bucket by bucket during the
    next forward (megatron DDP overlap_param_gather, forward pre-hooks) instead of right after
    the optimizer step. Needs overlap_grad_reduce."""
    align_param_gather: bool = False
    """With overlap_param_gather under the interleaved pipeline schedule: all pipeline stages
    start their parameter all-gathers at the same points of the schedule (megatron DDP
    align_param_gather, config.param_sync_func)."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient-reduction bucket under overlap_grad_reduce (megatron DDP
    bucket_size); null = megatron's default, max(40M, 1M x data-parallel size)."""
    bias_activation_fusion: Optional[bool] = None
    """Fused SwiGLU (megatron's torch.compile kernel): null = on with a CUDA GPU."""
    apply_rope_fusion: Optional[bool] = None
    """Fused rotary embedding (TransformerEngine's kernel): null = on where TE provides it."""
    masked_softmax_fusion: Optional[bool] = None
    """Fused scale-mask-softmax (apex's kernels) in megatron's unfused attention
    (model.attention_backend=unfused, local spec): null = on where it is used and present."""
    gradient_accumulation_fusion: Optional[bool] = None
    """Weight gradients accumulated straight into the fp32 main_grad by the GEMM (apex's
    fused_weight_gradient_mlp_cuda; TE's linears on the TE spec): null = on where present."""

    def validate(self, model=None, parallel=None, precision=None,
                 use_distributed_optimizer: Optional[bool] = None,
                 prefix: str = "performance") -> None:
        """Refuse what megatron-core refuses (or accepts and then fails on); the arguments are
        the other sections where known (GPTModelConfig, ParallelConfig, PrecisionConfig)."""
        self._validate_recompute(prefix)
        self._validate_overlap(prefix, parallel, use_distributed_optimizer)
        for name in FUSIONS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{prefix}.{name} must be true, false or null (on where "
                                 f"available), got {value!r}")
        if model is not None and parallel is not None:
            self._validate_recompute_layers(prefix, model, parallel)
        if precision is not None and self.recompute_granularity == "selective" and \
                "layernorm" in self.recompute_modules and precision.fp8 is not None and \
                precision.fp8_recipe == "delayed":
            raise ValueError(f"{prefix}.recompute_modules=[layernorm] does not work with FP8 "
                             "delayed scaling (megatron-core refuses it); use "
                             "precision.fp8_recipe=tensorwise or drop layernorm")

    def _validate_recompute(self, prefix: str) -> None:
        granularity, method, layers = (self.recompute_granularity, self.recompute_method,
                                       self.recompute_num_layers)
        if granularity is None:
            if method is not None or layers is not None:
                raise ValueError(f"{prefix}.recompute_method/recompute_num_layers are set but "
                                 f"{prefix}.recompute_granularity is null; set it to full")
            return
        if granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"{prefix}.recompute_granularity must be selective, full or null, "
                             f"got {granularity!r}")
        if granularity == "selective":
            if method is not None or layers is not None:
                raise ValueError(f"{prefix}.recompute_method and recompute_num_layers apply to "
                                 f"recompute_granularity=full only; set them to null (selective "
                                 f"recomputes {prefix}.recompute_modules in every layer)")
            unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
            if unknown or not self.recompute_modules:
                raise ValueError(f"{prefix}.recompute_modules must be a non-empty list of "
                                 f"{list(RECOMPUTE_MODULES)}, got {self.recompute_modules}")
            return
        if method not in RECOMPUTE_METHODS:
            raise ValueError(f"{prefix}.recompute_granularity=full needs {prefix}."
                             f"recompute_method uniform or block, got {method!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"{prefix}.recompute_granularity=full needs {prefix}."
                             f"recompute_num_layers, a positive integer, got {layers!r}")

    def _validate_recompute_layers(self, prefix: str, model, parallel) -> None:
        if self.recompute_granularity != "full":
            return
        stages = parallel.pipeline_model_parallel_size * \
            (parallel.virtual_pipeline_model_parallel_size or 1)
        per_stage = model.num_layers // stages
        n = self.recompute_num_layers
        if n > per_stage:
            raise ValueError(f"{prefix}.recompute_num_layers={n} exceeds the {per_stage} layers "
                             f"of a pipeline stage (model.num_layers={model.num_layers} over "
                             f"{stages} stages); lower it")
        if self.recompute_method == "uniform" and per_stage % n:
            raise ValueError(f"{prefix}.recompute_method=uniform needs recompute_num_layers to "
                             f"divide the {per_stage} layers of a pipeline stage, got {n}")

    def _validate_overlap(self, prefix: str, parallel, use_distributed_optimizer) -> None:
        if self.ddp_bucket_size is not None:
            if isinstance(self.ddp_bucket_size, bool) or not isinstance(self.ddp_bucket_size, int) \
                    or self.ddp_bucket_size < 1:
                raise ValueError(f"{prefix}.ddp_bucket_size must be a positive integer or null, "
                                 f"got {self.ddp_bucket_size!r}")
            if not self.overlap_grad_reduce:
                raise ValueError(f"{prefix}.ddp_bucket_size only applies with {prefix}."
                                 "overlap_grad_reduce=true (without it all gradients are "
                                 "reduced in one bucket)")
        if self.overlap_param_gather:
            if use_distributed_optimizer is False:
                raise ValueError(f"{prefix}.overlap_param_gather needs optim."
                                 "use_distributed_optimizer=true (only the distributed optimizer "
                                 "all-gathers parameters)")
            if not self.overlap_grad_reduce:
                raise ValueError(f"{prefix}.overlap_param_gather needs {prefix}."
                                 "overlap_grad_reduce=true (as in Megatron-LM)")
        if self.align_param_gather:
            if not self.overlap_param_gather:
                raise ValueError(f"{prefix}.align_param_gather needs {prefix}."
                                 "overlap_param_gather=true")
            if parallel is not None and parallel.virtual_pipeline_model_parallel_size is None:
                raise ValueError(
                    f"{prefix}.align_param_gather applies to the interleaved pipeline schedule "
                    "(parallel.virtual_pipeline_model_parallel_size set); without it every "
                    "bucket's all-gather would wait for its first use. Set it to false")

    def check_runtime(self, prefix: str = "performance") -> None:
        """Start-up checks against this host (the fusions are checked by ``resolve_fusions``)."""
        if self.recompute_granularity == "selective" and "layernorm" in self.recompute_modules \
                and importlib.util.find_spec("transformer_engine") is None:
            # megatron-core 0.16's CheckpointWithoutOutput always asks TE for its FP8 state
            raise ValueError(f"{prefix}.recompute_modules=[layernorm] needs TransformerEngine "
                             "(megatron-core's norm recompute queries TE's FP8 state), which is "
                             "not importable here; drop layernorm (core_attn and mlp work)")

    def ddp_kwargs(self, use_distributed_optimizer: bool) -> dict[str, Any]:
        """The DistributedDataParallelConfig fields these knobs set."""
        return dict(overlap_grad_reduce=self.overlap_grad_reduce,
                    overlap_param_gather=self.overlap_param_gather and use_distributed_optimizer,
                    align_param_gather=self.align_param_gather,
                    bucket_size=self.ddp_bucket_size)

    def recompute_kwargs(self) -> dict[str, Any]:
        """The TransformerConfig recompute fields (nothing when recomputation is off)."""
        if self.recompute_granularity is None:
            return {}
        kwargs: dict[str, Any] = dict(recompute_granularity=self.recompute_granularity)
        if self.recompute_granularity == "full":
            kwargs.update(recompute_method=self.recompute_method,
                          recompute_num_layers=self.recompute_num_layers)
        else:
            kwargs.update(recompute_modules=list(self.recompute_modules))
        return kwargs


# --------------------------------------------------------------------------- fused kernels


@dataclass(frozen=True)
class Kernel:
    """What this host offers for one fusion."""

    possible: bool
    """Forcing the fusion on works here."""
    worthwhile: bool
    """null (auto) turns it on."""
    reason: str
    """Why (shown in the start-up line, and in the error when forced on but not possible)."""


def _bias_activation(transformer_impl: str, attention_backend: str) -> Kernel:
    from megatron.core import jit

    if jit.jit_fuser is jit.noop_decorator:
        return Kernel(False, False, "megatron's JIT fuser is disabled in this torch")
    if not torch.cuda.is_available():
        return Kernel(True, False, "no GPU: the torch.compile'd SwiGLU only costs compile time "
                                   "on CPU")
    return Kernel(True, True, "megatron's torch.compile'd SwiGLU")


def _rope(transformer_impl: str, attention_backend: str) -> Kernel:
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        return Kernel(False, False, "needs TransformerEngine >= 1.4, not importable here")
    if not torch.cuda.is_available():
        return Kernel(False, False, "TransformerEngine's fused RoPE needs a CUDA GPU")
    return Kernel(True, True, "TransformerEngine's fused RoPE")


def _masked_softmax(transformer_impl: str, attention_backend: str) -> Kernel:
    if transformer_impl == "transformer_engine":
        return Kernel(False, False, "unused: TransformerEngine's attention fuses its own softmax")
    if attention_backend != "unfused":
        return Kernel(False, False, "unused: SDPA core attention fuses its own softmax (it "
                                    "applies to model.attention_backend=unfused)")
    missing = [m for m in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")
               if importlib.util.find_spec(m) is None]
    if missing:
        return Kernel(False, False, f"needs apex's softmax kernels: {', '.join(missing)} not "
                                    "importable here")
    if not torch.cuda.is_available():
        return Kernel(False, False, "apex's softmax kernels need a CUDA GPU")
    return Kernel(True, True, "apex's scale-mask-softmax in megatron's unfused attention")


def _gradient_accumulation(transformer_impl: str, attention_backend: str) -> Kernel:
    from megatron.core.tensor_parallel import layers

    # megatron's own check: its ColumnParallelLinear (the output layer, on every spec) needs it
    if not layers._grad_accum_fusion_available:
        return Kernel(False, False, "needs apex's fused_weight_gradient_mlp_cuda, not importable "
                                    "here (megatron's output layer uses it on every spec)")
    if not torch.cuda.is_available():
        return Kernel(False, False, "the fused weight-gradient GEMM needs a CUDA GPU")
    return Kernel(True, True, "weight gradients accumulated into main_grad by the GEMM")


# name -> probe(transformer_impl, attention_backend); tests replace entries to simulate hosts.
KERNEL_PROBES: dict[str, Callable[[str, str], Kernel]] = {
    "bias_activation_fusion": _bias_activation,
    "apply_rope_fusion": _rope,
    "masked_softmax_fusion": _masked_softmax,
    "gradient_accumulation_fusion": _gradient_accumulation,
}


def resolve_fusions(perf: PerformanceConfig, transformer_impl: str,
                    attention_backend: str) -> dict[str, tuple[bool, str]]:
    """{fusion: (on, why)}; ValueError for a fusion forced on that cannot run here."""
    plan = {}
    for name in FUSIONS:
        wanted, kernel = getattr(perf, name), KERNEL_PROBES[name](transformer_impl,
                                                                  attention_backend)
        if wanted is None:
            plan[name] = (kernel.worthwhile, kernel.reason)
        elif wanted and not kernel.possible:
            raise ValueError(f"performance.{name}=true, but it cannot run here: {kernel.reason}. "
                             f"Set performance.{name}=null (on where available) or false")
        else:
            plan[name] = (wanted, f"performance.{name}={str(wanted).lower()}")
    return plan


def describe_fusions(plan: dict[str, tuple[bool, str]]) -> str:
    """The start-up line: what is on, and why the rest is off."""
    on = [f"{name} ({why})" for name, (enabled, why) in plan.items() if enabled]
    off = [f"{name} ({why})" for name, (enabled, why) in plan.items() if not enabled]
    return f"fused kernels: on: {'; '.join(on) or 'none'} | off: {'; '.join(off) or 'none'}"


def transformer_overrides(perf: PerformanceConfig, transformer_impl: str,
                          attention_backend: str, log: bool = True) -> dict[str, Any]:
    """TransformerConfig fields for recomputation and fusions; logs the fusion line on rank 0."""
    from nemo_aot.distributed.ranks import is_rank_zero

    perf.check_runtime()
    plan = resolve_fusions(perf, transformer_impl, attention_backend)
    if log and is_rank_zero():
        logger.info(describe_fusions(plan))
    return {**perf.recompute_kwargs(), **{name: on for name, (on, _) in plan.items()}}


__all__ = ["PerformanceConfig", "Kernel", "KERNEL_PROBES", "FUSIONS", "RECOMPUTE_MODULES",
           "resolve_fusions", "describe_fusions", "transformer_overrides"]

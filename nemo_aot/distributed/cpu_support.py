"""Run megatron-core on CPU over gloo: laptops, CI, and the multi-rank tests.

megatron-core is written for CUDA and hard-codes it in a handful of places that have nothing
to do with the math. On a host where ``torch.cuda.is_available()`` is False every one of those
places raises, so redirecting them to the CPU changes no behaviour that could otherwise run.
:func:`enable_cpu_execution` applies the redirects below, once per process, and only there:

=====================================  ==========================================================
what megatron-core does                 what happens on a CPU-only host
=====================================  ==========================================================
``torch.cuda.current_device()`` as a    returns ``torch.device("cpu")`` (TP layers, the global
tensor ``device=``                      memory buffer, rotary ``inv_freq``, p2p shape exchange)
``tensor.cuda()``                       returns the tensor (broadcast helpers, param hashes)
``torch.cuda.synchronize()``            no-op (p2p communication, DDP buffer management)
``torch.cuda.current_stream()``         a stream object whose waits are no-ops (0.19's DDP
                                        ``start_grad_sync`` waits for CUDA-graph events on it)
CUDA RNG tracker (``fork`` for TP       a tracker with the same seeding scheme over the CPU
dropout/init, ``add`` per seed)         generator, so TP-region dropout and init stay
                                        reproducible and rank-dependent exactly as on GPU
``device="cuda"`` literals in the       tensor factories inside the listed functions allocate
pipeline schedules, causal-mask         on the CPU (a ``TorchFunctionMode`` active only while
helpers and grad clipping               those functions run)
``param.type() == 'torch.cuda.Float``   inside the listed optimizer functions, CPU tensors report
Tensor'`` in the optimizers             the CUDA type name of their dtype
batched pipeline p2p                    megatron's unbatched, parity-ordered p2p (see below)
(``batch_isend_irecv``)
=====================================  ==========================================================

Why the p2p redirect: gloo matches messages between two ranks in posting order. The batched
path posts ``send_prev, recv_prev, send_next, recv_next`` on every rank, so when the previous
and the next stage are the same rank (PP=2 with interleaving) an activation is received as a
gradient and vice versa - silently, since both have the same shape (seen as wrong losses at
PP=2 x VPP=2 with 4+ micro-batches). The unbatched path orders sends and receives by rank
parity, which pairs them correctly.

Run against megatron-core 0.16.x - 0.19.x (``make test-compat`` runs the multi-rank layouts,
LoRA, a checkpoint resume and the demo under each against 0.16.1's numbers). Entries of the
redirect lists that a release does not have are skipped (feature detection: 0.19 added
``has_grad_norm_group``, older releases lack it), so one list serves the whole range. A release
outside the tested range is refused on CPU with a message naming the range (set
``NEMO_AOT_ALLOW_UNTESTED_MEGATRON_CORE=1`` to try it anyway: a new hard-coded CUDA call would
then fail loudly, not silently); on a GPU, where nothing here is needed, it only warns
(:func:`check_megatron_core`). Nothing here is ever active on a machine with a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# The megatron-core minor releases this package was run with (make test-compat; README support
# matrix); pyproject.toml's requirement admits exactly these.
SUPPORTED_MEGATRON_CORE = ((0, 16), (0, 17), (0, 18), (0, 19))
ALLOW_UNTESTED_ENV = "NEMO_AOT_ALLOW_UNTESTED_MEGATRON_CORE"
_ENABLED = False

# (module, class or None, attribute) whose tensor factories must allocate on the CPU while
# they run. Module-level names are patched where they are *used* (imported copies included).
_DEVICE_REDIRECTED = [
    ("megatron.core.pipeline_parallel.schedules", None, "forward_backward_no_pipelining"),
    ("megatron.core.pipeline_parallel.schedules", None,
     "forward_backward_pipelining_without_interleaving"),
    ("megatron.core.pipeline_parallel.schedules", None,
     "forward_backward_pipelining_with_interleaving"),
    ("megatron.core.transformer.utils", None, "get_default_causal_mask"),
    ("megatron.core.transformer.utils", None, "get_sliding_window_causal_mask"),
    ("megatron.core.fusions.fused_softmax", None, "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", None, "get_sliding_window_causal_mask"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", None, "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", None, "count_zeros_fp32"),
    ("megatron.core.optimizer.optimizer", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "get_grad_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "count_zeros_fp32"),
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer", "__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer", "__init__"),
    ("megatron.core.optimizer.grad_scaler", "MegatronGradScaler", "__init__"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler", "__init__"),
    # 0.19: a flag tensor on device='cuda' for an all-reduce, cached per norm group
    ("megatron.core.optimizer.optimizer", "MegatronOptimizer", "has_grad_norm_group"),
    ("megatron.core.optimizer.layer_wise_optimizer", "LayerWiseDistributedOptimizer",
     "has_grad_norm_group"),
]
# (module, class or None, attribute) that compare ``tensor.type()`` with CUDA type names.
_TYPE_REDIRECTED = [
    ("megatron.core.optimizer.clip_grads", None, "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "get_grad_norm_fp32"),
    ("megatron.core.optimizer.optimizer", None, "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups"),
]


def megatron_core_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return tuple(int(x) for x in package_info.VERSION[:3])


def cpu_execution_enabled() -> bool:
    return _ENABLED


def tested_range() -> str:
    (a, b), (c, d) = min(SUPPORTED_MEGATRON_CORE), max(SUPPORTED_MEGATRON_CORE)
    return f"{a}.{b}.x - {c}.{d}.x"


def check_megatron_core(on_cpu: bool) -> tuple[int, int, int]:
    """The installed megatron-core's version, refused on CPU (warned about on GPU) when it is
    outside the tested range unless ``NEMO_AOT_ALLOW_UNTESTED_MEGATRON_CORE=1``."""
    version = megatron_core_version()
    if version[:2] in SUPPORTED_MEGATRON_CORE:
        return version
    found = ".".join(map(str, version))
    allowed = os.environ.get(ALLOW_UNTESTED_ENV, "") == "1"
    if on_cpu and not allowed:
        raise RuntimeError(
            f"nemo_aot's CPU execution support was run with megatron-core {tested_range()}, "
            f"found {found}: it redirects megatron's hard-coded CUDA calls, and an untested "
            f"release may have new ones. Install a tested release "
            f"(pip install 'megatron-core>=0.16,<0.20'), run on a GPU machine, or set "
            f"{ALLOW_UNTESTED_ENV}=1 to try this one anyway.")
    logger.warning("megatron-core %s is outside the range nemo_aot was run with (%s)%s; "
                   "proceeding", found, tested_range(),
                   f" ({ALLOW_UNTESTED_ENV}=1)" if on_cpu else "")
    return version


def enable_cpu_execution() -> bool:
    """Make megatron-core runnable on this host if it has no GPU. Returns True when active.

    Call it before building models or schedules. Idempotent; a no-op where CUDA is available
    (apart from a warning for a megatron-core outside the tested range).
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        _check_once_on_gpu()
        return False
    version = check_megatron_core(on_cpu=True)
    _redirect_current_device()
    _install_cpu_rng_tracker()
    _unbatch_pipeline_p2p()
    for module, cls, attr in _DEVICE_REDIRECTED:
        _wrap(module, cls, attr, _cuda_factories_on_cpu)
    for module, cls, attr in _TYPE_REDIRECTED:
        _wrap(module, cls, attr, _cpu_types_named_cuda)
    _enable_moe_on_cpu()
    _ENABLED = True
    logger.info("megatron-core %s: CPU execution enabled (no CUDA device)", version)
    return True


@functools.lru_cache(maxsize=1)
def _check_once_on_gpu() -> None:
    check_megatron_core(on_cpu=False)


class _NoStream:
    """Stands in for ``torch.cuda.current_stream()``: CPU work is already in program order."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


def _redirect_current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker seeding scheme over the CPU default generator."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker
    tracker_cls = type("CpuRNGStatesTracker", (_CpuRNGStatesTracker, base), {})
    # initialize_rng_tracker() instantiates the module-level name; subclassing keeps
    # megatron's isinstance checks (get_all_rng_states) working.
    mrandom.CudaRNGStatesTracker = tracker_cls
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


def _unbatch_pipeline_p2p() -> None:
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    unbatched = p2p._p2p_ops

    def parity_ordered(**kwargs):
        return list(unbatched(**kwargs).values())

    p2p._batched_p2p_ops = parity_ordered


def _is_cuda(device) -> bool:
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


class _CudaFactoriesOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _cuda_factories_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaFactoriesOnCpu():
            return fn(*args, **kwargs)

    return wrapper


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _cpu_types_named_cuda(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def type_(self, dtype=None, *a, **k):
            if dtype is None and not a and not k and self.device.type == "cpu":
                return _CUDA_TYPE_NAMES.get(self.dtype, original(self))
            return original(self, dtype, *a, **k)

        torch.Tensor.type = type_
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    return wrapper


def _wrap(module_name: str, cls_name: str | None, attr: str, decorator) -> None:
    """Wrap ``module.[cls.]attr`` with ``decorator``; skipped where this release lacks it."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        logger.debug("CPU support: %s absent in this megatron-core, skipped", module_name)
        return
    owner = getattr(module, cls_name, None) if cls_name else module
    holder = owner.__dict__ if cls_name and owner is not None else vars(module)
    if owner is None or attr not in holder:
        logger.debug("CPU support: %s.%s.%s absent in this megatron-core, skipped",
                     module_name, cls_name, attr)
        return
    original = holder[attr]
    if isinstance(original, (staticmethod, classmethod)):
        setattr(owner, attr, type(original)(decorator(original.__func__)))
    else:
        setattr(owner, attr, decorator(original))


# --------------------------------------------------------------------------- mixture of experts
# Two more places in megatron-core's MoE layer assume CUDA (probed with 0.16.1):
# * ``moe_utils`` imports ``te_general_gemm`` only inside a ``try`` over TransformerEngine and
#   then tests ``te_general_gemm is not None``: without TE the name is unbound and the router's
#   gating GEMM raises NameError. Bound to None, the router takes its torch.mm path (fp32 logits).
# * the all-to-all token dispatcher keeps a class-level ``torch.cuda.Stream`` for its
#   device-to-host copies of the split sizes and waits on it; on the CPU the sizes are host
#   tensors already, so a stream that orders nothing (every wait and event a no-op) is exact.
#   Its ``maybe_move_tensor_to_cpu`` turns the split sizes into numpy arrays only when it moves
#   them off a GPU; host tensors would reach ``all_to_all_single`` as tensors, which its
#   binding refuses, so on the CPU they are handed over as numpy arrays as on a GPU.
# * gloo has no uneven all-gather: the all-to-all dispatcher with expert tensor parallelism
#   (ETP > 1) gathers each TP rank's routed tokens, a different count per rank, with
#   ``torch.distributed.all_gather`` over a list of unequal tensors (megatron's
#   ``_gather_along_first_dim`` with ``output_split_sizes``), and its backward reduce-scatters
#   unequal slices (``_reduce_scatter_along_first_dim`` with ``input_split_sizes``). gloo refuses
#   the first ("invalid tensor size"). Both are emulated exactly: the gather pads every rank's
#   rows to the largest count, gathers equal blocks and drops the padding; the reduce-scatter
#   all-reduces the whole tensor and keeps this rank's rows. (gloo's uneven
#   ``all_to_all_single``, which the expert-parallel exchange uses, works as is.)


class _HostStream:
    """A CUDA stream stand-in on a CPU-only host: work is already ordered, waits are no-ops."""

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> "_HostStream":
        return self

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


@contextlib.contextmanager
def _host_streams():
    """While the all-to-all dispatcher runs: ``torch.cuda`` stream calls answer with the host
    stream (the current and the side stream are one, so no tensor is ``record_stream``-ed)."""
    saved = torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream
    torch.cuda.Stream = lambda *args, **kwargs: _HOST_STREAM
    torch.cuda.current_stream = lambda device=None: _HOST_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream = saved


def _on_host_streams(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _host_streams():
            return fn(*args, **kwargs)

    return wrapper


def _enable_moe_on_cpu() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    moved = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(moved)
    def host_sizes(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return moved(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = host_sizes
    _emulate_uneven_gather()
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    for attr in ("__init__", "_maybe_dtoh_and_synchronize"):
        if attr in dispatcher.__dict__:
            _wrap(token_dispatcher.__name__, "MoEAlltoAllTokenDispatcher", attr,
                  _on_host_streams)


def uneven_all_gather(input_: torch.Tensor, sizes, group) -> torch.Tensor:
    """Concatenate every rank's ``input_`` (rank r holds ``sizes[r]`` rows) along dim 0, with
    the equal-size all-gather gloo has."""
    sizes = [int(n) for n in sizes]
    world, longest = len(sizes), max(sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    blocks = input_.new_empty((world * longest, *input_.shape[1:]))
    torch.distributed.all_gather_into_tensor(blocks, padded.contiguous(), group=group)
    return torch.cat([blocks[r * longest: r * longest + n] for r, n in enumerate(sizes)])


def uneven_reduce_scatter(input_: torch.Tensor, sizes, group) -> torch.Tensor:
    """The sum over ranks of ``input_``'s rows that belong to this rank (``sizes[r]`` rows per
    rank r, in rank order), with the all-reduce gloo has."""
    sizes = [int(n) for n in sizes]
    total = input_.contiguous().clone()
    torch.distributed.all_reduce(total, group=group)
    start = sum(sizes[: group.rank()])
    return total[start: start + sizes[group.rank()]].contiguous()


def _emulate_uneven_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    @functools.wraps(gather)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        return uneven_all_gather(input_, output_split_sizes, group)

    @functools.wraps(scatter)
    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        return uneven_reduce_scatter(input_, input_split_sizes, group)

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim

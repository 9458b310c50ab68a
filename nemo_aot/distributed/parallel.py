"""Parallel layout: a typed config, up-front validation, and process-group start-up.

The layout is TP x PP x DP = world size (context parallelism is not used). Mixture-of-experts
models add expert parallelism on the same ranks (megatron-core's "MoE parallel folding"): the
attention and the rest of the model use TP x PP x DP, the experts ETP x EP x expert-DP x PP
over the same world, so EP divides the ranks of one pipeline stage and each EP rank holds
num_moe_experts / EP experts. Every impossible combination is refused before any process group
or model exists, naming the config key and what to change.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ParallelConfig:
    """How the model and the batch are split across ranks."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each weight matrix (TP). Keep within one node (NVLink)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layer stack (PP)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B); None disables interleaving."""
    sequence_parallel: bool = False
    """Split norm/dropout activations along the sequence across the TP group (needs TP > 1)."""
    expert_model_parallel_size: int = 1
    """Ranks the routed experts of a mixture-of-experts model are split over (EP): each holds
    num_moe_experts / EP whole experts. Uses the ranks of one pipeline stage (with TP and DP)."""
    expert_tensor_parallel_size: Optional[int] = None
    """Ranks that split each expert's weights (ETP); null = tensor_model_parallel_size."""

    @property
    def expert_tensor(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def expert_data_parallel_size(self, world_size: int) -> int:
        """Replicas of each expert: the ranks of a stage over ETP x EP."""
        return world_size // (self.expert_tensor * self.expert_model_parallel_size
                              * self.pipeline_model_parallel_size)

    def validate(self, world_size: int, model=None, prefix: str = "parallel") -> None:
        """Refuse layouts that cannot work; ``model`` is a GPTModelConfig when known. What no
        launch can fix (the layout itself, the model's divisibility) is checked before the
        world size."""
        tp, pp, vpp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                       self.virtual_pipeline_model_parallel_size)
        for key, value in (("tensor_model_parallel_size", tp),
                           ("pipeline_model_parallel_size", pp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{prefix}.{key} must be a positive integer, got {value!r}")
        if vpp is not None:
            if pp < 2:
                raise ValueError(f"{prefix}.virtual_pipeline_model_parallel_size needs "
                                 f"pipeline_model_parallel_size >= 2 (got {pp}); set it to null")
            if vpp < 2:
                raise ValueError(f"{prefix}.virtual_pipeline_model_parallel_size must be >= 2 or "
                                 f"null, got {vpp}")
        if self.sequence_parallel and tp == 1:
            raise ValueError(f"{prefix}.sequence_parallel needs tensor_model_parallel_size > 1; "
                             "set it to false")
        self._check_experts(prefix)
        if model is not None:
            self._check_model(model, prefix)
        if world_size % (tp * pp):
            raise ValueError(
                f"{prefix}: world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({tp}) x pipeline_model_parallel_size ({pp}) = {tp * pp}; launch a multiple of "
                f"{tp * pp} ranks or change the layout")
        expert_ranks = self.expert_tensor * self.expert_model_parallel_size * pp
        if world_size % expert_ranks:
            raise ValueError(
                f"{prefix}: world size {world_size} is not divisible by "
                f"expert_tensor_parallel_size ({self.expert_tensor}) x expert_model_parallel_size "
                f"({self.expert_model_parallel_size}) x pipeline_model_parallel_size ({pp}) = "
                f"{expert_ranks}; launch a multiple of {expert_ranks} ranks or lower "
                f"{prefix}.expert_model_parallel_size")

    def _check_experts(self, prefix: str) -> None:
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f"{prefix}.expert_model_parallel_size must be a positive integer, "
                             f"got {ep!r}")
        if etp is not None and (isinstance(etp, bool) or not isinstance(etp, int) or etp < 1):
            raise ValueError(f"{prefix}.expert_tensor_parallel_size must be a positive integer "
                             f"or null (= tensor_model_parallel_size), got {etp!r}")

    def _check_model(self, model, prefix: str) -> None:
        tp, pp, vpp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                       self.virtual_pipeline_model_parallel_size)
        if model.num_attention_heads % tp:
            raise ValueError(f"{prefix}.tensor_model_parallel_size={tp} must divide "
                             f"model.num_attention_heads={model.num_attention_heads}")
        if model.query_groups % tp:
            raise ValueError(f"{prefix}.tensor_model_parallel_size={tp} must divide "
                             f"model.num_query_groups={model.query_groups} (KV heads)")
        if model.ffn_hidden_size % tp:
            raise ValueError(f"{prefix}.tensor_model_parallel_size={tp} must divide "
                             f"model.ffn_hidden_size={model.ffn_hidden_size}")
        self._check_model_experts(model, prefix)
        stages = pp * (vpp or 1)
        if model.num_layers % stages:
            raise ValueError(
                f"model.num_layers={model.num_layers} must be divisible by "
                f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = {stages}")


    def _check_model_experts(self, model, prefix: str) -> None:
        ep, etp = self.expert_model_parallel_size, self.expert_tensor
        experts = getattr(model, "num_moe_experts", None)
        if experts is None:
            if ep > 1 or self.expert_tensor_parallel_size is not None:
                key = "expert_model_parallel_size" if ep > 1 else "expert_tensor_parallel_size"
                raise ValueError(f"{prefix}.{key} is set but the model has no experts "
                                 "(model.num_moe_experts is null); set it to its default")
            return
        if self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise ValueError(f"{prefix}.sequence_parallel must be true with "
                             f"tensor_model_parallel_size={self.tensor_model_parallel_size} for a "
                             "mixture-of-experts model (megatron-core's MoE layer refuses TP "
                             "without it); set parallel.sequence_parallel=true")
        if experts % ep:
            raise ValueError(f"{prefix}.expert_model_parallel_size={ep} must divide "
                             f"model.num_moe_experts={experts} (each EP rank holds "
                             f"num_moe_experts / EP whole experts)")
        if model.expert_ffn_hidden_size % etp:
            raise ValueError(f"{prefix}.expert_tensor_parallel_size={etp} must divide the expert "
                             f"width model.moe_ffn_hidden_size={model.expert_ffn_hidden_size}")
        shared = model.moe_shared_expert_intermediate_size
        tp = self.tensor_model_parallel_size
        if shared is not None and shared % tp:
            raise ValueError(f"{prefix}.tensor_model_parallel_size={tp} must divide "
                             f"model.moe_shared_expert_intermediate_size={shared}")


def compute_device() -> torch.device:
    """This rank's device: its CUDA device (set by ``init_distributed``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> None:
    """Join the default process group from torchrun/SLURM environment variables, if not yet."""
    if torch.distributed.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group(
        backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_model_parallel(parallel: ParallelConfig, model=None, seed: int = 1234) -> None:
    """Validate the layout, then set up megatron-core's groups and its seeded RNG tracker.

    On a host without CUDA this also enables nemo_aot's CPU execution support first.
    """
    from megatron.core import parallel_state, tensor_parallel

    from nemo_aot.distributed.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    init_distributed()
    parallel.validate(torch.distributed.get_world_size(), model)
    if not _same_layout(parallel_state, parallel):
        if parallel_state.model_parallel_is_initialized():
            # Megatron releases only its own gloo groups here; the others stay registered with
            # torch (each holds threads), so a layout change in one process costs some.
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor,
        )
        _groups_world[0] = torch.distributed.group.WORLD
    elif parallel.virtual_pipeline_model_parallel_size is not None:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# The default process group megatron's groups were built in (they die with it).
_groups_world: list = [None]


def _same_layout(parallel_state, parallel: ParallelConfig) -> bool:
    """Whether megatron's groups already exist for this layout in the current default process
    group (then they are reused: a long-lived process running many jobs must not create a new
    set of groups per job)."""
    if not parallel_state.model_parallel_is_initialized():
        return False
    if _groups_world[0] is None or _groups_world[0] is not torch.distributed.group.WORLD:
        return False
    return (parallel_state.get_tensor_model_parallel_world_size()
            == parallel.tensor_model_parallel_size
            and parallel_state.get_pipeline_model_parallel_world_size()
            == parallel.pipeline_model_parallel_size
            and parallel_state.get_virtual_pipeline_model_parallel_world_size()
            == parallel.virtual_pipeline_model_parallel_size
            and parallel_state.get_expert_model_parallel_world_size()
            == parallel.expert_model_parallel_size
            and parallel_state.get_expert_tensor_parallel_world_size() == parallel.expert_tensor)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

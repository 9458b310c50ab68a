"""Decisions every rank takes together: who am I, did any rank see X, what does rank 0 say.

A decision that changes control flow (stop on a signal or the time budget, reuse a cache, pick a
checkpoint) must come out the same on every rank, or the ranks that decided differently wait
in a collective the others never enter (NCCL: 30 minutes, then the job dies). These helpers
make such decisions from one collective:

* ``any_rank(flag)`` / ``any_ranks(flags)``: logical OR over the ranks (one MAX all-reduce for
  several flags), e.g. "some rank received SIGTERM", "some rank is past the time budget";
* ``stop_point(requested, where)``: raise ``StopRequested`` on every rank when any rank asks to
  stop (a signal that reached some ranks during a long set-up phase);
* ``from_rank0(value)``: rank 0's value on every rank (a pickled broadcast), e.g. "rank 0 found
  a valid cache file" when other ranks may not see that file at all (node-local folders, NFS
  attribute caching).

Without an initialized process group every helper is the local answer. The flag tensors live
on the rank's CUDA device under NCCL (which cannot reduce host tensors) and on the CPU
otherwise; each call is one small collective and one host read, so call them once per step or
phase, not per micro-batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if initialized() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def _flag_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_ranks(flags: Sequence[bool], group=None) -> tuple[bool, ...]:
    """Element-wise OR of ``flags`` over ``group``'s ranks (every rank passes as many)."""
    if not initialized():
        return tuple(bool(f) for f in flags)
    value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32,
                         device=_flag_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return tuple(bool(v) for v in value.tolist())  # the one host read of this decision


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank of ``group``."""
    return any_ranks([flag], group)[0]


class StopRequested(Exception):
    """Raised on every rank at once after the ranks agreed to stop (e.g. a preemption signal
    during set-up); the run ends without training further and without exporting."""


def stop_point(requested: bool, where: str) -> None:
    """Raise ``StopRequested`` on every rank when any rank ``requested`` a stop (collective)."""
    if any_rank(requested):
        raise StopRequested(where)


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank of the default group."""
    if not initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["initialized", "rank", "is_rank_zero", "any_rank", "any_ranks", "from_rank0",
           "StopRequested", "stop_point"]

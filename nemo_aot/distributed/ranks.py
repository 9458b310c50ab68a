"""Rank identity and the decisions every rank takes together.

A decision that changes control flow (stop on a signal or the time budget, reuse a cache, pick a
checkpoint, give up after an error) must come out the same on every rank, or the ranks that
decided differently wait in a collective the others never enter (NCCL: 30 minutes, then the job
dies). Each helper here makes such a decision from one small collective:

* ``rank()``, ``is_rank_zero()``, ``local_rank()``, ``host_name()``: who and where this rank is;
* ``any_rank(flag)`` / ``any_ranks(flags)``: logical OR over the ranks (one MAX all-reduce for
  several flags), e.g. "some rank received SIGTERM", "some rank is past the time budget";
* ``stop_point(requested, where)``: raise ``StopRequested`` on every rank when any rank asks to
  stop (a signal that reached some ranks during a long set-up phase);
* ``from_rank0(value)``: rank 0's value on every rank (a pickled broadcast), e.g. "rank 0 found
  a valid cache file" when other ranks may not see that file at all (node-local folders, NFS
  attribute caching); ``broadcast_text(text)``: the same for short text, without pickling;
* ``all_min(values)``, ``barrier()``, ``first_error(message)``: element-wise MIN, a barrier made
  of it, and the lowest failing rank's error message on every rank;
* ``run_polling(fn)``: run ``fn`` (node-level file work, e.g. unpacking a .nemo on the node's
  local rank 0) in a thread while every rank polls with short all-reduces until all are done,
  so waiting ranks never sit in one collective long enough to trip the group's timeout.

Without an initialized process group every helper is the local answer. Their tensors live on
the rank's CUDA device under NCCL (which cannot reduce host tensors) and on the CPU otherwise;
each call is one small collective and one host read, so call them once per step or phase, not
per micro-batch.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; before one exists, the launcher's ``RANK``
    (torchrun and ``nemo-aot launch`` set it), else 0."""
    if initialized():
        return dist.get_rank()
    value = os.environ.get("RANK", "")
    return int(value) if value.isdigit() else 0


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


MESSAGE_BYTES = 2048  # longest error text first_error carries (longer ones are cut)
POLL_S = 5.0  # longest wait between run_polling's collectives; far below any group timeout


def local_rank() -> Optional[int]:
    """``LOCAL_RANK`` as an int; ``None`` when it is unset or not a non-negative integer."""
    value = os.environ.get("LOCAL_RANK", "")
    return int(value) if value.isdigit() else None


def host_name() -> str:
    """This machine's host name, with anything but ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def all_min(values: Sequence[int]) -> list[int]:
    """Element-wise minimum of ``values`` over all ranks (the values themselves alone)."""
    if not initialized():
        return [int(v) for v in values]
    box = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_flag_device())
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN)
    return box.cpu().tolist()  # the one host sync: callers branch on the result


def barrier() -> None:
    """Return once every rank has called it."""
    all_min([0])


def run_polling(fn: Optional[Callable[[], None]], poll_s: Optional[float] = None) -> None:
    """Run ``fn()`` here (in a thread) while all ranks poll until every rank's ``fn`` is done.

    A rank may wait up to ``poll_s`` (default ``POLL_S``) inside one collective for the others.
    """
    poll_s = POLL_S if poll_s is None else poll_s
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(err)

    thread = None
    if fn is not None:
        thread = threading.Thread(target=target, name="nemo_aot-node-work", daemon=True)
        thread.start()
    wait = 0.01
    while True:
        if thread is not None:
            thread.join(wait)
        else:
            time.sleep(wait)
        (done,) = all_min([int(thread is None or not thread.is_alive())])
        if done:
            break
        wait = min(2 * wait, poll_s)
    if failure:
        raise failure[0]


def first_error(message: Optional[str]) -> Optional[str]:
    """The lowest failing rank's message on every rank, prefixed ``rank N: ``; None if none."""
    if not initialized():
        return message
    world, me = torch.distributed.get_world_size(), torch.distributed.get_rank()
    (src,) = all_min([world if message is None else me])
    if src == world:
        return None
    return f"rank {src}: {_broadcast(message if me == src else '', src)}"


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` (at most MESSAGE_BYTES of UTF-8) on every rank."""
    return _broadcast(text, 0) if initialized() else text


def _broadcast(text: str, src: int) -> str:
    data = text.encode("utf-8", errors="replace")[:MESSAGE_BYTES]
    buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device="cpu")  # deliberate host buffer
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_flag_device())
    torch.distributed.broadcast(buf, src=src)
    return buf.cpu().numpy().tobytes().rstrip(b"\0").decode("utf-8", errors="replace")


__all__ = ["initialized", "rank", "is_rank_zero", "local_rank", "host_name", "any_rank",
           "any_ranks", "from_rank0", "broadcast_text", "all_min", "barrier", "first_error",
           "run_polling", "StopRequested", "stop_point", "MESSAGE_BYTES", "POLL_S"]

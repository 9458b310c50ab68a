"""Node-level helpers: which rank does per-node file work, and tiny agreed collectives.

Large files (a .nemo, a dataset cache) are unpacked once per node, by the node's local rank 0,
while the other ranks wait; every such step ends in a collective that all ranks reach, so a
failure on one node becomes an error on every rank instead of a hang.

* ``local_rank()``: this process's rank on its node, from ``LOCAL_RANK`` (torchrun and
  ``nemo-aot``'s launcher set it); ``None`` when unknown (then treat the rank as its own node).
* ``host_name()``: ``socket.gethostname()`` made safe for a file name.
* ``all_min(values)``: element-wise MIN of a few integers over the default process group; one
  all-reduce and one host sync; every rank must call it (it is also a barrier).
* ``first_error(message)``: the message of the lowest-numbered rank that has one (``None``
  = no error), on every rank; one all-reduce, plus one broadcast when some rank failed.
* ``broadcast_text(text)``: rank 0's ``text`` on every rank (one broadcast).
* ``barrier()``: all ranks reach this point (an ``all_min``).
* ``run_polling(fn)``: run ``fn`` (or nothing, ``fn=None``) in a thread while every rank polls
  with short all-reduces until all threads are done; ``fn``'s exception re-raised on its rank.
  Waiting ranks never sit in one collective for the whole of ``fn``, so a long extraction does
  not trip the process group's timeout (NCCL's watchdog: 30 min by default).

All of them work without torch.distributed (a world of one) and are NCCL-safe: their tensors live
on the rank's current CUDA device when the default group's backend is nccl, on the CPU otherwise.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from typing import Callable, Optional, Sequence

import torch

MESSAGE_BYTES = 2048  # longest error text first_error carries (longer ones are cut)
POLL_S = 5.0  # longest wait between run_polling's collectives; far below any group timeout


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_rank() -> Optional[int]:
    """``LOCAL_RANK`` as an int; ``None`` when it is unset or not a non-negative integer."""
    value = os.environ.get("LOCAL_RANK", "")
    return int(value) if value.isdigit() else None


def host_name() -> str:
    """This machine's host name, with anything but ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def all_min(values: Sequence[int]) -> list[int]:
    """Element-wise minimum of ``values`` over all ranks (the values themselves alone)."""
    if not _dist():
        return [int(v) for v in values]
    box = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_device())
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
    if not _dist():
        return message
    world, me = torch.distributed.get_world_size(), torch.distributed.get_rank()
    (src,) = all_min([world if message is None else me])
    if src == world:
        return None
    return f"rank {src}: {_broadcast(message if me == src else '', src)}"


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` (at most MESSAGE_BYTES of UTF-8) on every rank."""
    return _broadcast(text, 0) if _dist() else text


def _broadcast(text: str, src: int) -> str:
    data = text.encode("utf-8", errors="replace")[:MESSAGE_BYTES]
    buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device="cpu")  # deliberate host buffer
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_device())
    torch.distributed.broadcast(buf, src=src)
    return buf.cpu().numpy().tobytes().rstrip(b"\0").decode("utf-8", errors="replace")


__all__ = ["local_rank", "host_name", "all_min", "barrier", "run_polling", "first_error",
           "broadcast_text",
           "MESSAGE_BYTES"]

"""Run a function on N fresh processes joined in one process group (gloo on CPU, NCCL on GPUs).

    results = run_multirank(fn, world_size=2, args=(x,), timeout=120)
    results = run_multirank(fn, world_size=1, device="cuda")      # NCCL, rank r on cuda:r

``fn(*args)`` runs on every rank after ``torch.distributed`` is initialized on a free loopback
port; its return value (anything ``torch.save`` can write) comes back in rank order (CUDA tensors
arrive on the CPU). A rank that raises makes the call fail with every failing rank's traceback; a
rank that hangs past ``timeout`` seconds is killed and reported. ``fn`` must be defined at module
level (it is pickled by reference into spawned processes), and the spawned ranks import only what
``fn``'s module imports, so keep heavy imports (nemo) out of multi-rank test modules.

Devices (``device=``, else the ``MULTIRANK_DEVICE`` environment variable, else ``cpu``):

* ``cpu``: gloo, every tensor on the CPU. On a host with GPUs the ranks do not see them
  (``CUDA_VISIBLE_DEVICES=""``), so a CPU test runs exactly as in CI - nemo_aot's CPU execution
  support included, which is active only where CUDA is unavailable.
* ``cuda``: NCCL, rank r calls ``torch.cuda.set_device(r)`` before joining (one GPU per rank;
  more ranks than GPUs is refused). Inside ``fn``, ``rank_device()`` is the rank's GPU: put the
  model and the batches there.
* ``auto``: ``cuda`` where CUDA is available, else ``cpu``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.multiprocessing as mp

DEVICES = ("cpu", "cuda", "auto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device() -> torch.device:
    """This rank's device inside ``fn``: its GPU in a ``cuda`` run, else the CPU."""
    if os.environ.get("MULTIRANK_DEVICE") == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: Optional[str] = None) -> str:
    """``cpu`` or ``cuda`` from an argument, ``MULTIRANK_DEVICE``, or the default ``cpu``."""
    choice = device or os.environ.get("MULTIRANK_DEVICE") or "cpu"
    if choice not in DEVICES:
        raise ValueError(f"multirank device must be one of {DEVICES}, got {choice!r}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _check_gpus(world_size: int) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("run_multirank(device='cuda') needs CUDA, and this host has none")
    if world_size > torch.cuda.device_count():
        raise ValueError(f"an NCCL world of {world_size} ranks needs {world_size} GPUs (one per "
                         f"rank); this host has {torch.cuda.device_count()}")


class _environ:
    """Set environment variables while spawned children start (they copy the parent's)."""

    def __init__(self, changes: dict[str, str]):
        self.changes, self.saved = changes, {}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.changes}
        os.environ.update(self.changes)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker(fn, args, rank, world_size, port, out_dir, env, device="cpu"):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    out = os.path.join(out_dir, f"rank{rank}.pt")
    backend = "gloo"
    if device == "cuda":
        os.environ["MULTIRANK_DEVICE"] = "cuda"
        backend = "nccl"
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        result = fn(*args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
    finally:
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_multirank(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    device: Optional[str] = None,
) -> list[Any]:
    device = resolve_device(device)
    if device == "cuda":
        _check_gpus(world_size)
    # A CPU run on a GPU host: the ranks must not see the GPUs (see the module docstring).
    hide_gpus = device == "cpu" and torch.cuda.is_available()
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="multirank-") as out_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, tuple(args), rank, world_size, port, out_dir, dict(env or {}), device),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        with _environ({"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else {}):
            for p in procs:
                p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                status = ("hung (killed)" if rank in hung
                          else f"died (exit code {procs[rank].exitcode})")
                errors.append(f"rank {rank}: {status} without a result")
                continue
            if device == "cuda":  # results that hold CUDA tensors come back on the CPU
                payload = torch.load(path, weights_only=False, map_location="cpu")
            else:
                payload = torch.load(path, weights_only=False)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {rank} raised:\n{payload['error']}")
        if errors:
            what = f"timed out after {timeout:.0f}s" if hung else "failed"
            raise RuntimeError(f"multi-rank run of {fn.__name__} on {world_size} ranks {what}:\n"
                               + "\n".join(errors))
        return results

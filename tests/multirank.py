"""Run a function on N fresh processes joined in a gloo process group.

    results = run_multirank(fn, world_size=2, args=(x,), timeout=120)

``fn(*args)`` runs on every rank after ``torch.distributed`` is initialized over gloo on a free
loopback port; its return value (anything ``torch.save`` can write) comes back in rank order.
A rank that raises makes the call fail with every failing rank's traceback; a rank that hangs
past ``timeout`` seconds is killed and reported. ``fn`` must be defined at module level (it is
pickled by reference into spawned processes), and the spawned ranks import only what ``fn``'s
module imports, so keep heavy imports (nemo) out of multi-rank test modules.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, args, rank, world_size, port, out_dir, env):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    out = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
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
) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="multirank-") as out_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, tuple(args), rank, world_size, port, out_dir, dict(env or {})),
                daemon=False,
            )
            for rank in range(world_size)
        ]
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
                status = "hung (killed)" if rank in hung else f"died (exit code {procs[rank].exitcode})"
                errors.append(f"rank {rank}: {status} without a result")
                continue
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

"""Micro-benchmark: preference-loss forward+backward time vs batch size on CPU (not a test).

    python scripts/bench_losses.py [--sizes 1,4,16,64,256,1024,4096] [--ranks 2]

Per batch size B (pairs per rank) it times, as the median of many runs, forward + backward of
``preference_loss`` including its metrics and the finite-input check:
  dpo              baseline (no sort)
  aot_paired       two sorts of B
  aot_unpaired     two sorts of B
  unpaired n!=m    B chosen vs B//2+1 rejected: sorts + merged-grid cells
  global (4 mb)    plan_global_sort on B + matched_partner_loss over 4 micro-batches
  dp gather        aot_unpaired with the data_parallel gather over --ranks gloo processes
                   (B per rank; rank 0's time; includes the two all-gathers and the backward
                   all-reduce)
Times in microseconds (best of --rounds interleaved medians); ratios against dpo at the same B.
Numbers depend on the machine; compare only within one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from nemo_aot.losses import (
    matched_partner_loss,
    plan_global_sort,
    preference_loss,
    transport_inputs,
)


def _inputs(n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc = (-50 + 5 * torch.randn(n, generator=g)).requires_grad_()
    pr = (-50 + 5 * torch.randn(m, generator=g)).requires_grad_()
    return pc, pr, -50 + 5 * torch.randn(n, generator=g), -50 + 5 * torch.randn(m, generator=g)


def _median_us(step, min_time=0.2, max_iters=300, warmup=3):
    for _ in range(warmup):
        step()
    times, start = [], time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def _loss_step(loss_type, n, m, gather=None):
    """One loss and backward; with ``gather`` (the data_parallel scope) the inputs are gathered
    over the ranks first, as the training step does."""
    pc, pr, rc, rr = _inputs(n, m)

    def step():
        inputs = (pc, pr, rc, rr) if gather is None else gather([pc, pr, rc, rr])
        loss, _ = preference_loss(*inputs, loss_type=loss_type, beta=0.1)
        loss.backward()
    return step


def _global_step(b, parts=4):
    pc, pr, rc, rr = _inputs(b, b)
    chunks = torch.arange(b).chunk(min(parts, b))

    def step():
        with torch.no_grad():
            plan = plan_global_sort(*transport_inputs("aot_unpaired", pc, pr, rc, rr))
        for idx in chunks:
            u, v = transport_inputs("aot_unpaired", pc[idx], pr[idx], rc[idx], rr[idx])
            matched_partner_loss(u, v, idx, idx, plan, beta=0.1).backward()
    return step


def _gather_worker(rank, world, port, sizes, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from nemo_aot.distributed.collectives import data_parallel_gather
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gather = data_parallel_gather()
    results = {}
    for b in sizes:
        step = _loss_step("aot_unpaired", b, b, gather=gather)
        # Ranks must run the same number of steps: fixed iteration counts, no time budget.
        for _ in range(3):
            step()
        medians = []
        for _ in range(5):
            times = []
            for _ in range(20 if b >= 1024 else 50):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
        results[b] = 1e6 * min(medians)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _gather_times(sizes, world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, world, port, sizes, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = queue.get(timeout=600)
    for p in procs:
        p.join()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,4,16,64,256,1024,4096")
    parser.add_argument("--ranks", type=int, default=2,
                        help="gloo ranks for the gather column (0 = skip)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds (best median kept)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    columns = {
        "dpo": lambda b: _loss_step("dpo", b, b),
        "aot_paired": lambda b: _loss_step("aot_paired", b, b),
        "aot_unpaired": lambda b: _loss_step("aot_unpaired", b, b),
        "unpaired n!=m": lambda b: _loss_step("aot_unpaired", b, b // 2 + 1),
        "global (4 mb)": _global_step,
    }
    # Interleaved rounds, best median per cell: robust to other load on a shared machine.
    steps = {(name, b): make(b) for name, make in columns.items() for b in sizes}
    best = {key: float("inf") for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            best[key] = min(best[key], _median_us(step, min_time=0.05))
    table = {name: {b: best[(name, b)] for b in sizes} for name in columns}
    if args.ranks > 1:
        table[f"dp gather x{args.ranks}"] = _gather_times(sizes, args.ranks)
    names = list(table)
    print(f"torch {torch.__version__}, CPU, 1 thread; forward+backward time in us (ratio to dpo)")
    print(f"{'B':>6} " + " ".join(f"{n:>20}" for n in names))
    for b in sizes:
        base = table["dpo"][b]
        cells = [f"{table[n][b]:10.0f} ({table[n][b] / base:5.2f}x)" for n in names]
        print(f"{b:>6} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()

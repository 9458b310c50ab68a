"""Warm-up, timed steps and the schedule: sequential on CUDA (one variant in memory at a time),
interleaved round-robin on the CPU (load from other processes hits every variant alike)."""

from __future__ import annotations

import gc
import time
import traceback

from .bench import Bench, Unavailable, Variant
from .memory import PeakMemory, free_device_memory
from .variants import BUILDERS


def timed(bench: Bench, variant: Variant) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one step."""
    bench.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = variant.step()
    bench.sync()
    return time.perf_counter() - t0, time.process_time() - c0, float(loss)


def start_variant(bench: Bench, name: str, memory: PeakMemory, record: dict,
                  memory_after_warmup: bool):
    """Build and warm up one variant; fills ``record``; returns the variant or None."""
    free_device_memory()
    memory.start()
    try:
        t0 = time.perf_counter()
        variant = BUILDERS[name](bench)
        record["build_s"] = time.perf_counter() - t0
        for _ in range(bench.args.warmup):
            record["losses"].append(timed(bench, variant)[2])
    except Unavailable as err:
        memory.stop()
        record.update(status="skipped", reason=str(err))
        print(f"  {name}: skipped ({err})", flush=True)
        return None
    except Exception as err:  # an OOM at a large batch is a result, not a crash of the bench
        memory.stop()
        record.update(status="error", reason=f"{type(err).__name__}: {err}"[:2000])
        traceback.print_exc()
        print(f"  {name}: FAILED ({type(err).__name__})", flush=True)
        return None  # its memory is freed before the next variant starts
    record["reference_forward"] = variant.reference_forward
    if memory_after_warmup:
        record["peak_memory_gib"] = memory.stop()
    return variant


def time_steps(bench: Bench, variant: Variant, record: dict, steps: int) -> None:
    for _ in range(steps):
        seconds, cpu_seconds, loss = timed(bench, variant)
        record["step_times_s"].append(seconds)
        record["step_cpu_s"].append(cpu_seconds)
        record["losses"].append(loss)


def prime(bench: Bench, names: list[str]) -> None:
    """CPU: build and step one variant of each framework once, unmeasured, so one-time process
    allocations (thread pools, BLAS/oneDNN buffers, lazy imports) are not charged to whichever
    variant happens to be measured first."""
    for prefix in ("nemo_aot", "hf"):
        name = next((n for n in names if n.startswith(prefix)), None)
        if name is None:
            continue
        try:
            BUILDERS[name](bench).step()
        except Exception:  # reported by the measured pass
            pass
        gc.collect()


def run_variants(bench: Bench, names: list[str], schedule: str) -> dict:
    """{name: record}: status, losses, step times (wall and CPU), build time, peak memory."""
    memory = PeakMemory(bench.device)
    if not memory.cuda:
        prime(bench, names)
    records = {n: {"status": "ok", "losses": [], "step_times_s": [], "step_cpu_s": []}
               for n in names}
    steps = bench.args.steps
    if schedule == "sequential":
        for name in names:
            print(f"-- {name}", flush=True)
            # CPU: the sampler thread must not run during timed steps
            variant = start_variant(bench, name, memory, records[name],
                                    memory_after_warmup=not memory.cuda)
            if variant is None:
                continue
            try:
                time_steps(bench, variant, records[name], steps)
            except Exception as err:
                records[name].update(status="error", reason=f"{type(err).__name__}: {err}"[:2000])
                traceback.print_exc()
            if memory.cuda:
                records[name]["peak_memory_gib"] = memory.stop()
            del variant
    else:
        live = {}
        for name in names:
            print(f"-- {name}: build + warm-up", flush=True)
            variant = start_variant(bench, name, memory, records[name], memory_after_warmup=True)
            if variant is not None:
                live[name] = variant
        print(f"-- timed: {steps} interleaved rounds over {list(live)}", flush=True)
        for _ in range(steps):
            for name, variant in live.items():
                time_steps(bench, variant, records[name], 1)
        for name in live:
            records[name]["interleaved"] = True
    for record in records.values():
        record["memory_method"] = memory.method
    return records

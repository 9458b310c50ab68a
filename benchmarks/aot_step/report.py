"""The result of a run: per-variant throughput, FLOPs and MFU, ratios of the nemo_aot variants
against the Hugging Face baselines run in the same process, the loss-trace check, a printed
table and the JSON file (its keys are listed in benchmarks/README.md)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
from typing import Optional

import torch

from .bench import LR, Bench

FLOP_FORMULA = ("N = L*[h*(n_q+2*n_kv)*d + n_q*d*h + 3*h*f] + h*V; "
                "trained token = 6N + 12*L*n_q*d*s; reference (no-grad) token = 2N + 4*L*n_q*d*s; "
                "MFU = step FLOPs / step time / peak dense bf16 FLOP/s")
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


def make_result(bench: Bench, records: dict, schedule: str, label: str,
                peak_tflops: Optional[float], load_before: tuple, argv=None) -> dict:
    """The JSON document of a run (``records`` from ``timing.run_variants``)."""
    args, device = bench.args, bench.device
    return {
        "benchmark": "aot_step",
        "device": {"type": device.type, "name": label, "gpu_run": device.type == "cuda"},
        "note": "GPU run" if device.type == "cuda" else (
            "CPU run, no GPU used: CPU ratios only; MFU undefined (no peak FLOP/s); memory is "
            "an approximate malloc peak (see memory_method)"),
        "config": {"shape": args.shape, "model": bench.model_cfg.to_dict(), "pairs": args.pairs,
                   "seq": args.seq, "micro_batches": args.micro_batches, "steps": args.steps,
                   "warmup": args.warmup, "precision": bench.precision, "schedule": schedule,
                   "beta": args.beta, "lr": LR, "seed": args.seed,
                   "logprob_chunk_size": args.logprob_chunk_size,
                   "torch_threads": torch.get_num_threads()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "versions": versions(),
        # the documented command, however the benchmark was started
        "command": " ".join(["python", "scripts/bench_aot_step.py"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        **summarize(bench, records, peak_tflops),
    }


def summarize(bench: Bench, records: dict, peak_tflops: Optional[float]) -> dict:
    """Adds medians, tokens/s, TFLOP/s and MFU to each record; returns them with the ratios and
    the loss-trace check."""
    from nemo_aot.algorithms.reporting import flops_per_token, throughput

    a, cfg = bench.args, bench.model_cfg
    tokens = 2 * a.pairs * a.seq
    for record in records.values():
        times = record["step_times_s"]
        if record["status"] != "ok" or not times:
            continue
        median = statistics.median(times)
        rate = throughput(tokens, median, cfg, 1, seq_length=a.seq, peak_tflops=peak_tflops,
                          forward_only_tokens=tokens if record["reference_forward"] else 0,
                          device_name="cpu" if bench.device.type == "cpu" else None)
        record.update(median_step_s=median, mean_step_s=statistics.fmean(times),
                      min_step_s=min(times), tokens_per_s=rate["tokens_per_s"],
                      tflops=rate["tflops_per_device"], mfu=rate["mfu"],
                      median_step_cpu_s=statistics.median(record["step_cpu_s"]))
    ok = {n: r for n, r in records.items() if "tokens_per_s" in r}
    ratios = {}
    for mine in (n for n in ok if n.startswith("nemo_aot")):
        # the HF baselines, and nemo_aot's own step before a change (NEMO_BASELINES)
        for base in (n for n in ok if n.startswith("hf") or n in NEMO_BASELINES):
            if base != mine:
                ratios[f"{mine}/{base}"] = ratio(ok[mine], ok[base])
    return {"tokens_per_step": tokens,
            "flops": {"formula": FLOP_FORMULA,
                      "trained_flops_per_token": flops_per_token(cfg, a.seq, training=True),
                      "reference_flops_per_token": flops_per_token(cfg, a.seq, training=False),
                      "peak_tflops": peak_tflops},
            "variants": records, "ratios": ratios, "loss_check": loss_check(records)}


# nemo_aot variants that keep an earlier code path, so a change is measured against the step
# without it in the same process.
NEMO_BASELINES = ("nemo_aot_logits",)


def ratio(mine: dict, base: dict) -> dict:
    """mine / base: tokens/s from median wall times; from median process CPU times (steadier on
    a shared CPU); the median over rounds of per-round speed-ups (interleaved runs, where
    round i of both ran back to back); peak memory."""
    out = {"tokens_per_s": mine["tokens_per_s"] / base["tokens_per_s"],
           "tokens_per_cpu_s": base["median_step_cpu_s"] / mine["median_step_cpu_s"],
           "tokens_per_s_paired_rounds": None, "peak_memory": None}
    if mine.get("interleaved") and base.get("interleaved"):
        out["tokens_per_s_paired_rounds"] = statistics.median(
            b / m for m, b in zip(mine["step_times_s"], base["step_times_s"]))
    if mine.get("peak_memory_gib") and base.get("peak_memory_gib"):
        out["peak_memory"] = mine["peak_memory_gib"] / base["peak_memory_gib"]
    return out


def loss_check(records: dict) -> Optional[dict]:
    """How far each variant's loss trace is from the anchor's (``hf`` when it ran)."""
    losses = {n: r["losses"] for n, r in records.items() if r["status"] == "ok" and r["losses"]}
    anchor = "hf" if "hf" in losses else next(iter(losses), None)
    if anchor is None:
        return None
    ref = losses[anchor]  # losses[0] is log 2 everywhere (reference = initial policy)
    return {"against": anchor,
            "after_first_update": {n: abs(v[1] - ref[1]) for n, v in losses.items()
                                   if len(v) > 1 and len(ref) > 1},
            "max_abs_diff": {n: max(abs(x - y) for x, y in zip(v, ref))
                             for n, v in losses.items()}}


def print_report(result: dict) -> None:
    print(f"\nFLOPs: {result['flops']['formula']}")
    print(f"{'variant':18} {'status':8} {'step ms':>9} {'CPU ms':>9} {'tok/s':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name, r in result["variants"].items():
        if "tokens_per_s" not in r:
            print(f"{name:18} {r['status']:8} {r.get('reason', '')[:60]}")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.3f}"
        print(f"{name:18} {'ok':8} {1e3 * r['median_step_s']:9.1f} "
              f"{1e3 * r['median_step_cpu_s']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{r['tflops']:8.3f} {mfu:>6} {mem:>9}")
    for pair, r in result["ratios"].items():
        fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        print(f"ratio {pair:30} tok/s {fmt(r['tokens_per_s'])}  per CPU-s "
              f"{fmt(r['tokens_per_cpu_s'])}  paired rounds {fmt(r['tokens_per_s_paired_rounds'])}"
              f"  peak memory {fmt(r['peak_memory'])}")
    if result["loss_check"]:
        diffs = result["loss_check"]["max_abs_diff"]
        first = result["loss_check"]["after_first_update"]
        print(f"loss traces vs {result['loss_check']['against']}: max |diff| "
              + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items())
              + "; after the first update " + ", ".join(f"{n} {d:.2e}" for n, d in first.items()))
    print(f"memory: {next(iter(result['variants'].values()))['memory_method']}")


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "transformers", "trl", "liger-kernel",
                 "transformer-engine", "nemo-toolkit", "nemo-aot"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def default_out(args, label: str) -> str:
    """benchmarks/results/aot_step_<shape>[_l<layers>]_p<pairs>_s<seq>_<device>.json"""
    layers = f"_l{args.layers}" if args.layers else ""
    name = f"aot_step_{args.shape}{layers}_p{args.pairs}_s{args.seq}_{slug(label.split(' (')[0])}"
    return os.path.join(RESULTS, name + ".json")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

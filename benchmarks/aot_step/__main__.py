"""Benchmark: one AOT training step in nemo_aot (megatron-core) vs Hugging Face transformers / TRL.

The command line of the benchmark (``python -m benchmarks.aot_step``, or the documented
``python scripts/bench_aot_step.py``): parse the arguments, pick the device and schedule, build
the shared batch and weights, run the variants, print and write the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from .bench import SHAPES, Bench, initial_state, make_batch, model_config
from .report import default_out, device_label, make_result, print_report, write_json
from .timing import run_variants
from .variants import VARIANTS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--pairs", type=int, help="preference pairs per step (default: the shape's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the shape's)")
    p.add_argument("--layers", type=int, help="override the shape's number of layers")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split the pairs into this many micro-batches (gradient accumulation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--variants",
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all; "
                        "those that cannot run here are recorded as skipped)")
    p.add_argument("--schedule", choices=("auto", "sequential", "interleaved"), default="auto",
                   help="auto: sequential on CUDA, interleaved on CPU")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--logprob-chunk-size", type=int,
                   help="nemo_aot: positions per fp32 log-prob chunk (default: the model's)")
    p.add_argument("--peak-tflops", type=float,
                   help="device peak dense bf16 TFLOP/s for MFU (default: known GPUs; none on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/aot_step_<shape>_"
                                 "p<pairs>_s<seq>_<device>.json)")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    args.pairs = args.pairs or shape["pairs"]
    args.seq = args.seq or shape["seq"]
    args.variants_named = args.variants is not None
    args.variants = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",")
                     if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.pairs < 1 or args.seq < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--pairs >= 1, --seq >= 2, --steps >= 1 and --warmup >= 0 are required")
    if args.pairs % args.micro_batches:
        p.error(f"--micro-batches={args.micro_batches} must divide --pairs={args.pairs}")
    return args


def pick_device(choice: str) -> torch.device:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible")
    if choice == "cpu" and cuda:
        # megatron-core runs on the GPU whenever one is visible (nemo_aot's CPU support is off)
        raise SystemExit("--device cpu on a CUDA host: hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                         "instead")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def pick_schedule(args: argparse.Namespace, device: torch.device) -> str:
    schedule = args.schedule if args.schedule != "auto" else (
        "sequential" if device.type == "cuda" else "interleaved")
    if schedule == "interleaved" and "hf_liger" in args.variants and has_module("liger_kernel"):
        schedule = "sequential"  # Liger patches transformers' Llama module globally
    return schedule


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    from nemo_aot.algorithms.reporting import peak_tflops_for
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    model_cfg = model_config(args)
    schedule = pick_schedule(args, device)
    label = device_label(device)
    peak = args.peak_tflops or (peak_tflops_for(label) if device.type == "cuda" else None)
    print(f"AOT step benchmark: {args.shape} ({model_cfg.num_layers} layers), {args.pairs} pairs x "
          f"{args.seq} tokens, {precision}, {label}, {schedule}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    initialize_model_parallel(ParallelConfig(), model_cfg, seed=args.seed)
    bench = Bench(args, model_cfg, device, precision, initial_state(model_cfg, precision),
                  make_batch(args.pairs, args.seq, model_cfg.vocab_size, args.micro_batches,
                             args.seed))
    load_before = os.getloadavg()
    records = run_variants(bench, args.variants, schedule)
    result = make_result(bench, records, schedule, label, peak, load_before, argv)
    print_report(result)
    out = args.out or default_out(args, label)
    write_json(result, out)
    print(f"wrote {out}")
    return 0 if any(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

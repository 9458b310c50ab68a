"""Packed vs padded preference batches: real tokens/s of one AOT training step, side by side in
one process (interleaved rounds, so load from other processes hits both alike).

    python -m benchmarks.packing [--steps 6] [--seq 512] [--pairs 8] [--out FILE.json]

Both variants train the same model (the tiny bench shape) from the same weights on the same
pairs, drawn with a wide length spread (prompts 8-300 tokens, responses 8-200, uniform): the
padded step pads every sequence of a micro-batch to its longest, the packed step packs whole
sequences into rows of up to ``--seq`` tokens (``data.pack_sequences``). Their losses must agree
(checked); the ratio of real tokens per second is the result. Not a timed test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from .aot_step.bench import SHAPES, Bench, initial_state
from .aot_step.variants import build_nemo


def _batches(args) -> tuple[list, list, dict]:
    from nemo_aot.data.collate import collate_step, slot_efficiency
    from nemo_aot.data.synthetic import synthetic_preference_data

    data = synthetic_preference_data("paired", (args.pairs,), vocab_size=4096, seed=args.seed,
                                     prompt_len=(8, 300), response_len=(8, 200))
    step = [(list(range(args.pairs)),)]
    padded = collate_step(data, step, pad_to_multiple_of=8)
    packed = collate_step(data, step, pad_to_multiple_of=8, pack_capacity=args.seq)
    return padded, packed, slot_efficiency(data, [step], args.seq, 8)


def _variant(args, model_cfg, state, batch):
    bench_args = argparse.Namespace(beta=0.1, logprob_chunk_size=None, warmup=1,
                                    steps=args.steps, pairs=args.pairs, micro_batches=1)
    bench = Bench(bench_args, model_cfg, torch.device("cpu"), "fp32", state, batch)
    return build_nemo(bench, reference_forward=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "packing_tiny_cpu.json"))
    args = p.parse_args(argv)
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    model_cfg = dataclasses.replace(SHAPES["tiny"]["model"], encoder_seq_length=args.seq,
                                    max_position_embeddings=max(args.seq, 512))
    initialize_model_parallel(ParallelConfig(), model_cfg, seed=args.seed)
    padded, packed, share = _batches(args)
    real = int(sum(int(mb["seq_lengths"].sum()) for mb in padded))
    state = initial_state(model_cfg, "fp32")
    variants = {"padded": _variant(args, model_cfg, state, padded),
                "packed": _variant(args, model_cfg, state, packed)}
    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    for name, v in variants.items():  # warm-up
        losses[name].append(v.step())
    for _ in range(args.steps):
        for name, v in variants.items():
            t0 = time.perf_counter()
            losses[name].append(v.step())
            times[name].append(time.perf_counter() - t0)
    diff = max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"]))
    median = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "shape": "tiny", "seq": args.seq, "pairs": args.pairs, "real_tokens_per_step": real,
        "slots_per_step": {"padded": int(sum(mb["input_ids"].numel() for mb in padded)),
                           "packed": int(sum(mb["input_ids"].numel() for mb in packed))},
        "real_tokens_per_slot": share, "median_step_s": median,
        "real_tokens_per_s": {n: real / t for n, t in median.items()},
        "ratio_packed_over_padded": median["padded"] / median["packed"],
        "max_loss_difference": diff, "device": "cpu", "threads": torch.get_num_threads()}
    print(f"packed vs padded, tiny shape, {args.pairs} pairs, rows up to {args.seq} tokens, CPU: "
          f"real tokens per slot {share['padded']:.1%} padded -> {share['packed']:.1%} packed; "
          f"step {median['padded']:.2f} s -> {median['packed']:.2f} s; real tokens/s ratio "
          f"{result['ratio_packed_over_padded']:.2f}x; loss traces differ by at most {diff:.1e}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Step 1 of the study: a tiny Llama-style reference policy that is right only part of the time.

    python -m scripts.experiments.sft_reference --out study/reference [--steps 1500]

1. Draw the task splits (``common.task_splits``) and write the SFT set: one correct answer
   per SFT question ("17 + 25 = 42"), TRL paired format (the rejected side holds a plausible
   wrong answer that SFT ignores; it is there because the data pipeline speaks preferences).
2. Build a random tiny Llama with ``transformers`` (vocab 512, hidden 64, 2 layers, 4 heads,
   2 KV heads, SwiGLU 176) and convert it to ``.nemo`` (``hf_to_nemo``).
3. Fine-tune it on nemo_aot's megatron path (``nemo_aot.algorithms.sft.train_sft``). Every
   ``--check-every`` steps the live weights are copied into a Hugging Face Llama (the exporter's
   conversion tables) and answer the dev questions greedily (dev questions are disjoint from
   the preference and held-out questions); training stops at the first check whose verifier
   accuracy reaches ``--target-low``. The result warns when it ends outside
   [``--target-low``, ``--target-high``] (``--steps`` ran out, or one interval jumped past it).

Writes ``reference.nemo``, ``reference.json`` (the final step, the dev accuracy curve, the SFT
loss curve, timings) and the SFT data under ``--out``. Deterministic for a given seed on one
machine (CPU kernels may differ in the last bits across CPUs).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from nemo_aot.data import demo_task

from . import common


def write_sft_data(path: str, questions: list, seed: int) -> int:
    rng = random.Random(seed)
    records = []
    for question, a, op, b in questions:
        right = demo_task.OPERATIONS[op](a, b)
        wrong = demo_task.wrong_result(rng, a, op, b)
        records.append({"prompt": common.user(question),
                        "chosen": common.assistant(demo_task.format_answer(a, op, b, right)),
                        "rejected": common.assistant(demo_task.format_answer(a, op, b, wrong))})
    return common.write_jsonl(path, records)


def tiny_llama_nemo(path: str, seed: int) -> None:
    """A random tiny Llama built by transformers, converted to .nemo (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_aot.conversion.convert import hf_to_nemo
    from nemo_aot.data.tokenization import resolve_path

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with tempfile.TemporaryDirectory(prefix="aot_study_init_") as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        hf_to_nemo(tmp, path, dtype="fp32", tokenizer_dir=resolve_path(common.TOKENIZER))


def sft_run(train_path: str, init_from: str, args):
    from nemo_aot.algorithms.resolve import resolve_run

    return resolve_run([
        "recipe=demo", f"init_from={init_from}", f"data.train_path={train_path}",
        "data.validation_path=null",
        f"data.tokenizer_path={common.TOKENIZER}", "data.max_seq_length=64",
        f"data.seed={args.seed}", f"trainer.seed={args.seed}",
        f"trainer.max_steps={args.steps}", "trainer.max_epochs=null",
        f"trainer.global_batch_size={args.batch_size}",
        f"trainer.micro_batch_size={args.batch_size}",
        "precision.precision=fp32", f"optim.lr={args.lr}",
        f"optim.warmup_steps={min(20, args.steps // 10)}",
        # constant after warmup: the stopping point below must not depend on the schedule's end
        "optim.lr_decay_style=constant", "optim.weight_decay=0.0",
        "alignment.loss_type=dpo", "alignment.sort_scope=micro",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=1500, help="most SFT steps")
    parser.add_argument("--check-every", type=int, default=50,
                        help="steps between dev greedy-accuracy checks")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-questions", type=int, default=common.SPLIT_SIZES["dev"])
    parser.add_argument("--target-low", type=float, default=0.4)
    parser.add_argument("--target-high", type=float, default=0.7)
    parser.add_argument("--sft-questions", type=int, default=common.SPLIT_SIZES["sft"])
    args = parser.parse_args(argv)
    common.quiet_warnings()
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    splits = common.task_splits()
    train_path = os.path.join(args.out, "sft_train.jsonl")
    write_sft_data(train_path, splits["sft"][:args.sft_questions], args.seed)
    init = os.path.join(args.out, "init.nemo")
    tiny_llama_nemo(init, args.seed)

    from nemo_aot.algorithms.sft import train_sft

    dev = [q for q, *_ in splits["dev"][:args.dev_questions]]
    run = sft_run(train_path, init, args)
    curve = []

    def reached_target(step, chunks):
        policy = common.HFPolicy.from_megatron(chunks[0], cfg_model[0])
        accuracy, _ = common.greedy_accuracy(policy, dev)
        curve.append({"step": step, "dev_accuracy": accuracy})
        print(f"sft step {step:5d}: dev greedy accuracy {accuracy:.3f}", flush=True)
        return accuracy >= args.target_low

    cfg_model = [run.config.model]  # resolved: the architecture of init_from
    out = os.path.join(args.out, "reference.nemo")
    result = train_sft(run, out, stop_when=reached_target, check_every=args.check_every)
    final = curve[-1] if curve and curve[-1]["step"] == result.steps else None
    if final is None or not args.target_low <= final["dev_accuracy"] <= args.target_high:
        print(f"warning: the reference's dev accuracy is outside [{args.target_low}, "
              f"{args.target_high}]: {final}; adjust --steps/--lr", flush=True)
    common.write_json(os.path.join(args.out, "reference.json"), {
        "step": result.steps, "dev_accuracy": final and final["dev_accuracy"], "dev_curve": curve,
        "sft_loss": [[r["step"], r["loss"]] for r in result.history],
        "args": vars(args), "seconds": time.monotonic() - started})
    print(f"reference: SFT step {result.steps}, dev greedy accuracy "
          f"{final and final['dev_accuracy']} -> {out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

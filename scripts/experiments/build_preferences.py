"""Step 2 of the study: preference data from the reference policy's own samples.

    python -m scripts.experiments.build_preferences --reference study/reference/reference.nemo \
        --out study/data [--samples 4 --temperature 1.0]

For every question of a split, sample ``--samples`` answers from the reference (the Hugging Face
export, temperature sampling), judge each with the verifier (``demo_task.score_answer``) and keep
the distinct answers. Then write, per split:

  <split>_paired.jsonl     TRL paired: one pair per question that has a correct and a wrong
                           answer (chosen = a correct one, rejected = a wrong one)
  <split>_unpaired.jsonl   TRL unpaired: every distinct judged answer with label true/false, so
                           positives and negatives come in unequal numbers (a thumbs-up/down log)

Splits: ``train`` (the preference questions), ``dev`` (the trainer's validation split) and
``heldout`` (questions nothing trains on; its pairs give the held-out rewards). ``heldout.json``
also stores the reference's greedy answers (the baseline of the win rate), and ``summary.json``
the counts and the reference's accuracies.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from nemo_aot.data import demo_task

from . import common


def judged_samples(policy, questions: list, samples: int, temperature: float, seed: int) -> list:
    """Per question: (distinct answers in sampling order, their 0/1 verdicts)."""
    drawn = policy.generate(questions, num_samples=samples, temperature=temperature, seed=seed)
    out = []
    for question, answers in zip(questions, drawn):
        distinct = list(dict.fromkeys(a.strip() for a in answers if a.strip()))
        out.append((distinct, [demo_task.score_answer(question, a) for a in distinct]))
    return out


def paired_records(questions: list, judged: list, rng: random.Random) -> list:
    records = []
    for question, (answers, verdicts) in zip(questions, judged):
        right = [a for a, v in zip(answers, verdicts) if v]
        wrong = [a for a, v in zip(answers, verdicts) if not v]
        if right and wrong:
            records.append({"prompt": common.user(question),
                            "chosen": common.assistant(rng.choice(right)),
                            "rejected": common.assistant(rng.choice(wrong))})
    return records


def unpaired_records(questions: list, judged: list) -> list:
    return [{"prompt": common.user(question), "completion": common.assistant(answer),
             "label": bool(verdict)}
            for question, (answers, verdicts) in zip(questions, judged)
            for answer, verdict in zip(answers, verdicts)]


def build(reference: str, out: str, sizes: dict, samples: int = 4, temperature: float = 1.0,
          seed: int = 0) -> dict:
    started = time.monotonic()
    splits = {k: v[:sizes[k]] for k, v in common.task_splits().items() if k in sizes}
    policy = common.HFPolicy.from_nemo(reference)
    rng = random.Random(seed)
    summary = {"samples_per_question": samples, "temperature": temperature, "splits": {}}
    for name, split in (("train", "preference"), ("dev", "dev"), ("heldout", "heldout")):
        questions = [q for q, *_ in splits[split]]
        judged = judged_samples(policy, questions, samples, temperature, seed + len(name))
        paired = paired_records(questions, judged, rng)
        unpaired = unpaired_records(questions, judged)
        common.write_jsonl(os.path.join(out, f"{name}_paired.jsonl"), paired)
        common.write_jsonl(os.path.join(out, f"{name}_unpaired.jsonl"), unpaired)
        positives = sum(r["label"] for r in unpaired)
        summary["splits"][name] = {
            "questions": len(questions), "pairs": len(paired), "positives": positives,
            "negatives": len(unpaired) - positives,
            "sample_accuracy": sum(sum(v) for _, v in judged) / max(
                sum(len(v) for _, v in judged), 1)}
    heldout = [q for q, *_ in splits["heldout"]]
    accuracy, greedy = common.greedy_accuracy(policy, heldout)
    common.write_json(os.path.join(out, "heldout.json"),
                      {"questions": heldout, "reference_greedy": greedy})
    summary["reference_heldout_greedy_accuracy"] = accuracy
    summary["seconds"] = time.monotonic() - started
    common.write_json(os.path.join(out, "summary.json"), summary)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="the reference .nemo")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--samples", type=int, default=4, help="samples per question")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--preference-questions", type=int,
                        default=common.SPLIT_SIZES["preference"])
    parser.add_argument("--heldout-questions", type=int, default=common.SPLIT_SIZES["heldout"])
    parser.add_argument("--dev-questions", type=int, default=common.SPLIT_SIZES["dev"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    common.quiet_warnings()
    sizes = {"heldout": args.heldout_questions, "dev": args.dev_questions,
             "preference": args.preference_questions}
    summary = build(args.reference, args.out, sizes, args.samples, args.temperature, args.seed)
    for name, s in summary["splits"].items():
        print(f"{name:8s} {s['questions']} questions: {s['pairs']} pairs; {s['positives']} "
              f"positives / {s['negatives']} negatives; sample accuracy "
              f"{s['sample_accuracy']:.3f}")
    print(f"reference held-out greedy accuracy {summary['reference_heldout_greedy_accuracy']:.3f}"
          f" ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

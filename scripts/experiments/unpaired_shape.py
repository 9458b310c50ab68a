"""Unpaired data at its natural shape: unpaired AOT on every judged sample against DPO on the
pairs that can be formed from the same samples, at equal compute.

    python -m scripts.experiments.unpaired_shape --mode quick --out /tmp/unpaired_shape \
        --reference study_quick/reference/reference.nemo --jobs 1
    python -m scripts.experiments.unpaired_shape --mode smoke --out /tmp/shape_smoke --jobs 1

The paper's unpaired setting: answers judged one at a time (thumbs up / down), positives and
negatives at unequal counts, several negatives per prompt, some prompts with no positive (or no
negative) at all. ``build_preferences`` writes exactly that (``train_unpaired.jsonl``: every
distinct judged answer, about 1 positive per 4 negatives). From those samples:

* ``aot_unpaired`` trains on the unpaired set as it is: every sample, positives and negatives
  at the data's own share in each micro-batch (``data.unpaired_positive_fraction=null``), one
  sort over the whole step.
* ``dpo`` on *all formable pairs*: every negative of a prompt that has at least one positive,
  paired with a positive of its prompt (the prompt's positives in turn), so every negative that
  can enter a pair does, once (``train_allpairs.jsonl``, written by this module). Prompts with
  only negatives or only positives give no pair: their samples are what pairing loses.
* ``dpo`` on *one pair per prompt*: the study's paired set (``train_paired.jsonl``: a random
  positive against a random negative of each prompt that has both), for reference.
* ``aot_unpaired`` as above but sorting 4 answers at a time (8 micro-batches of 4 per step;
  ``sort_scope=micro``), the sort size that did best in the study's sort-batch sweep. At 4 the
  data's share of positives rounds to 1 positive per 3 negatives.

Equal compute: every run forwards the same number of sequences per step (``sequences``: 32 =
32 single answers or 16 pairs) for the same number of steps, with the study's optimizer and
schedule, from the same reference (also the frozen reference policy). Evaluation, seeds and the
rest are ``run_study``'s (its ``train_overrides``, ``train_run`` and ``Evaluator``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from . import common, report, run_study


@dataclasses.dataclass(frozen=True)
class Cell:
    label: str          # a key of CELLS
    beta: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.label}-b{self.beta:g}-s{self.seed}"

    @property
    def loss_type(self) -> str:
        return self.label.split("-")[0]


# label -> (training file under data/, paired, sequences per sort: None = the whole step)
CELLS = {"aot_unpaired-natural": ("train_unpaired.jsonl", False, None),
         "aot_unpaired-natural-sort4": ("train_unpaired.jsonl", False, 4),
         "dpo-allpairs": ("train_allpairs.jsonl", True, None),
         "dpo-onepair": ("train_paired.jsonl", True, None)}


@dataclasses.dataclass
class Mode:
    data: list                  # build_preferences.py arguments
    steps: int
    sequences: int              # sequences forwarded per step, every cell
    betas: tuple
    seeds: tuple
    cells: tuple = tuple(CELLS)
    lr: float = 1e-4
    heldout: int = 400
    dev: int = 200
    reference: str = None       # default of --reference ("bundled": the packaged policy)

    def runs(self) -> list:
        return [Cell(label, beta, seed) for seed in self.seeds for beta in self.betas
                for label in self.cells]

    def study_mode(self) -> run_study.Mode:
        """The run_study settings ``train_overrides`` reads (steps, batch, lr)."""
        return run_study.Mode(sft=[], data=self.data, steps=self.steps,
                              sequences=self.sequences, lr=self.lr, losses=(), betas=(),
                              seeds=(), scope_betas=(), scopes=())


MODES = {
    "smoke": Mode(data=["--preference-questions", "96", "--dev-questions", "32",
                        "--heldout-questions", "32"], steps=4, sequences=8, betas=(2.0,),
                  seeds=(0,), heldout=32, dev=32, reference="bundled"),
    # quick: the study's budget (150 steps of 32 sequences) at its two quick betas, 3 seeds
    "quick": Mode(data=[], steps=150, sequences=32, betas=(0.5, 2.0), seeds=(0, 1, 2)),
}


def all_pairs(unpaired: list) -> tuple:
    """TRL paired records from TRL unpaired ones: per prompt (in file order) with at least one
    positive and one negative, each negative against the prompt's positives in turn. Returns
    (records, counts)."""
    by_prompt: dict = {}
    for r in unpaired:
        key = json.dumps(r["prompt"])
        entry = by_prompt.setdefault(key, (r["prompt"], [], []))
        entry[1 if r["label"] else 2].append(r["completion"])
    records, used_pos = [], 0
    for prompt, positives, negatives in by_prompt.values():
        if positives and negatives:
            used_pos += min(len(positives), len(negatives))
            records += [{"prompt": prompt, "chosen": positives[i % len(positives)],
                         "rejected": neg} for i, neg in enumerate(negatives)]
    positives = sum(r["label"] for r in unpaired)
    counts = {"prompts": len(by_prompt), "samples": len(unpaired), "positives": positives,
              "negatives": len(unpaired) - positives,
              "prompts_with_both": sum(bool(p and n) for _, p, n in by_prompt.values()),
              "pairs": len(records), "positives_in_pairs": used_pos,
              "negatives_in_pairs": len(records)}
    return records, counts


# ----------------------------------------------------------------------------- orchestration


def orchestrate(args) -> int:
    mode = MODES[args.mode]
    out = os.path.abspath(args.out)
    reference = run_study.reference_path(args.reference or mode.reference, out)
    os.makedirs(out, exist_ok=True)
    plan = {"mode": args.mode, "reference": reference, "mode_config": dataclasses.asdict(mode)}
    plan_path = os.path.join(out, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            if json.load(f) != json.loads(json.dumps(plan)):
                raise SystemExit(f"{out} holds runs of another configuration; use a new --out")
    common.write_json(plan_path, plan)
    run_study.comparison_stages("unpaired_shape", args, out, reference, mode, mode.runs(),
                                "policy.nemo", write_report, more_data=_all_pairs_file)
    return 0


def _all_pairs_file(data: str) -> None:
    """Every formable pair of the unpaired set, beside the study's one-pair-per-prompt set."""
    if os.path.exists(os.path.join(data, "train_allpairs.jsonl")):
        return
    records, counts = all_pairs(common.read_jsonl(os.path.join(data, "train_unpaired.jsonl")))
    common.write_jsonl(os.path.join(data, "train_allpairs.jsonl"), records)
    counts["one_pair_per_prompt"] = len(common.read_jsonl(
        os.path.join(data, "train_paired.jsonl")))
    common.write_json(os.path.join(data, "shape.json"), counts)


# ----------------------------------------------------------------------------- workers


def _load(out: str):
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    mode = Mode(**plan["mode_config"])
    return plan, mode, {r.name: r for r in mode.runs()}


def overrides(cell: Cell, mode: Mode, out: str, reference: str, run_dir: str) -> list:
    """run_study's overrides of the cell's loss, with its own training file and micro-batch
    (one micro-batch per step, so the whole step is one sort, unless the cell sorts fewer
    sequences) and, for unpaired data, the data's own share of positives."""
    train_file, paired, sort = CELLS[cell.label]
    per_step = mode.sequences // 2 if paired else mode.sequences
    run = run_study.Run(cell.loss_type, cell.beta, "micro", sort or per_step, 1, cell.seed)
    base = run_study.train_overrides(run, mode.study_mode(), out, reference, run_dir,
                                     paired=paired)
    mine = {"data.train_path": os.path.join(out, "data", train_file),
            "data.unpaired_positive_fraction": "null"}
    return [o for o in base if o.split("=", 1)[0] not in mine] + \
        [f"{k}={v}" for k, v in mine.items()]


def train_worker(out: str, names: list) -> None:
    common.quiet_warnings()
    plan, mode, cells = _load(out)
    for name in names:
        run_dir = os.path.join(out, "runs", name)
        run_study.train_run(run_dir, overrides(cells[name], mode, out, plan["reference"],
                                               run_dir), mode.steps,
                            {"cell": dataclasses.asdict(cells[name])})


def eval_worker(out: str, names: list) -> None:
    common.quiet_warnings()
    plan, mode, _ = _load(out)
    evaluator = run_study.Evaluator(os.path.join(out, "data"), plan["reference"], mode.heldout,
                                    mode.dev)
    for name in names:
        policy = evaluator.reference if name == "reference" else common.HFPolicy.from_nemo(
            os.path.join(out, "runs", name, "policy.nemo"))
        evaluator.write(os.path.join(out, "runs", name, "eval.json"), name, policy)


# ----------------------------------------------------------------------------- report


COLUMNS = (("heldout_accuracy", "held-out greedy accuracy"), ("win_rate", "win rate vs reference"),
           ("fsd_violation", "FSD violation"), ("reward_accuracy", "reward accuracy"),
           ("dev_accuracy", "dev accuracy"), ("train_reward_chosen", "train reward chosen"),
           ("train_reward_rejected", "train reward rejected"))


def write_report(out: str, mode: Mode, runs: list, timings: dict) -> dict:
    """results.md / results.json: mean +- sample std over seeds per cell and beta."""
    records = []
    for r in runs:
        folder = os.path.join(out, "runs", r.name)
        with open(os.path.join(folder, "eval.json")) as f:
            record = json.load(f)
        with open(os.path.join(folder, "train.json")) as f:
            record["train_seconds"] = json.load(f)["seconds"]
        record.update(report._final_train_rewards(os.path.join(folder, "metrics.jsonl")))
        records.append({**dataclasses.asdict(r), **record})
    rows = report.aggregate(records, ("label", "beta"))
    rows.sort(key=lambda row: (row["beta"], list(CELLS).index(row["label"])))
    with open(os.path.join(out, "runs", "reference", "eval.json")) as f:
        ref = json.load(f)
    with open(os.path.join(out, "data", "shape.json")) as f:
        shape = json.load(f)
    lines = ["# Unpaired data at its natural shape", "",
             f"Training samples: {shape['samples']} judged answers to {shape['prompts']} prompts "
             f"({shape['positives']} positive, {shape['negatives']} negative); "
             f"{shape['prompts_with_both']} prompts have both, giving {shape['pairs']} pairs "
             f"(every negative of those prompts once, {shape['positives_in_pairs']} positives) "
             f"or {shape['one_pair_per_prompt']} with one pair per prompt.", "",
             f"Every run: {mode.steps} steps of {mode.sequences} sequences (aot_unpaired: "
             f"{mode.sequences} answers; dpo: {mode.sequences // 2} pairs), one sort per step "
             "(sort4: 4 answers per sort).",
             "", "| cell | beta | " + " | ".join(t for _, t in COLUMNS) + " | train s | seeds |",
             "|---" * (len(COLUMNS) + 4) + "|",
             f"| reference | - | {ref['heldout_accuracy']:.3f} | {ref['win_rate']:.3f} | - | "
             f"{ref['reward_accuracy']:.3f} | {ref['dev_accuracy']:.3f} | - | - | - | - |"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['beta']:g} | " + " | ".join(
            report._fmt(row[k]) for k, _ in COLUMNS) +
            f" | {report._fmt(row['train_seconds'], 0)} | {len(row['seeds'])} |")
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                       timings.items())]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    result = {"rows": rows, "shape": shape, "timings": timings,
              "reference": {k: ref.get(k) for k, _ in COLUMNS}}
    common.write_json(os.path.join(out, "results.json"), result)
    return result


# ----------------------------------------------------------------------------- entry


def main(argv=None) -> int:
    return common.comparison_main(__doc__, MODES, train_worker, eval_worker, orchestrate, argv)


if __name__ == "__main__":
    sys.exit(main())

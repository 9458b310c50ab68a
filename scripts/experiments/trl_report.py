"""Tables of ``trl_crosscheck``: nemo_aot vs TRL per cell (mean +- std over seeds), and the
per-step agreement of the two trainers on identical batches (loss, gradient norm before
clipping, learning rate, rewards), step 1 shown on its own."""

from __future__ import annotations

import json
import os
import statistics

from . import common

METRICS = (("heldout_accuracy", "held-out greedy accuracy"), ("win_rate", "win rate vs reference"),
           ("fsd_violation", "FSD violation"), ("reward_accuracy", "reward accuracy"))
TRACES = ("loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected")


def _fmt(values: list) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _rel(a, b) -> float:
    if a is None or b is None:
        return float("nan")
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def step_agreement(out: str, nemo_name: str, trl_name: str) -> dict:
    """Per trace: the largest relative difference over the steps, and over steps 1-3."""
    nemo = _read(os.path.join(out, "runs", nemo_name, "steps.json"))
    trl = _read(os.path.join(out, "runs", trl_name, "steps.json"))
    assert [s["step"] for s in nemo] == [s["step"] for s in trl], (nemo_name, trl_name)
    result = {"steps": len(nemo), "step1": {"nemo_aot": nemo[0], "trl": trl[0]}}
    for key in TRACES:
        diffs = [_rel(a[key], b[key]) for a, b in zip(nemo, trl)]
        result[key] = {"max_rel_diff": max(diffs), "max_rel_diff_steps_1_3": max(diffs[:3])}
    return result


def write_report(out: str, mode, runs: list, timings: dict) -> None:
    cells = sorted({(r.loss_type, r.beta, r.sort_batch) for r in runs},
                   key=lambda c: (c[1], c[0] != "dpo", c[2]))
    records = {r.name: _read(os.path.join(out, "runs", r.name, "eval.json")) for r in runs}
    reference = _read(os.path.join(out, "runs", "reference", "eval.json"))
    rows, agreement = [], {}
    for loss, beta, sort in cells:
        for trainer in ("nemo_aot", "trl"):
            members = [r for r in runs if (r.trainer, r.loss_type, r.beta, r.sort_batch) ==
                       (trainer, loss, beta, sort)]
            rows.append({"trainer": trainer, "loss_type": loss, "beta": beta, "sort_batch": sort,
                         "seeds": [r.seed for r in members],
                         **{k: [records[r.name][k] for r in members] for k, _ in METRICS}})
        for r in runs:
            if r.trainer == "nemo_aot" and (r.loss_type, r.beta, r.sort_batch) == (loss, beta,
                                                                                    sort):
                trl_name = r.name.replace("nemo_aot-", "trl-", 1)
                agreement[r.name] = step_agreement(out, r.name, trl_name)
    lines = ["# nemo_aot vs TRL DPOTrainer on the study's paired set", "",
             f"steps {mode.steps}, betas {list(mode.betas)}, seeds {list(mode.seeds)}", "",
             "| loss | beta | sort batch | trainer | " + " | ".join(t for _, t in METRICS)
             + " | seeds |", "|---" * (len(METRICS) + 5) + "|",
             f"| reference | - | - | - | {reference['heldout_accuracy']:.3f} | "
             f"{reference['win_rate']:.3f} | - | {reference['reward_accuracy']:.3f} | - |"]
    for row in rows:
        lines.append(f"| {row['loss_type']} | {row['beta']:g} | {row['sort_batch']} | "
                     f"{row['trainer']} | " + " | ".join(_fmt(row[k]) for k, _ in METRICS)
                     + f" | {len(row['seeds'])} |")
    lines += ["", "## Per-step agreement on identical batches (largest relative difference)", "",
              "| run | steps | " + " | ".join(TRACES) + " | loss, steps 1-3 | "
              "grad norm, steps 1-3 |", "|---" * (len(TRACES) + 4) + "|"]
    for name, a in agreement.items():
        lines.append(f"| {name} | {a['steps']} | " + " | ".join(
            f"{a[k]['max_rel_diff']:.1e}" for k in TRACES) +
            f" | {a['loss']['max_rel_diff_steps_1_3']:.1e} | "
            f"{a['grad_norm']['max_rel_diff_steps_1_3']:.1e} |")
    lines += ["", "## Step 1 (same weights, same batch)", "",
              "| run | nemo_aot loss | TRL loss | nemo_aot grad norm | TRL grad norm |",
              "|---|---|---|---|---|"]
    for name, a in agreement.items():
        n, t = a["step1"]["nemo_aot"], a["step1"]["trl"]
        lines.append(f"| {name} | {n['loss']:.6f} | {t['loss']:.6f} | {n['grad_norm']:.6f} | "
                     f"{t['grad_norm']:.6f} |")
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                       timings.items())]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    common.write_json(os.path.join(out, "results.json"),
                      {"rows": rows, "agreement": agreement, "timings": timings,
                       "reference": {k: reference[k] for k, _ in METRICS}})

"""Tables and plots of the study from its run folders (called by ``run_study.py``; rerun alone
with ``python -m scripts.experiments.report STUDY_DIR`` from the repository root).

Every number is a mean +- sample standard deviation over seeds of what the eval stage wrote;
nothing is filtered. The headline table picks, for each loss type, the beta with the best mean
*dev* greedy accuracy (dev questions are disjoint from the held-out ones) and reports that
beta's held-out numbers; the full sweep is listed below it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict

from . import common

METRICS = ("heldout_accuracy", "win_rate", "fsd_violation", "reward_accuracy", "dev_accuracy",
           "train_reward_chosen", "train_reward_rejected")
LOSS_ORDER = ("aot_unpaired", "aot_paired", "dpo", "ipo")
SCOPE_ORDER = ("micro", "data_parallel", "global")


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(values)}


def _fmt(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def load(out: str) -> tuple:
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    runs = {}
    for spec in plan["runs"]:
        name = _name(spec)
        folder = os.path.join(out, "runs", name)
        with open(os.path.join(folder, "eval.json")) as f:
            record = json.load(f)
        train = os.path.join(folder, "train.json")
        if os.path.exists(train):
            with open(train) as f:
                record["train_seconds"] = json.load(f)["seconds"]
        record.update(_final_train_rewards(os.path.join(folder, "metrics.jsonl")))
        runs[name] = {**spec, **record}
    groups = {g: [runs[n] for n in names] for g, names in plan["groups"].items()}
    with open(os.path.join(out, "runs", "reference", "eval.json")) as f:
        reference = json.load(f)
    return plan, groups, reference


def _final_train_rewards(path: str, fraction: float = 0.1) -> dict:
    """Mean training-batch rewards (``rewards/chosen``, ``rewards/rejected``: TRL's
    beta * log pi/pi_ref of chosen / rejected answers) over the last ``fraction`` of the logged
    steps: where the run moved the two distributions."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        train = [r for r in map(json.loads, f) if r.get("split") == "train"]
    tail = train[-max(1, int(len(train) * fraction)):]
    out = {}
    for key, name in (("rewards/chosen", "train_reward_chosen"),
                      ("rewards/rejected", "train_reward_rejected")):
        values = [r[key] for r in tail if r.get(key) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def _name(spec: dict) -> str:
    return (f"{spec['loss_type']}-b{spec['beta']:g}-{spec['sort_scope']}-mbs"
            f"{spec['micro_batch_size']}-dp{spec['dp']}-s{spec['seed']}")


def aggregate(runs: list, keys: tuple) -> list:
    groups = defaultdict(list)
    for r in runs:
        groups[tuple(r[k] for k in keys)].append(r)
    rows = []
    for key, members in groups.items():
        row = dict(zip(keys, key))
        row["seeds"] = sorted(m["seed"] for m in members)
        for metric in METRICS + ("train_seconds",):
            row[metric] = _stats([m.get(metric) for m in members])
        rows.append(row)
    return rows


def _sort_batch(row: dict, sequences: int) -> int:
    per_step = sequences // 2 if row["loss_type"] != "aot_unpaired" else sequences
    return {"micro": row["micro_batch_size"], "data_parallel": row["micro_batch_size"] * row["dp"],
            "global": per_step}[row["sort_scope"]]


def build_tables(plan: dict, groups: dict) -> dict:
    sequences = plan["mode_config"]["sequences"]
    sweep = aggregate(groups["loss"], ("loss_type", "beta"))
    sweep.sort(key=lambda r: (LOSS_ORDER.index(r["loss_type"]), r["beta"]))
    headline = []
    for loss in LOSS_ORDER:
        rows = [r for r in sweep if r["loss_type"] == loss]
        if rows:
            headline.append(max(rows, key=lambda r: (r["dev_accuracy"]["mean"] or 0.0)))
    scope = aggregate(groups["scope"], ("loss_type", "beta", "sort_scope", "micro_batch_size",
                                        "dp"))
    for row in scope:
        row["sort_batch"] = _sort_batch(row, sequences)
    scope.sort(key=lambda r: (r["beta"], SCOPE_ORDER.index(r["sort_scope"]), r["sort_batch"]))
    return {"headline": headline, "sweep": sweep, "scope": scope}


def _loss_table(rows: list, reference: dict = None) -> list:
    lines = ["| loss | beta | held-out greedy accuracy | win rate vs reference | "
             "FSD violation (held-out rewards) | reward accuracy (held-out pairs) | "
             "dev greedy accuracy | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    if reference is not None:
        lines.append(f"| reference (SFT) | - | {reference['heldout_accuracy']:.3f} | 0.500 | - | "
                     f"0.500 | {reference['dev_accuracy']:.3f} | - |")
    for r in rows:
        lines.append(f"| {r['loss_type']} | {r['beta']:g} | {_fmt(r['heldout_accuracy'])} | "
                     f"{_fmt(r['win_rate'])} | {_fmt(r['fsd_violation'])} | "
                     f"{_fmt(r['reward_accuracy'])} | {_fmt(r['dev_accuracy'])} | "
                     f"{len(r['seeds'])} |")
    return lines


def _scope_table(rows: list) -> list:
    lines = ["| beta | sort scope | micro-batch | DP ranks | sort batch | held-out greedy accuracy "
             "| win rate vs reference | FSD violation | reward accuracy | train reward chosen "
             "| train reward rejected | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['beta']:g} | {r['sort_scope']} | {r['micro_batch_size']} | {r['dp']} | "
                     f"{r['sort_batch']} | {_fmt(r['heldout_accuracy'])} | {_fmt(r['win_rate'])} | "
                     f"{_fmt(r['fsd_violation'])} | {_fmt(r['reward_accuracy'])} | "
                     f"{_fmt(r['train_reward_chosen'], 2)} | "
                     f"{_fmt(r['train_reward_rejected'], 2)} | "
                     f"{len(r['seeds'])} |")
    return lines


def plot_reward_cdfs(runs: list, headline: list, path: str) -> str:
    """Held-out chosen vs rejected reward CDFs per loss (headline beta), pooled over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, max(len(headline), 1), figsize=(4 * max(len(headline), 1), 3.4),
                             squeeze=False)
    for ax, row in zip(axes[0], headline):
        members = [r for r in runs if r["loss_type"] == row["loss_type"]
                   and r["beta"] == row["beta"]]
        for key, label, color in (("rewards_chosen", "chosen", "tab:blue"),
                                  ("rewards_rejected", "rejected", "tab:red")):
            values = np.sort(np.concatenate([np.asarray(m[key], dtype=float) for m in members]))
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                        color=color, label=f"{label} (n={values.size})")
        ax.axvline(0.0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(f"{row['loss_type']} (beta {row['beta']:g})")
        ax.set_xlabel("held-out reward log(pi / pi_ref)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_ylabel("empirical CDF (all seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_sort_batch(scope: list, reference: dict, sweep: list, path: str) -> str:
    """Held-out accuracy (mean +- std over seeds) against the samples one sort sees, one panel
    per beta, one line per sort scope; DPO at the same beta and the reference for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = sorted({r["beta"] for r in scope})
    fig, axes = plt.subplots(1, max(len(betas), 1), figsize=(5.2 * max(len(betas), 1), 3.8),
                             squeeze=False, sharey=True)
    styles = {"micro": "o-", "data_parallel": "s--", "global": "D"}
    for ax, beta in zip(axes[0], betas):
        for name in SCOPE_ORDER:
            rows = sorted((r for r in scope if r["sort_scope"] == name and r["beta"] == beta),
                          key=lambda r: (r["sort_batch"], r["dp"]))
            if rows:
                ax.errorbar([r["sort_batch"] * (1.04 if r["dp"] > 1 and name == "global" else 1)
                             for r in rows], [r["heldout_accuracy"]["mean"] for r in rows],
                            yerr=[r["heldout_accuracy"]["std"] for r in rows], fmt=styles[name],
                            capsize=3, label=f"aot_unpaired, {name}")
        ax.axhline(reference["heldout_accuracy"], color="gray", linestyle=":",
                   label="reference (SFT)")
        for row in sweep:
            if row["loss_type"] == "dpo" and row["beta"] == beta:
                ax.axhline(row["heldout_accuracy"]["mean"], color="tab:red", linestyle="-.",
                           linewidth=0.9, label="dpo (same beta)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("effective sort batch (samples per sort)")
        ax.set_title(f"beta {beta:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out greedy accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _in_stage_order(timings: dict) -> list:
    order = ("reference", "data", "train", "eval", "report")
    return sorted(timings.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)


def write_report(out: str, timings: dict = None) -> dict:
    plan, groups, reference = load(out)
    tables = build_tables(plan, groups)
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    cdf = plot_reward_cdfs(groups["loss"], tables["headline"],
                           os.path.join(plots, "reward_cdfs.png"))
    acc = plot_accuracy_vs_sort_batch(tables["scope"], reference, tables["sweep"],
                                      os.path.join(plots, "accuracy_vs_sort_batch.png"))
    summary_path = os.path.join(out, "data", "summary.json")
    with open(summary_path) as f:
        data = json.load(f)
    mode = plan["mode_config"]
    result = {"mode": plan["mode"], "mode_config": mode, "timings_seconds": timings or {},
              "data": data,
              "reference": {k: reference[k] for k in ("heldout_accuracy", "dev_accuracy",
                                                      "win_rate")},
              **tables,
              "runs": {g: [{k: v for k, v in r.items() if not isinstance(v, list)}
                           for r in members] for g, members in groups.items()},
              "plots": [os.path.relpath(cdf, out), os.path.relpath(acc, out)]}
    unique = {r["name"]: r for members in groups.values() for r in members}
    result["runs_done"] = [{"name": n, "train_seconds": r.get("train_seconds")}
                           for n, r in sorted(unique.items())]
    common.write_json(os.path.join(out, "results.json"), result)
    train = data["splits"]["train"]
    lines = [
        f"# AOT vs DPO on verifiable arithmetic: {plan['mode']} mode", "",
        f"Reference (SFT) held-out greedy accuracy: {reference['heldout_accuracy']:.3f} "
        f"(dev {reference['dev_accuracy']:.3f}). Preference data from the reference's samples: "
        f"{train['pairs']} pairs; unpaired {train['positives']} positives / "
        f"{train['negatives']} negatives. Every run: {mode['steps']} steps x "
        f"{mode['sequences']} sequences, lr {mode['lr']:g}; mean ± std over seeds "
        f"{list(mode['seeds'])}.", "",
        "## Headline (beta picked per loss by dev accuracy; held-out numbers)", "",
        *_loss_table(tables["headline"], reference), "",
        "## Beta sweep", "", *_loss_table(tables["sweep"], reference), "",
        "## Sort scope and sort-batch size (aot_unpaired)", "",
        *_scope_table(tables["scope"]), "",
        "Train rewards: mean beta * log pi/pi_ref of the chosen / rejected answers in the "
        "training batches over the last 10% of steps (`rewards/chosen`, `rewards/rejected` in "
        "each run's metrics.jsonl).", "",
        f"Plots: `{os.path.relpath(cdf, out)}`, `{os.path.relpath(acc, out)}`.", "",
        "Stage wall times (s, summed over invocations if the study was resumed): "
        + ", ".join(f"{k} {v:.0f}" for k, v in _in_stage_order(timings or {}))
        + f". Training runs: {len(result['runs_done'])}, summed per-run training time "
        f"{sum(r.get('train_seconds') or 0.0 for r in result['runs_done']) / 60:.1f} min.",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    study = sys.argv[1]
    previous = {}
    if os.path.exists(os.path.join(study, "results.json")):
        with open(os.path.join(study, "results.json")) as f:
            previous = json.load(f).get("timings_seconds", {})
    write_report(study, previous)
    print(os.path.join(study, "results.md"))

"""Where unpaired AOT's gradient goes as the sort grows (hypothesis 2 of the sort-batch question).

    python -m scripts.experiments.sort_gradient STUDY_DIR [--runs NAME ...] [--sorts 4 8 16 32]

For a trained policy of a study folder (``run_study``), the rewards ``u`` (chosen) and ``v``
(rejected) of every sample of the unpaired training set are computed once (``log pi/pi_ref``
through the Hugging Face export). Then, holding that reward distribution fixed, sort batches of
each size are drawn as the study draws them (a quarter positives) and the loss
``aot_unpaired_loss(u_b, v_b, beta)`` (nemo_aot's, so unequal counts use its quantile grid) is
differentiated with respect to the batch's log-ratios. Reported per sort size:

* ``low_share``: the share of the chosen side's gradient mass ``sum |dL/du_i|`` that falls on
  chosen samples in the lowest quarter of all chosen rewards (0.25 when every chosen sample
  gets the same weight, as at the reference, where every reward is 0);
* ``high_rej_share``: the same for the rejected side on the highest quarter of rejected rewards;
* ``top1_share``: the mean share of one batch's chosen-side mass on its single largest weight.

If bigger sorts concentrate the gradient on the tails (hypothesis 2), ``low_share`` grows with
the sort size at a fixed policy. This measures the end-of-training reward distribution, not each
step's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import common


def rewards(study: str, run: str, reference) -> tuple:
    """(u, v): log-ratios of the unpaired training set's positives and negatives under ``run``."""
    records = common.read_jsonl(os.path.join(study, "data", "train_unpaired.jsonl"))
    questions = [r["prompt"][0]["content"] for r in records]
    answers = [r["completion"][0]["content"] for r in records]
    labels = [bool(r["label"]) for r in records]
    policy = common.HFPolicy.from_nemo(os.path.join(study, "runs", run, "policy.nemo"))
    ratios = policy.sequence_logps(questions, answers) - reference.sequence_logps(questions,
                                                                                   answers)
    pos = [i for i, label in enumerate(labels) if label]
    neg = [i for i, label in enumerate(labels) if not label]
    return ratios[pos].float(), ratios[neg].float()


def gradient_shares(u, v, beta: float, sort: int, draws: int, seed: int = 0) -> dict:
    import torch

    from nemo_aot.losses import preference_loss

    g = torch.Generator().manual_seed(seed)
    n_pos = max(1, sort // 4)
    low = u <= torch.quantile(u, 0.25)
    high = v >= torch.quantile(v, 0.75)
    mass_u = torch.zeros_like(u)
    mass_v = torch.zeros_like(v)
    top1 = 0.0
    for _ in range(draws):
        i = torch.randperm(len(u), generator=g)[:n_pos]
        j = torch.randperm(len(v), generator=g)[:sort - n_pos]
        ub, vb = u[i].clone().requires_grad_(), v[j].clone().requires_grad_()
        zero_u, zero_v = torch.zeros_like(ub), torch.zeros_like(vb)
        # the loss takes log-probs: policy chosen/rejected, reference chosen/rejected
        loss, _ = preference_loss(ub, vb, zero_u, zero_v, loss_type="aot_unpaired", beta=beta)
        gu, gv = torch.autograd.grad(loss, (ub, vb))
        mass_u.index_add_(0, i, gu.abs())
        mass_v.index_add_(0, j, gv.abs())
        top1 += float(gu.abs().max() / gu.abs().sum().clamp_min(1e-30))
    return {"sort": sort, "low_share": float(mass_u[low].sum() / mass_u.sum()),
            "high_rej_share": float(mass_v[high].sum() / mass_v.sum()),
            "top1_share": top1 / draws}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a run_study output folder")
    parser.add_argument("--runs", nargs="*", default=None,
                        help="run names (default: every aot_unpaired run of the study)")
    parser.add_argument("--sorts", nargs="*", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--out", default=None,
                        help="JSON output (default: STUDY/sort_gradient.json)")
    args = parser.parse_args(argv)
    common.quiet_warnings()
    with open(os.path.join(args.study, "plan.json")) as f:
        plan = json.load(f)
    runs = [r for r in plan["runs"] if r["loss_type"] == "aot_unpaired"]
    names = {f"{r['loss_type']}-b{r['beta']:g}-{r['sort_scope']}-mbs{r['micro_batch_size']}"
             f"-dp{r['dp']}-s{r['seed']}": r for r in runs}
    chosen = args.runs or sorted(names)
    reference = common.HFPolicy.from_nemo(plan["reference"])
    results = []
    print("| run | trained sort | " + " | ".join(f"low share @{s}" for s in args.sorts)
          + " | " + " | ".join(f"top-1 share @{s}" for s in args.sorts) + " |")
    for name in chosen:
        u, v = rewards(args.study, name, reference)
        beta = names[name]["beta"]
        shares = [gradient_shares(u, v, beta, s, args.draws) for s in args.sorts]
        results.append({"run": name, "beta": beta, "u_mean": float(u.mean()),
                        "v_mean": float(v.mean()), "shares": shares})
        print(f"| {name} | {names[name]['micro_batch_size']} | "
              + " | ".join(f"{s['low_share']:.3f}" for s in shares) + " | "
              + " | ".join(f"{s['top1_share']:.3f}" for s in shares) + " |", flush=True)
    common.write_json(args.out or os.path.join(args.study, "sort_gradient.json"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

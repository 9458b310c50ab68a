"""Sort scopes across data-parallel ranks (gloo, 2 and 4 ranks) equal the single-process result.

Each rank holds a slice of one global batch and a copy of the same parameters ``theta`` (log-probs
are ``features @ theta``). After backward, gradients are reduced the way megatron-core DDP does it
(multiply by 1/dp_size, then sum over the DP group). The result must equal the gradient of the
single-process loss on the concatenated batch, and every rank's loss value must equal that loss.
This is what fixes the scaling contract documented in ``nemo_aot/losses/api.py`` (data_parallel:
return the loss unscaled) and ``nemo_aot/losses/global_scope.py`` (global: times
num_microbatches * dp_size).
"""

import pytest
import torch
import torch.distributed as dist

from multirank import run_multirank
from nemo_aot.distributed.collectives import (
    all_gather_list_with_grad,
    all_gather_with_grad,
    data_parallel_gather,
)
from nemo_aot.losses import (
    finalize_metrics,
    matched_partner_loss,
    plan_global_sort,
    preference_loss,
    transport_inputs,
)

DIM = 4
TIMEOUT = 120


def _data(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(DIM, generator=g, dtype=torch.float64)
    xc = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    xr = torch.randn(m, DIM, generator=g, dtype=torch.float64)
    rc, rr = (torch.randn(n, generator=g, dtype=torch.float64),
              torch.randn(m, generator=g, dtype=torch.float64))
    return theta, xc, xr, rc, rr


def _rank_slice(counts, rank):
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def _ddp_average(grad):
    """megatron-core DDP (average_in_collective=False): scale by 1/dp_size, then sum over DP."""
    grad = grad * (1.0 / dist.get_world_size())
    dist.all_reduce(grad)
    return grad


def single_process(case):
    """The reference: one process, the whole concatenated batch."""
    if case["kind"] == "global":
        pairs = [mb for rank_mbs in case["microbatches"] for mb in rank_mbs]
        n, m = sum(c for c, _ in pairs), sum(r for _, r in pairs)
    else:
        n, m = sum(case["chosen"]), sum(case["rejected"])
    theta, xc, xr, rc, rr = _data(n, m, case["seed"])
    theta.requires_grad_()
    loss, sums = preference_loss(xc @ theta, xr @ theta, rc, rr, loss_type=case["loss_type"],
                                 beta=0.5, surrogate=case.get("surrogate", "logistic"))
    loss.backward()
    return {"loss": loss.detach(), "grad": theta.grad, "metrics": finalize_metrics(sums)}


def _data_parallel(case):
    rank = dist.get_rank()
    theta, xc, xr, rc, rr = _data(sum(case["chosen"]), sum(case["rejected"]), case["seed"])
    cs, rs = _rank_slice(case["chosen"], rank), _rank_slice(case["rejected"], rank)
    out = {}
    for scope, gather in (("data_parallel", data_parallel_gather()), ("micro", None)):
        if scope == "micro" and (case["chosen"][rank] == 0 or case["rejected"][rank] == 0):
            continue
        w = theta.clone().requires_grad_()
        inputs = [xc[cs] @ w, xr[rs] @ w, rc[cs], rr[rs]]
        if gather is not None:  # the data_parallel scope: the batch of every rank, with autograd
            inputs = gather(inputs)
        loss, sums = preference_loss(*inputs, loss_type=case["loss_type"], beta=0.5,
                                     surrogate=case.get("surrogate", "logistic"))
        loss.backward()
        if scope == "micro":
            out["micro_grad"] = w.grad          # local only; a guard that the scope matters
            continue
        stacked = torch.stack(list(sums.values()))
        dist.all_reduce(stacked)  # the documented metric reduction: sum, then finalize
        out.update(loss=loss.detach(), grad=_ddp_average(w.grad),
                   metrics=finalize_metrics(dict(zip(sums, stacked))))
    return out


def _global(case):
    """No-grad first pass over all micro-batches of all ranks, then matched-partner terms."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mbs = case["microbatches"]
    n_rank, m_rank = [sum(c for c, _ in r) for r in mbs], [sum(c for _, c in r) for r in mbs]
    theta, xc, xr, rc, rr = _data(sum(n_rank), sum(m_rank), case["seed"])
    cs, rs = _rank_slice(n_rank, rank), _rank_slice(m_rank, rank)
    with torch.no_grad():
        u_local, v_local = transport_inputs(case["loss_type"], xc[cs] @ theta, xr[rs] @ theta,
                                            rc[cs], rr[rs])
        u_all, v_all = all_gather_list_with_grad([u_local, v_local])      # rank-major global order
        plan = plan_global_sort(u_all, v_all)
    w = theta.clone().requires_grad_()
    num_microbatches, total = len(mbs[rank]), 0.0
    c0, r0 = cs.start, rs.start
    for nc, nr in mbs[rank]:
        ci, ri = torch.arange(c0, c0 + nc), torch.arange(r0, r0 + nr)
        u, v = transport_inputs(case["loss_type"], xc[ci] @ w, xr[ri] @ w, rc[ci], rr[ri])
        term = matched_partner_loss(u, v, ci, ri, plan, beta=0.5)
        returned = term * num_microbatches * world            # what the model's loss_func returns
        (returned / num_microbatches).backward()                # megatron's schedule divides by it
        total += term.detach()
        c0, r0 = c0 + nc, r0 + nr
    total = total.clone() if torch.is_tensor(total) else torch.tensor(total, dtype=torch.float64)
    dist.all_reduce(total)
    return {"loss": total, "grad": _ddp_average(w.grad)}


def _gather_checks():
    """The collective itself: values, per-rank counts, the sum-over-ranks backward, unused
    outputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [(r * 2 + 1) % 3 for r in range(world)]          # 1, 0, 2, 1, ...: uneven, one empty
    full = torch.arange(sum(rows) * 3, dtype=torch.float64).reshape(-1, 3)
    x = full[_rank_slice(rows, rank)].clone().requires_grad_()
    y = all_gather_with_grad(x)
    weights = torch.linspace(-1, 1, full.numel(), dtype=torch.float64).reshape(full.shape)
    (y * weights).sum().backward()
    a = torch.full((rank + 1,), float(rank), requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    ga, gb = all_gather_list_with_grad([a, b])
    ga.sum().backward()                                      # gb unused: its grad must be zero
    return {"y": y.detach(), "x_grad": x.grad,
            "expected_x_grad": world * weights[_rank_slice(rows, rank)], "full": full,
            "ga": ga.detach(), "a_grad": a.grad, "b_grad": b.grad}


def run_cases(cases):
    kinds = {"data_parallel": _data_parallel, "global": _global,
             "gather": lambda case: _gather_checks()}
    return [kinds[case["kind"]](case) for case in cases]


CASES_2 = [
    {"kind": "gather"},
    {"kind": "data_parallel", "loss_type": "aot_paired", "chosen": [3, 5], "rejected": [3, 5],
     "seed": 1},
    {"kind": "data_parallel", "loss_type": "aot_unpaired", "chosen": [4, 2], "rejected": [1, 6],
     "seed": 2},
    {"kind": "data_parallel", "loss_type": "aot_unpaired", "chosen": [5, 5], "rejected": [5, 5],
     "seed": 3, "surrogate": "squared_hinge"},
    {"kind": "data_parallel", "loss_type": "dpo", "chosen": [2, 4], "rejected": [2, 4], "seed": 4},
    {"kind": "global", "loss_type": "aot_unpaired",
     "microbatches": [[(2, 3), (3, 0)], [(1, 2), (4, 4)]], "seed": 5},
]
CASES_4 = [
    {"kind": "gather"},
    {"kind": "data_parallel", "loss_type": "aot_unpaired", "chosen": [2, 3, 1, 4],
     "rejected": [3, 0, 2, 2], "seed": 6},
    {"kind": "data_parallel", "loss_type": "aot_paired", "chosen": [2, 1, 3, 2],
     "rejected": [2, 1, 3, 2], "seed": 7},
    {"kind": "data_parallel", "loss_type": "ipo", "chosen": [1, 2, 2, 1],
     "rejected": [1, 2, 2, 1], "seed": 8},
    {"kind": "global", "loss_type": "aot_paired",
     "microbatches": [[(2, 2), (1, 1)], [(0, 0), (3, 3)], [(2, 2), (2, 2)], [(1, 1), (1, 1)]],
     "seed": 9},
]


def _check_gather(per_rank, world):
    for r, res in enumerate(per_rank):
        torch.testing.assert_close(res["y"], res["full"])
        torch.testing.assert_close(res["x_grad"], res["expected_x_grad"])
        torch.testing.assert_close(
            res["ga"], torch.cat([torch.full((k + 1,), float(k)) for k in range(world)]))
        torch.testing.assert_close(res["a_grad"], torch.full((r + 1,), float(world)))
        torch.testing.assert_close(res["b_grad"], torch.zeros(2))


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)], ids=["2ranks", "4ranks"])
def test_scopes_across_ranks_equal_single_process(world, cases):
    results = run_multirank(run_cases, world, args=(cases,), timeout=TIMEOUT)
    for i, case in enumerate(cases):
        per_rank = [results[r][i] for r in range(world)]
        if case["kind"] == "gather":
            _check_gather(per_rank, world)
            continue
        ref = single_process(case)
        for r, res in enumerate(per_rank):
            where = f"{case['kind']} {case['loss_type']} rank {r}"
            torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-12, atol=1e-14, msg=where)
            torch.testing.assert_close(res["grad"], ref["grad"], rtol=1e-10, atol=1e-12, msg=where)
            for key, value in res.get("metrics", {}).items():
                torch.testing.assert_close(value, ref["metrics"][key], rtol=1e-5, atol=1e-6,
                                           equal_nan=True, msg=f"{where} metric {key}")
        if case["kind"] == "data_parallel" and case["loss_type"].startswith("aot"):
            micro = [res["micro_grad"] for res in per_rank if "micro_grad" in res]
            if len(micro) == world:   # guard: sorting locally is a different objective
                assert (sum(micro) / world - ref["grad"]).abs().max() > 1e-4

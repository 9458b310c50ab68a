"""Building blocks for the ``global`` sort scope: AOT over the whole global batch.

Megatron schedules run forward and backward one micro-batch at a time, so the sort over the whole
global batch (all micro-batches on all data-parallel ranks) cannot be an ordinary autograd graph.
Instead:

1. First pass, no grad: compute every sample's transport input (``u`` = chosen log-ratios or
   policy margins, ``v`` = rejected log-ratios or reference margins; ``registry.transport_inputs``),
   gather them in a fixed global order (e.g. rank-major, then micro-batch, then position) and call
   ``plan_global_sort(u_all, v_all)``.
2. Second pass, per micro-batch with grad: ``matched_partner_loss(u_mb, v_mb, u_index, v_index,
   plan, ...)`` where ``*_index`` are the micro-batch samples' positions in that global order.

With L = sum_c w_c h(u_(k_c) - v_(l_c)) the full-batch transport cost over the merged-grid cells
c (``transport.py``; for n == m simply k_c = l_c, w_c = 1/n), a positive of global rank k
contributes ``sum_{c: k_c = k} w_c h(u_i - sg(v_(l_c)))`` and a negative of rank l contributes
``sum_{c: l_c = l} w_c h(sg(u_(k_c)) - v_j)``, where ``sg`` means the detached first-pass sorted
values. Summed over all micro-batches these give exactly dL/du and dL/dv. The negative terms enter
as ``t - sg(t)``, so their value is zero and the summed value is exactly L (at first-pass values).

Caller contract. The returned terms are normalised to the *full* batch: their sum over every
micro-batch of every DP rank is L. Megatron-core's schedule divides each micro-batch loss by
``num_microbatches`` and its DDP averages gradients over ``dp_size`` ranks, so the ``loss_func``
must return ``matched_partner_loss(...) * num_microbatches * dp_size`` (and report
``plan``-level metrics, not per-micro-batch ones). The second pass must reproduce the first pass's
values: ``reproduce_atol`` (default 1e-3, in log-prob units) makes a mismatch raise
``RuntimeError`` (one host sync per call; ``None`` skips the check, e.g. to check
``reproduction_error`` once per step instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .api import check_surrogate_options
from .surrogates import get_surrogate
from .transport import quantile_cells


@dataclass(frozen=True)
class GlobalSortPlan:
    """Detached first-pass values of the whole global batch and their optimal matching."""

    chosen_values: torch.Tensor     # (n,) u in global index order
    rejected_values: torch.Tensor   # (m,) v in global index order
    chosen_sorted: torch.Tensor     # (n,) ascending
    rejected_sorted: torch.Tensor   # (m,) ascending
    chosen_rank: torch.Tensor       # (n,) int64: rank of global chosen sample i in chosen_sorted
    rejected_rank: torch.Tensor     # (m,) int64
    cell_chosen: torch.Tensor       # (C,) rank of u in each merged-grid cell
    cell_rejected: torch.Tensor     # (C,) rank of v in each cell
    cell_weight: torch.Tensor       # (C,) float64 cell widths, summing to 1


def _sort_with_rank(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, order = torch.sort(x, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return values, rank


@torch.no_grad()
def plan_global_sort(chosen_values: torch.Tensor, rejected_values: torch.Tensor) -> GlobalSortPlan:
    """Sort the first-pass values of the whole global batch (1-D, non-empty, any device)."""
    for name, t in (("chosen_values", chosen_values), ("rejected_values", rejected_values)):
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    u = chosen_values.detach().to(torch.promote_types(chosen_values.dtype, torch.float32))
    v = rejected_values.detach().to(u.dtype)
    u_sorted, u_rank = _sort_with_rank(u)
    v_sorted, v_rank = _sort_with_rank(v)
    ci, ri, w = quantile_cells(u.numel(), v.numel(), u.device)
    return GlobalSortPlan(u, v, u_sorted, v_sorted, u_rank, v_rank, ci, ri, w)


def _local_slot(rank_of_index: torch.Tensor, index: torch.Tensor, cell_rank: torch.Tensor):
    """For each cell, the position in this micro-batch of the sample the cell uses (or -1)."""
    index = index.to(rank_of_index.device)
    slot = torch.full_like(rank_of_index, -1)
    slot[rank_of_index[index]] = torch.arange(index.numel(), device=rank_of_index.device)
    return slot[cell_rank]


def reproduction_error(chosen_values: torch.Tensor, rejected_values: torch.Tensor,
                       chosen_index: torch.Tensor, rejected_index: torch.Tensor,
                       plan: GlobalSortPlan) -> torch.Tensor:
    """Largest |second pass - first pass| of this micro-batch's values, a 0-d tensor on the
    plan's device (no host sync: the caller checks it once per step)."""
    worst = plan.chosen_values.new_zeros(())
    for values, index, first in ((chosen_values, chosen_index, plan.chosen_values),
                                 (rejected_values, rejected_index, plan.rejected_values)):
        if values.numel():
            diff = (values.detach().to(first.dtype) - first[index.to(first.device)]).abs().max()
            worst = torch.maximum(worst, diff)
    return worst


def _check_reproduced(values, index, plan_values, atol, side):
    if atol is None or values.numel() == 0:
        return
    diff = (values.detach() - plan_values[index.to(plan_values.device)]).abs().max()
    if bool(diff > atol):  # one host sync; the objective checks reproduction_error once per step
        raise RuntimeError(f"second-pass {side} values differ from the first pass by "
                           f"{float(diff):.3g} > reproduce_atol={atol}: the forward is not "
                           "deterministic (dropout on?)")


def matched_partner_loss(
    chosen_values: torch.Tensor,
    rejected_values: torch.Tensor,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    plan: GlobalSortPlan,
    *,
    beta: float,
    surrogate: str = "logistic",
    label_smoothing: float = 0.0,
    reproduce_atol: float | None = 1e-3,
) -> torch.Tensor:
    """This micro-batch's share of the full-batch AOT loss (value and gradient; module doc)."""
    check_surrogate_options(beta, label_smoothing, surrogate)
    for name, vals, idx in (("chosen", chosen_values, chosen_index),
                            ("rejected", rejected_values, rejected_index)):
        if vals.dim() != 1 or idx.shape != vals.shape:
            raise ValueError(f"{name}_values and {name}_index must be 1-D of equal length, got "
                             f"{tuple(vals.shape)} and {tuple(idx.shape)}")
    _check_reproduced(chosen_values, chosen_index, plan.chosen_values, reproduce_atol, "chosen")
    _check_reproduced(rejected_values, rejected_index, plan.rejected_values, reproduce_atol,
                      "rejected")
    h = get_surrogate(surrogate)
    u = chosen_values.to(plan.chosen_sorted.dtype)
    v = rejected_values.to(plan.chosen_sorted.dtype)
    w = plan.cell_weight.to(u.dtype)
    # Empty sums keep an empty micro-batch's zero in the autograd graph, so backward() still works.
    total = u.sum() + v.sum() if not (u.numel() or v.numel()) else u.new_zeros(())
    if u.numel():
        slot = _local_slot(plan.chosen_rank, chosen_index, plan.cell_chosen)
        partner = plan.rejected_sorted[plan.cell_rejected]
        terms = h(u[slot.clamp_min(0)] - partner, beta, label_smoothing)
        total = total + torch.where(slot >= 0, w * terms, 0.0).sum()
    if v.numel():
        slot = _local_slot(plan.rejected_rank, rejected_index, plan.cell_rejected)
        partner = plan.chosen_sorted[plan.cell_chosen]
        terms = h(partner - v[slot.clamp_min(0)], beta, label_smoothing)
        total = total + torch.where(slot >= 0, w * (terms - terms.detach()), 0.0).sum()
    return total

"""Training diagnostics for preference losses, as additive pieces that reduce by one sum.

Rewards follow TRL's convention: ``reward = beta * (log pi(y|x) - log pi_ref(y|x))``, i.e. the
log-ratio scaled by ``beta`` whatever the surrogate (for the margin surrogates beta is a margin,
but the scaling is kept so numbers stay comparable across runs).

``preference_metric_sums`` returns a flat ``dict[str, Tensor]`` of detached fp32 scalars, every one
of them *additive*: sums, sums of squares, counts, and per-call statistics summed with ``calls``
counting the calls. To report a training step, sum each entry over micro-batches and over
data-parallel ranks (e.g. ``all_reduce(torch.stack(list(sums.values())))``), then call
``finalize_metrics`` once. That gives exact means/stds over all samples seen, and per-call
statistics (loss, FSD violation, quantiles) averaged over calls. Under the ``data_parallel`` sort
scope every rank already sees the gathered batch; the sum over ranks multiplies numerators and
denominators alike, so the same recipe stays exact. No ``.item()`` is called.

Logged values (``finalize_metrics``):
  loss                       mean loss over calls
  rewards/chosen[_std]       mean (population std) of chosen rewards; likewise rewards/rejected
  rewards/margin             rewards/chosen - rewards/rejected (= mean pairwise margin for pairs)
  rewards/accuracy           fraction of pairs with chosen reward > rejected reward; NaN without
                             pairs (aot_unpaired with n != m; pairs are index-aligned, as in TRL)
  rewards/{side}_q{10,50,90} empirical quantiles Q(t) = x_(ceil(t n)), averaged over calls
  fsd_violation              fraction of quantile levels where Q_chosen(t) < Q_rejected(t): the
                             measure of the set on which first-order dominance fails
  fsd_violation/margins      paired losses only: the same for policy vs reference margins
"""

from __future__ import annotations

import torch

from .transport import dominance_violation, empirical_quantiles

QUANTILE_LEVELS = (0.1, 0.5, 0.9)


def _moments(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    # new_full, not new_tensor: a Python scalar copied to a GPU would synchronise the host.
    return {f"{name}_sum": x.sum(), f"{name}_sqsum": x.square().sum(),
            f"{name}_count": x.new_full((), float(x.numel()))}


@torch.no_grad()
def preference_metric_sums(
    loss: torch.Tensor,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    paired: bool,
    policy_margins: torch.Tensor | None = None,
    reference_margins: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Additive metric pieces for one loss call (see the module docstring for the recipe)."""
    chosen = beta * chosen_logratios.detach().float()
    rejected = beta * rejected_logratios.detach().float()
    sums = {"loss_sum": loss.detach().float(), "calls": chosen.new_ones(())}
    sums.update(_moments("chosen_reward", chosen))
    sums.update(_moments("rejected_reward", rejected))
    if paired:
        sums["accuracy_sum"] = (chosen > rejected).float().sum()
        sums["pair_count"] = chosen.new_full((), float(chosen.numel()))
    else:
        sums["accuracy_sum"] = chosen.new_zeros(())
        sums["pair_count"] = chosen.new_zeros(())
    chosen_sorted, rejected_sorted = torch.sort(chosen).values, torch.sort(rejected).values
    sums["fsd_violation_sum"] = dominance_violation(chosen_sorted, rejected_sorted, presorted=True)
    for side, x in (("chosen", chosen_sorted), ("rejected", rejected_sorted)):
        qs = empirical_quantiles(x, QUANTILE_LEVELS, presorted=True)
        for t, q in zip(QUANTILE_LEVELS, qs):
            sums[f"{side}_reward_q{round(100 * t)}_sum"] = q
    if policy_margins is not None and reference_margins is not None:
        sums["margin_fsd_violation_sum"] = dominance_violation(
            policy_margins.detach().float(), reference_margins.detach().float())
    return sums


@torch.no_grad()
def finalize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn (reduced) additive pieces into the logged values listed in the module docstring."""
    calls = sums["calls"]
    out = {"loss": sums["loss_sum"] / calls}
    for side in ("chosen", "rejected"):
        count = sums[f"{side}_reward_count"]
        mean = sums[f"{side}_reward_sum"] / count
        var = (sums[f"{side}_reward_sqsum"] / count - mean.square()).clamp_min(0.0)
        out[f"rewards/{side}"] = mean
        out[f"rewards/{side}_std"] = var.sqrt()
        for t in QUANTILE_LEVELS:
            key = f"{side}_reward_q{round(100 * t)}"
            out[f"rewards/{side}_q{round(100 * t)}"] = sums[f"{key}_sum"] / calls
    out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["rewards/accuracy"] = sums["accuracy_sum"] / sums["pair_count"]
    out["fsd_violation"] = sums["fsd_violation_sum"] / calls
    if "margin_fsd_violation_sum" in sums:
        out["fsd_violation/margins"] = sums["margin_fsd_violation_sum"] / calls
    return out

"""Training diagnostics for preference losses, as additive pieces that reduce by one sum.

The logged names and meanings are those of Hugging Face TRL's ``DPOTrainer``, so dashboards built
for it read nemo_aot's runs. With summed response log-probs ``log pi(y|x)`` (TRL sums over the
completion tokens for every loss type, its length-normalized IPO included):

  rewards/chosen, rewards/rejected   mean implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``
                                     of the chosen / rejected responses (beta-scaled whatever the
                                     surrogate: for the margin surrogates beta is a margin, but the
                                     scaling keeps numbers comparable across runs)
  rewards/margins                    rewards/chosen - rewards/rejected (= TRL's mean pairwise margin
                                     for pairs; the difference of the means without pairs)
  rewards/accuracies                 fraction of pairs with chosen reward > rejected reward; NaN
                                     without pairs (aot_unpaired with n != m; pairs are
                                     index-aligned, as in TRL)
  logps/chosen, logps/rejected       mean summed policy log-prob of the chosen / rejected responses
  logits/chosen, logits/rejected     mean over the response tokens of the policy's mean logit over
                                     the vocabulary (pieces from ``logit_metric_sums``, computed by
                                     the caller that sees the logits)

When the loss is given length-averaged log-probs (``alignment.length_normalize``), pass the token
counts as ``lengths``: the TRL-named values above then use the token sums (average x count), as
TRL does. Beside them, the AOT diagnostics:

  loss                               mean loss over calls
  rewards/{side}_std                 population std of the rewards above
  rewards/{side}_q{10,50,90}         empirical quantiles Q(t) = x_(ceil(t n)) of the rewards above,
                                     averaged over calls
  fsd_violation                      fraction of quantile levels where Q_chosen(t) < Q_rejected(t)
                                     of what the loss sorts (length-averaged rewards under
                                     length_normalize): the measure of the set on which first-order
                                     dominance fails
  fsd_violation/margins              paired losses only: the same for policy vs reference margins

With the SFT term (``alignment.sft_loss_weight`` > 0, ``sft.py``), pieces from
``nll_metric_sums`` add (the name is TRL's, from its ``rpo_alpha`` days):

  nll_loss                           the chosen responses' NLL, a per-token mean over every chosen
                                     response token seen
  loss                               then the total: mean preference loss over calls plus
                                     sft_loss_weight * nll_loss

Every piece is *additive*: sums, sums of squares, counts, and per-call statistics summed with
``calls`` counting the calls. To report a training step, sum each entry over micro-batches and
over data-parallel ranks (e.g. ``all_reduce(torch.stack(list(sums.values())))``), then call
``finalize_metrics`` once. That gives exact means/stds over all samples seen, and per-call
statistics (loss, FSD violation, quantiles) averaged over calls. Pieces computed on a batch that
every rank already sees (the ``data_parallel`` and ``global`` sort scopes) are summed dp times,
numerators and denominators alike, so the same recipe stays exact. No ``.item()`` is called.
"""

from __future__ import annotations

from typing import Optional

import torch

from .transport import dominance_violation, empirical_quantiles

QUANTILE_LEVELS = (0.1, 0.5, 0.9)
SIDES = ("chosen", "rejected")


def preference_metric_keys(margins: bool) -> tuple[str, ...]:
    """The pieces ``preference_metric_sums`` returns (``margins``: as its argument; the paired
    loss types): declared, so that a rank without a real sample joins the reductions with the
    same vector."""
    keys = ["loss_sum", "calls", "accuracy_sum", "pair_count", "fsd_violation_sum"]
    for side in SIDES:
        keys += [f"{side}_reward_sum", f"{side}_reward_sqsum", f"{side}_reward_count",
                 f"{side}_logps_sum"]
        keys += [f"{side}_reward_q{round(100 * t)}_sum" for t in QUANTILE_LEVELS]
    return tuple(keys + (["margin_fsd_violation_sum"] if margins else []))


# The pieces of logit_metric_sums and nll_metric_sums.
LOGIT_METRIC_KEYS = tuple(f"{side}_logits_{part}" for side in SIDES for part in ("sum", "tokens"))
NLL_METRIC_KEYS = ("nll_sum", "nll_tokens", "sft_loss_sum")


def _moments(name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    # new_full, not new_tensor: a Python scalar copied to a GPU would synchronise the host.
    return {f"{name}_sum": x.sum(), f"{name}_sqsum": x.square().sum(),
            f"{name}_count": x.new_full((), float(x.numel()))}


@torch.no_grad()
def preference_metric_sums(
    loss: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    paired: bool,
    margins: bool = False,
    lengths: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Additive metric pieces for one loss call on the loss's own inputs.

    ``paired``: chosen i and rejected i form a pair (accuracy is defined). ``margins``: also the
    FSD violation of policy vs reference margins (the paired loss types). ``lengths``: (chosen,
    rejected) token counts when the log-probs are length-averaged (see the module docstring).
    """
    inputs = [t.detach().float() for t in (policy_chosen_logps, policy_rejected_logps,
                                           reference_chosen_logps, reference_rejected_logps)]
    pc, pr, rc, rr = inputs
    compared = {"chosen": beta * (pc - rc), "rejected": beta * (pr - rr)}  # what the loss sees
    compared_sorted = {side: torch.sort(x).values for side, x in compared.items()}
    reward, ordered = compared, compared_sorted
    if lengths is not None:                                    # TRL's values use token sums
        lc, lr = (t.detach().float() for t in lengths)
        pc, rc, pr, rr = pc * lc, rc * lc, pr * lr, rr * lr
        reward = {"chosen": beta * (pc - rc), "rejected": beta * (pr - rr)}
        ordered = {side: torch.sort(x).values for side, x in reward.items()}
    sums = {"loss_sum": loss.detach().float(), "calls": pc.new_ones(())}
    for side, logps in zip(SIDES, (pc, pr)):
        sums.update(_moments(f"{side}_reward", reward[side]))
        sums[f"{side}_logps_sum"] = logps.sum()
        qs = empirical_quantiles(ordered[side], QUANTILE_LEVELS, presorted=True)
        for t, q in zip(QUANTILE_LEVELS, qs):
            sums[f"{side}_reward_q{round(100 * t)}_sum"] = q
    if paired:
        sums["accuracy_sum"] = (reward["chosen"] > reward["rejected"]).float().sum()
        sums["pair_count"] = pc.new_full((), float(pc.numel()))
    else:
        sums["accuracy_sum"] = pc.new_zeros(())
        sums["pair_count"] = pc.new_zeros(())
    sums["fsd_violation_sum"] = dominance_violation(
        compared_sorted["chosen"], compared_sorted["rejected"], presorted=True)
    if margins:  # what aot_paired sorts: policy margins against reference margins
        sums["margin_fsd_violation_sum"] = dominance_violation(inputs[0] - inputs[1],
                                                               inputs[2] - inputs[3])
    return sums


@torch.no_grad()
def logit_metric_sums(chosen_logit_sums: torch.Tensor, chosen_tokens: torch.Tensor,
                      rejected_logit_sums: torch.Tensor,
                      rejected_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Additive pieces of ``logits/{chosen,rejected}``, TRL's token-weighted mean logit.

    Per response (1-D, one entry each): the sum over its tokens of the policy's mean logit over
    the vocabulary, and its token count.
    """
    sums = {}
    for side, total, tokens in (("chosen", chosen_logit_sums, chosen_tokens),
                                ("rejected", rejected_logit_sums, rejected_tokens)):
        sums[f"{side}_logits_sum"] = total.detach().float().sum()
        sums[f"{side}_logits_tokens"] = tokens.detach().float().sum()
    return sums


@torch.no_grad()
def nll_metric_sums(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor,
                    sft_loss_weight: float) -> dict[str, torch.Tensor]:
    """Additive pieces of ``nll_loss`` and of the SFT term in ``loss``: per chosen response (1-D,
    one entry each) its log-prob summed over its tokens, and its token count."""
    nll = -chosen_logps.detach().float().sum()
    return {"nll_sum": nll, "nll_tokens": chosen_tokens.detach().float().sum(),
            "sft_loss_sum": float(sft_loss_weight) * nll}


@torch.no_grad()
def finalize_metrics(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn (reduced) additive pieces into the logged values listed in the module docstring."""
    calls = sums["calls"]
    out = {"loss": sums["loss_sum"] / calls}
    for side in SIDES:
        count = sums[f"{side}_reward_count"]
        mean = sums[f"{side}_reward_sum"] / count
        var = (sums[f"{side}_reward_sqsum"] / count - mean.square()).clamp_min(0.0)
        out[f"rewards/{side}"] = mean
        out[f"rewards/{side}_std"] = var.sqrt()
        for t in QUANTILE_LEVELS:
            key = f"{side}_reward_q{round(100 * t)}"
            out[f"rewards/{side}_q{round(100 * t)}"] = sums[f"{key}_sum"] / calls
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    out["rewards/accuracies"] = sums["accuracy_sum"] / sums["pair_count"]
    for side in SIDES:
        out[f"logps/{side}"] = sums[f"{side}_logps_sum"] / sums[f"{side}_reward_count"]
    for side in SIDES:
        if f"{side}_logits_sum" in sums:
            out[f"logits/{side}"] = sums[f"{side}_logits_sum"] / sums[f"{side}_logits_tokens"]
    out["fsd_violation"] = sums["fsd_violation_sum"] / calls
    if "margin_fsd_violation_sum" in sums:
        out["fsd_violation/margins"] = sums["margin_fsd_violation_sum"] / calls
    if "nll_sum" in sums:  # the SFT term; no chosen token: no NLL (as sft.chosen_nll)
        tokens = sums["nll_tokens"].clamp_min(1.0)
        out["nll_loss"] = sums["nll_sum"] / tokens
        out["loss"] = out["loss"] + sums["sft_loss_sum"] / tokens
    return out

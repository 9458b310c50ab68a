"""Pairwise baselines: DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023).

With chosen log-ratios ``a_i = log pi(y_i^+|x_i) - log pi_ref(y_i^+|x_i)`` and rejected log-ratios
``b_i`` likewise, both losses act on the per-pair difference ``d_i = a_i - b_i``:

    DPO:  mean_i h(d_i),  h = logistic by default (``-log sigmoid(beta d)``; cDPO smoothing allowed)
    IPO:  mean_i (d_i - 1/(2 beta))^2

DPO matches TRL's ``loss_type="sigmoid"``; any AOT surrogate may replace the logistic one. IPO is
the plain formula on the log-probs it is given: TRL's ``"ipo"`` additionally divides each
log-ratio by the completion length, so pass length-averaged log-probs to get TRL's numbers.
"""

from __future__ import annotations

import torch

from .surrogates import get_surrogate


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor, what: str) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(f"{what} needs one rejected log-ratio per chosen one, got shapes "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    surrogate: str = "logistic",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``mean_i h(a_i - b_i)``: the pairwise loss, no sorting."""
    _check_pairs(chosen_logratios, rejected_logratios, "dpo_loss")
    h = get_surrogate(surrogate)
    return h(chosen_logratios - rejected_logratios, beta, label_smoothing).mean()


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *,
             beta: float) -> torch.Tensor:
    """``mean_i (a_i - b_i - 1/(2 beta))^2``: IPO's squared regression onto the margin
    1/(2 beta)."""
    _check_pairs(chosen_logratios, rejected_logratios, "ipo_loss")
    return (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)).square().mean()

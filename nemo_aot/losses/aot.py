"""AOT: alignment via optimal transport (Melnyk, Mroueh et al., NeurIPS 2024, arXiv 2406.05882).

Notation. Per sequence, the implicit reward of a response is its log-ratio
``r = log pi_theta(y|x) - log pi_ref(y|x)`` (what DPO calls the reward, up to the factor beta).

Unpaired AOT (the paper's unpaired setting). ``u_i = r(y_i^+)`` over the n chosen (positive)
responses, ``v_j = r(y_j^-)`` over the m rejected (negative) ones. The goal is first-order
stochastic dominance (FSD) of u over v: ``Q_u(t) >= Q_v(t)`` for every quantile level t. The
paper relaxes the FSD violation into a 1-D optimal transport problem with a smooth convex cost
``h`` and solves it in closed form by sorting:

    L_unpaired = integral_0^1 h(Q_u(t) - Q_v(t)) dt = mean_i h(u_(i) - v_(i))      (n == m)

Paired AOT (the paper's paired setting). For each prompt's pair, the policy margin
``u_i = log pi_theta(y_i^+|x_i) - log pi_theta(y_i^-|x_i)`` should dominate the reference margin
``v_i = log pi_ref(y_i^+|x_i) - log pi_ref(y_i^-|x_i)`` (a constant of the data):

    L_paired = mean_i h(u_(i) - v_(i)),   both sorted independently.

Without the two sorts both are the DPO loss ``mean_i h(u_i - v_i)``; with one pair per batch they
*are* DPO, which is why the sort scope (how many samples one sort sees) matters.

Unequal sizes (truly unpaired data, n != m): the same integral is evaluated exactly on the merged
quantile grid (see ``transport.py``), a weighted sum over at most n + m - 1 cells.

Gradient. ``torch.sort`` returns values whose backward scatters gradients back through the
permutation, so autograd gives the gradient with the optimal (sorted) matching held fixed. This
is the gradient of L itself wherever the sort is unique (the OT value is the minimum over
matchings of a smooth function, Danskin's theorem), as in the paper and in TRL.

The equation numbers of the paper were not checked against its text, so this code cites the
paper's settings by name rather than by number. TRL's ``DPOTrainer`` is the reference for the
shared cases: its ``loss_type="aot"`` is ``aot_paired_loss`` with the logistic surrogate, and
``"aot_unpaired"`` (formerly ``"aot_pair"``) is ``aot_unpaired_loss``.
"""

from __future__ import annotations

import torch

from .surrogates import get_surrogate
from .transport import transport_cost


def _cost(beta: float, surrogate: str, label_smoothing: float):
    h = get_surrogate(surrogate)
    return lambda x: h(x, beta, label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    surrogate: str = "logistic",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``integral h(Q_u(t) - Q_v(t)) dt`` with u = chosen log-ratios (n), v = rejected (m)."""
    return transport_cost(chosen_logratios, rejected_logratios,
                          _cost(beta, surrogate, label_smoothing))


def aot_paired_loss(
    policy_margins: torch.Tensor,
    reference_margins: torch.Tensor,
    *,
    beta: float,
    surrogate: str = "logistic",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``mean_i h(u_(i) - v_(i))`` with u = policy margins, v = reference margins, sorted apart."""
    if policy_margins.shape != reference_margins.shape:
        raise ValueError(
            "aot_paired_loss needs one reference margin per policy margin, got shapes "
            f"{tuple(policy_margins.shape)} and {tuple(reference_margins.shape)}"
        )
    return transport_cost(policy_margins, reference_margins,
                          _cost(beta, surrogate, label_smoothing))


def paired_transport_inputs(pc, pr, rc, rr):
    """Paired AOT's ``(u, v)``: (policy margins, reference margins)."""
    return pc - pr, rc - rr


def unpaired_transport_inputs(pc, pr, rc, rr):
    """Unpaired AOT's ``(u, v)``: (chosen log-ratios, rejected log-ratios); n != m allowed."""
    return pc - rc, pr - rr

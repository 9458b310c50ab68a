"""Convex surrogates ``h`` for the AOT transport cost (and the DPO-style pairwise loss).

Every surrogate penalises a *small or negative* argument ``x`` (a reward difference that should be
large and positive) and is applied elementwise:

==================  ===============================================  =====================
name                h(x)                                             role of ``beta``
==================  ===============================================  =====================
``logistic``        -(1-eps) log sigmoid(beta x) - eps log sigmoid(-beta x)  scale (paper: 0.01)
``squared_hinge``   max(beta - x, 0)^2                               margin
``least_squares``   (beta - x)^2                                     margin
``hinge``           max(beta - x, 0)                                 margin
==================  ===============================================  =====================

``eps`` is the conservative-DPO (cDPO) label smoothing: the probability that a preference label
is flipped. It is defined for the logistic surrogate only; the others take ``label_smoothing=0``.
With ``eps = 0`` the logistic surrogate is DPO's ``-log sigmoid(beta x)``, and at ``x = 0`` it
equals ``ln 2`` for every ``eps``.

Note that ``hinge`` here is ``(beta - x)_+`` with ``beta`` a margin in reward units, as in the
AOT paper's list of surrogates; TRL's ``loss_type="hinge"`` is ``(1 - beta x)_+`` instead.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Surrogate = Callable[[torch.Tensor, float, float], torch.Tensor]


def logistic(x: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """cDPO-smoothed logistic loss ``-(1-eps) log sigmoid(beta x) - eps log sigmoid(-beta x)``."""
    z = beta * x
    if label_smoothing == 0.0:
        return -F.logsigmoid(z)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def squared_hinge(x: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``max(beta - x, 0)^2``: zero once the difference clears the margin ``beta``."""
    return torch.relu(beta - x).square()


def least_squares(x: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(beta - x)^2``: pulls every difference towards the margin ``beta`` from both sides."""
    return (beta - x).square()


def hinge(x: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``max(beta - x, 0)``: the non-smooth hinge with margin ``beta``."""
    return torch.relu(beta - x)


SURROGATES: dict[str, Surrogate] = {
    "logistic": logistic,
    "squared_hinge": squared_hinge,
    "least_squares": least_squares,
    "hinge": hinge,
}

# Surrogates whose definition includes the cDPO label-smoothing term.
SMOOTHABLE = frozenset({"logistic"})


def get_surrogate(name: str) -> Surrogate:
    """Look up a surrogate by name; raise ``ValueError`` naming ``surrogate`` if unknown."""
    try:
        return SURROGATES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"surrogate must be one of {sorted(SURROGATES)}, got {name!r}"
        ) from None

"""``preference_loss``: one entry point for every registered loss type (``registry.py``: AOT
paired and unpaired, DPO, IPO).

Sort scopes. The loss sorts whatever batch it is given; the caller picks that batch:

* ``micro`` -- pass this rank's micro-batch (TRL's behaviour).
* ``data_parallel`` -- pass the micro-batch gathered over the data-parallel group along dim 0
  *with autograd* (the four inputs and the lengths in one call of
  ``nemo_aot.distributed.collectives.data_parallel_gather``; this package never imports
  torch.distributed itself, and ``nemo_aot.algorithms.objective`` is the one place that
  gathers). Every rank then computes the loss of the concatenated (global) batch, the same loss
  value and the same metrics.

  Caller contract (checked by tests/distributed/test_aot_gather.py): return this loss from the
  megatron ``loss_func`` *unscaled*. The gather's backward sums the incoming gradients over the
  group (the adjoint of all-gather), so each rank's parameters receive ``dp_size x`` their share
  of ``dL/dtheta``; megatron-core DDP multiplies gradients by ``1/dp_size`` and sums them over
  the DP group, which yields exactly ``dL/dtheta`` of the single-process loss on the concatenated
  batch. Counts may differ per rank (a rank may hold zero rejected samples in the unpaired case).
  Every rank must call the loss and its backward the same number of times, and the policy
  log-probs must require grad on every rank or on none.
* ``global`` -- see ``global_scope.py`` (a no-grad first pass, then matched-partner terms).

Inputs must be finite; checking that costs one device-to-host sync per call, which
``check_finite=False`` skips. Everything else is free of host syncs (no ``.item()``).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from .metrics import preference_metric_sums
from .registry import LossSpec, get_loss_spec
from .surrogates import SMOOTHABLE, get_surrogate

ARG_NAMES = ("policy_chosen_logps", "policy_rejected_logps",
             "reference_chosen_logps", "reference_rejected_logps")


def _check_beta_and_smoothing(beta, label_smoothing) -> None:
    if (isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta)
            or beta <= 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")


def check_options(loss_type, beta, label_smoothing, surrogate) -> None:
    """Raise ``ValueError`` naming the option for an unknown or out-of-range setting."""
    spec = get_loss_spec(loss_type)
    get_surrogate(surrogate)
    if not spec.uses_surrogate and surrogate != "logistic":
        raise ValueError(f"surrogate does not apply to loss_type={loss_type!r} "
                         f"(got {surrogate!r}); leave it at the default")
    _check_beta_and_smoothing(beta, label_smoothing)
    if label_smoothing and (not spec.uses_surrogate or surrogate not in SMOOTHABLE):
        raise ValueError(f"label_smoothing (cDPO) applies to the logistic surrogate only, not to "
                         f"loss_type={loss_type!r} with surrogate={surrogate!r}")


def check_surrogate_options(beta, label_smoothing, surrogate) -> None:
    """``check_options`` for a loss that takes the surrogate, whatever its type (the AOT terms of
    the ``global`` sort scope): raise ``ValueError`` naming the bad option."""
    get_surrogate(surrogate)
    _check_beta_and_smoothing(beta, label_smoothing)
    if label_smoothing and surrogate not in SMOOTHABLE:
        raise ValueError(f"label_smoothing (cDPO) applies to the logistic surrogate only, not to "
                         f"surrogate={surrogate!r}")


def _check_tensors(spec: LossSpec, tensors: Sequence[torch.Tensor]) -> None:
    for name, t in zip(ARG_NAMES, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one log-prob per sequence), got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(f"{name} is on {t.device} but policy_chosen_logps is on "
                             f"{tensors[0].device}")
    partner = {1: 0, 2: 0, 3: 1} if spec.paired else {2: 0, 3: 1}
    for i, j in partner.items():
        if tensors[i].shape[0] != tensors[j].shape[0]:
            need = "pairs" if spec.paired else "a reference log-prob per policy log-prob"
            raise ValueError(f"{ARG_NAMES[i]} has {tensors[i].shape[0]} entries but "
                             f"{ARG_NAMES[j]} has {tensors[j].shape[0]}; "
                             f"loss_type={spec.name!r} needs {need}")


def _check_lengths(tensors: Sequence[torch.Tensor], lengths: Sequence[torch.Tensor]) -> None:
    if not lengths:
        return
    if len(lengths) != 2:
        raise ValueError(f"lengths must be (chosen, rejected) token counts, got {len(lengths)} "
                         "tensors")
    for side, t, logps in zip(("chosen", "rejected"), lengths, tensors[:2]):
        if not isinstance(t, torch.Tensor) or t.shape != logps.shape:
            raise ValueError(f"lengths: the {side} token counts must be a tensor of shape "
                             f"{tuple(logps.shape)} like the {side} log-probs")


def _check_values(tensors: Sequence[torch.Tensor], check_finite: bool) -> None:
    for name, t in zip(ARG_NAMES[:2], tensors[:2]):
        if t.numel() == 0:
            raise ValueError(f"{name} is empty")
    if check_finite and not bool(torch.isfinite(torch.cat([t.detach() for t in tensors])).all()):
        bad = [n for n, t in zip(ARG_NAMES, tensors) if not bool(torch.isfinite(t.detach()).all())]
        raise ValueError(f"{', '.join(bad)} contain NaN or Inf")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    surrogate: str = "logistic",
    check_finite: bool = True,
    lengths: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss on per-sequence log-probs (1-D, one entry per response).

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: summed (or length-averaged) response log-probs. Paired loss
            types (``LossSpec.paired``: ``aot_paired``, ``dpo``, ``ipo``) need all four of one
            length; ``aot_unpaired`` takes n chosen and m rejected responses, n != m allowed.
        loss_type: a name in ``registry.LOSS_SPECS``: ``"aot_paired"`` (TRL ``"aot"``),
            ``"aot_unpaired"`` (TRL ``"aot_unpaired"``), ``"dpo"`` (TRL ``"sigmoid"``), ``"ipo"``.
        beta: > 0; the logistic surrogate's scale, the margin of the other surrogates, IPO's tau.
        label_smoothing: cDPO flip probability in [0, 0.5), logistic surrogate only.
        surrogate: ``"logistic"``, ``"squared_hinge"``, ``"least_squares"`` or ``"hinge"``
            (AOT and DPO; IPO has its own fixed form).
        check_finite: raise on NaN/Inf inputs (one host sync).
        lengths: ``(chosen, rejected)`` response token counts when the log-probs are
            length-averaged: the loss uses the averages, the TRL-named metrics (``rewards/*``,
            ``logps/*``) the token sums, as TRL logs them (gathered with the log-probs under
            the ``data_parallel`` scope).

    Returns:
        ``(loss, metric_sums)``: the scalar loss (fp32, or fp64 for fp64 inputs) and the additive
        metric pieces of ``metrics.py`` (reduce by summing, then ``finalize_metrics``).
    """
    check_options(loss_type, beta, label_smoothing, surrogate)
    spec = get_loss_spec(loss_type)
    tensors = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps)
    _check_tensors(spec, tensors)
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    extra = [] if lengths is None else list(lengths)
    _check_lengths(tensors, extra)
    tensors = [t.to(dtype) for t in tensors + tuple(extra)]
    tensors, extra = tensors[:4], tensors[4:]
    _check_values(tensors, check_finite)
    pc, pr, rc, rr = tensors
    loss = spec.fn(pc, pr, rc, rr, float(beta), surrogate, float(label_smoothing))
    paired = spec.paired or pc.shape[0] == pr.shape[0]
    metrics = preference_metric_sums(loss, pc, pr, rc, rr, beta=float(beta), paired=paired,
                                     margins=spec.paired, lengths=extra or None)
    return loss, metrics

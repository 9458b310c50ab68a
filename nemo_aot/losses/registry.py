"""The loss registry: one ``LossSpec`` per loss type, from which every other table is derived.

A spec holds the loss's function on the four per-sequence log-probs and the facts the plumbing
needs about it: whether it needs paired data, whether (and what) it sorts, whether it takes the
surrogate options. ``AlignmentConfig`` validation, ``preference_loss`` and its metrics, the run
config's data/sort-scope rules, the training step and the ``global`` sort scope all read these
facts here.

Adding a loss type: write its function (``LossFn``) and register it below with
``register_loss(LossSpec(name, fn, paired=..., transport_inputs=...))``. An AOT variant gives its
transport inputs (then it ``sorts``: the sort scope matters, and ``global`` plans on them); a
loss that never sorts gives none (the ``global`` sort scope is then refused as pure cost).

Built in (TRL ``DPOTrainer`` names in brackets): ``aot_unpaired`` [``aot_unpaired``],
``aot_paired`` [``aot``], ``dpo`` [``sigmoid``], ``ipo`` [``ipo``].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .aot import (
    aot_paired_loss,
    aot_unpaired_loss,
    paired_transport_inputs,
    unpaired_transport_inputs,
)
from .dpo import dpo_loss, ipo_loss

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, float, str, float], Tensor]
TransportFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """One loss type."""

    name: str
    """The ``alignment.loss_type`` value."""
    fn: LossFn
    """``fn(pc, pr, rc, rr, beta, surrogate, label_smoothing)`` -> scalar loss, on the policy and
    reference log-probs of the chosen and rejected responses (1-D, upcast, gathered if the sort
    scope gathers; checked by ``preference_loss``)."""
    paired: bool
    """Needs paired data: rejected i is the partner of chosen i (equal counts, accuracy defined,
    FSD violation of policy vs reference margins logged)."""
    transport_inputs: Optional[TransportFn] = None
    """AOT variants: ``(pc, pr, rc, rr) -> (u, v)``, the two samples the loss sorts and
    transports; None for a loss that never sorts. Contract: ``fn`` is then the transport cost
    of (u, v) under the surrogate (``aot.py``), which the ``global`` sort scope rebuilds from
    matched partners (``global_scope.py``)."""
    uses_surrogate: bool = True
    """Takes the ``surrogate`` and ``label_smoothing`` options (False: a fixed form, as IPO)."""

    @property
    def data_kinds(self) -> tuple[str, ...]:
        """The data kinds it trains on (``nemo_aot.data.config.DATA_KINDS``): a paired loss
        only on paired data; an unpaired one on both (paired data give it chosen and rejected
        responses as two samples)."""
        return ("paired",) if self.paired else ("paired", "unpaired")

    @property
    def sorts(self) -> bool:
        """Its objective sorts, so a wider sort scope changes it: exactly the AOT variants, the
        losses with transport inputs (the only sort the plumbing knows how to widen)."""
        return self.transport_inputs is not None


LOSS_SPECS: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add ``spec`` under ``spec.name``; a name already taken raises ``ValueError``."""
    if not isinstance(spec, LossSpec):
        raise TypeError(f"register_loss takes a LossSpec, got {type(spec).__name__}")
    if spec.name in LOSS_SPECS:
        raise ValueError(f"loss_type {spec.name!r} is already registered")
    LOSS_SPECS[spec.name] = spec
    return spec


def get_loss_spec(loss_type: str) -> LossSpec:
    """The spec of ``loss_type``; an unknown name raises ``ValueError`` listing the known ones."""
    if loss_type not in LOSS_SPECS:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_SPECS)}, got {loss_type!r}")
    return LOSS_SPECS[loss_type]


def transport_inputs(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """The two samples ``(u, v)`` an AOT variant sorts and transports, from the four log-probs.

    ``aot_paired``: (policy margins, reference margins); ``aot_unpaired``: (chosen log-ratios,
    rejected log-ratios). The rejected pair may have a different length in the unpaired case.
    A loss type that does not sort raises ``ValueError``.
    """
    spec = LOSS_SPECS.get(loss_type)
    if spec is None or not spec.sorts:
        sorting = sorted(name for name, s in LOSS_SPECS.items() if s.sorts)
        raise ValueError(f"loss_type must be one of {sorting}, got {loss_type!r}")
    return spec.transport_inputs(policy_chosen_logps, policy_rejected_logps,
                                 reference_chosen_logps, reference_rejected_logps)


# ------------------------------------------------------------------------- built-in loss types
def _aot_unpaired(pc, pr, rc, rr, beta, surrogate, ls):
    return aot_unpaired_loss(*unpaired_transport_inputs(pc, pr, rc, rr), beta=beta,
                             surrogate=surrogate, label_smoothing=ls)


def _aot_paired(pc, pr, rc, rr, beta, surrogate, ls):
    return aot_paired_loss(*paired_transport_inputs(pc, pr, rc, rr), beta=beta,
                           surrogate=surrogate, label_smoothing=ls)


def _dpo(pc, pr, rc, rr, beta, surrogate, ls):
    return dpo_loss(pc - rc, pr - rr, beta=beta, surrogate=surrogate, label_smoothing=ls)


def _ipo(pc, pr, rc, rr, beta, surrogate, ls):
    return ipo_loss(pc - rc, pr - rr, beta=beta)


# Registration order is the order config errors list the choices in.
register_loss(LossSpec("aot_unpaired", _aot_unpaired, paired=False,
                       transport_inputs=unpaired_transport_inputs))
register_loss(LossSpec("aot_paired", _aot_paired, paired=True,
                       transport_inputs=paired_transport_inputs))
register_loss(LossSpec("dpo", _dpo, paired=True))
register_loss(LossSpec("ipo", _ipo, paired=True, uses_surrogate=False))

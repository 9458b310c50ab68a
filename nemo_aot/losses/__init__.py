"""Preference losses in pure torch: AOT (paired, unpaired), DPO, IPO, surrogates and diagnostics.

Start with ``preference_loss`` (``api.py``); the loss types are declared once in ``registry.py``
(``LOSS_SPECS``) and configured by ``AlignmentConfig`` (``config.py``). The math is stated in
``aot.py`` (AOT), ``transport.py`` (exact 1-D OT on the merged quantile grid), ``surrogates.py``,
``dpo.py``; ``sft.py`` the SFT term (the chosen responses' NLL, added outside the sort);
``global_scope.py`` holds the whole-global-batch building blocks and ``metrics.py``
the diagnostics. This package never imports torch.distributed, megatron, nemo or
TransformerEngine: a loss sorts the batch it is given, and the caller gathers that batch
across ranks first (see ``api.py``, "Sort scopes").
"""

from .aot import aot_paired_loss, aot_unpaired_loss
from .api import preference_loss
from .config import REFERENCE_POLICIES, SORT_SCOPES, AlignmentConfig
from .dpo import dpo_loss, ipo_loss
from .global_scope import GlobalSortPlan, matched_partner_loss, plan_global_sort, reproduction_error
from .metrics import (
    LOGIT_METRIC_KEYS,
    NLL_METRIC_KEYS,
    QUANTILE_LEVELS,
    finalize_metrics,
    logit_metric_sums,
    nll_metric_sums,
    preference_metric_keys,
    preference_metric_sums,
)
from .registry import LOSS_SPECS, LossSpec, get_loss_spec, register_loss, transport_inputs
from .sft import check_sft_loss_weight, chosen_nll
from .surrogates import SURROGATES, get_surrogate
from .transport import dominance_violation, quantile_cells, transport_cost

__all__ = [
    "AlignmentConfig", "GlobalSortPlan", "LOGIT_METRIC_KEYS", "LOSS_SPECS", "LossSpec",
    "NLL_METRIC_KEYS", "QUANTILE_LEVELS",
    "REFERENCE_POLICIES", "SORT_SCOPES", "SURROGATES",
    "aot_paired_loss", "aot_unpaired_loss", "check_sft_loss_weight", "chosen_nll",
    "dominance_violation", "dpo_loss", "finalize_metrics", "get_loss_spec", "get_surrogate",
    "ipo_loss", "logit_metric_sums", "matched_partner_loss", "nll_metric_sums",
    "plan_global_sort", "preference_loss", "preference_metric_keys", "preference_metric_sums",
    "quantile_cells",
    "reproduction_error", "register_loss", "transport_cost", "transport_inputs",
]

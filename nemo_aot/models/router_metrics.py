"""The router losses of a mixture-of-experts policy, as logged metrics.

megatron-core's router adds the load-balancing and z losses to the policy loss's gradient
itself (``MoEAuxLossAutoScaler``: their gradient joins the backward with the policy loss's
scaling), only in training forwards with autograd on - never in a no-grad reference forward or
a scoring pass - and records each layer's unscaled loss (without its coefficient) in a
process-wide tracker. :func:`router_loss_metrics` turns that tracker into one value per loss
for the step (the mean over the MoE layers and micro-batches, averaged over data-parallel
ranks, summed over pipeline stages first) and clears it for the next step.
"""

from __future__ import annotations

import torch

METRIC_NAMES = {"load_balancing_loss": "moe/load_balancing_loss", "z_loss": "moe/z_loss"}
"""megatron's tracker names -> this package's metric names."""


def router_loss_metrics(num_microbatches: int, num_moe_layers: int) -> dict[str, float]:
    """{metric: value} of the router losses tracked since the last call (one host copy);
    {} for a dense model or a step without router losses."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    names = [n for n in tracker if n in METRIC_NAMES]
    if not names:
        return {}
    reduce_aux_losses_tracker_across_ranks(names)
    totals = torch.stack([tracker[n]["values"].float().sum() for n in names])
    clear_aux_losses_tracker()
    values = (totals / (num_microbatches * num_moe_layers)).tolist()  # the one host copy
    return {METRIC_NAMES[n]: v for n, v in zip(names, values)}


__all__ = ["router_loss_metrics", "METRIC_NAMES"]

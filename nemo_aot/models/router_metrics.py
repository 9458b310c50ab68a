"""The router losses of a mixture-of-experts policy, as logged metrics.

megatron-core's router adds the load-balancing and z losses to the policy loss's gradient
itself (``MoEAuxLossAutoScaler``: their gradient joins the backward with the policy loss's
scaling), only in training forwards with autograd on - never in a no-grad reference forward or
a scoring pass - and records each layer's unscaled loss (without its coefficient) in a
process-wide tracker. :func:`router_loss_metrics` turns that tracker into one value per loss
for the step (the mean over the MoE layers and micro-batches, averaged over data-parallel
ranks, summed over pipeline stages first) and clears it for the next step.

megatron-core 0.16 reduces the load-balancing loss itself (summed over the TP group, averaged
over DP) but records the z-loss per rank - the mean over this rank's own tokens, a sequence
shard under sequence parallelism - and reduces it over pipeline stages only: logged as is, it
would be one rank's micro-batches (and, under TP, half of their tokens). Such an entry (no
reduce or average group) is averaged here over the tensor- and data-parallel ranks: equal token
shards and equal micro-batch counts per rank make that the single-process mean.
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
    local = [n for n in names if tracker[n].get("reduce_group") is None
             and tracker[n].get("avg_group") is None]
    reduce_aux_losses_tracker_across_ranks(names)
    if local:
        _average_over_tensor_and_data_parallel([tracker[n]["values"] for n in local])
    totals = torch.stack([tracker[n]["values"].float().sum() for n in names])
    clear_aux_losses_tracker()
    values = (totals / (num_microbatches * num_moe_layers)).tolist()  # the one host copy
    return {METRIC_NAMES[n]: v for n, v in zip(names, values)}


def _average_over_tensor_and_data_parallel(values: list[torch.Tensor]) -> None:
    """Average each tensor in place over this rank's tensor- and data-parallel group."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_and_data_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return
    flat = torch.stack([v.float() for v in values])
    torch.distributed.all_reduce(flat, group=group)  # SUM: gloo has no AVG everywhere
    for v, reduced in zip(values, flat / size):
        v.copy_(reduced)


__all__ = ["router_loss_metrics", "METRIC_NAMES"]

"""The router z-loss of a mixture-of-experts policy, equal under sequence parallelism.

megatron-core's router computes the z-loss (the mean over a micro-batch's tokens of the squared
logsumexp of the router logits) on each rank's own tokens: under sequence parallelism a rank
holds 1/TP of the sequence, and megatron divides the coefficient by TP, so the TP ranks together
contribute the mean of their shards' means. With padding excluded (the ``padding_mask`` the
policy runner passes) the shards hold different numbers of real tokens, and the mean of means
is not the mean: the z-loss and its gradient would depend on the TP size and on where the
padding falls (measured: 0.25% off the single process in the z-loss at EP2 x TP2).

:func:`install` rescales each rank's z-loss by its share of the group's real tokens
(``local_count * group_size / group_count``), so the group sums to the mean over every real
token of the micro-batch; megatron's logged value (the loss over the divided coefficient)
becomes ``group_size`` x this rank's share, which ``router_metrics`` averages over the group
back to the mean. Without a padding mask or with one rank per group nothing changes.
"""

from __future__ import annotations

import functools

import torch

_INSTALLED = False


def install() -> None:
    """Wrap the z-loss function megatron-core's router calls (once per process); a release whose
    router has no module-level ``z_loss_func`` is left as it is."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.transformer.moe import router

    original = getattr(router, "z_loss_func", None)
    if original is not None:
        router.z_loss_func = _over_sequence_shards(original)
    _INSTALLED = True


def _over_sequence_shards(original):
    @functools.wraps(original)
    def z_loss_func(logits, z_loss_coeff, padding_mask=None):
        loss = original(logits, z_loss_coeff, padding_mask=padding_mask)
        if padding_mask is None:
            return loss
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_and_context_parallel_group()
        size = torch.distributed.get_world_size(group)
        if size == 1:
            return loss
        local = (~padding_mask).sum().to(torch.float32)
        total = local.clone()
        torch.distributed.all_reduce(total, group=group)
        return loss * (local.clamp(min=1.0) * size / total.clamp(min=1.0))

    return z_loss_func


__all__ = ["install"]

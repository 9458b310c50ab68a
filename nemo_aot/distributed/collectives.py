"""Autograd-aware all-gather with a different number of rows per rank.

``all_gather_list_with_grad(tensors, group)`` concatenates each tensor over the ranks of ``group``
along dim 0, in rank order, and is differentiable. Rows per rank may differ (including zero);
trailing dimensions and the dtype must agree across ranks. Several tensors travel in one
collective, plus one small collective (and a host sync) for the row counts unless the caller
passes them (``rows``: every rank's row count of each tensor, e.g. exchanged once per step for
all micro-batches): gathering the four log-prob vectors of a preference batch costs one or two
all-gathers forward and one all-reduce backward.

Backward is the adjoint of all-gather: the gradients of the gathered outputs are summed over the
group (all-reduce) and each rank keeps the rows it contributed. If every rank computes the same
loss L from the gathered tensors, each rank's inputs therefore receive ``dp_size * dL/dx``, and
megatron-core DDP's gradient averaging (scale by 1/dp_size, sum over the DP group) produces
exactly the single-process gradient of L on the concatenated batch: the caller does not rescale.
Every rank must run the backward (inputs requiring grad on every rank or on none).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def exchange_row_counts(counts: Sequence[int], group=None) -> list[list[int]]:
    """Every rank's ``counts`` (host integers, as many on every rank), in rank order: one small
    all-gather on the group's device and one host sync."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")
    local = torch.tensor(list(counts), dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return torch.stack(sizes).cpu().tolist()


class _AllGatherList(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, rows, *tensors):
        world, me = dist.get_world_size(group), dist.get_rank(group)
        trailing = [t.shape[1:] for t in tensors]
        widths = [int(torch.Size(s).numel()) for s in trailing]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if rows is None:
            rows = exchange_row_counts([t.shape[0] for t in tensors], group)
        totals = [sum(r * w for r, w in zip(rank_rows, widths)) for rank_rows in rows]
        padded = flat.new_zeros(max(max(totals), 1))
        padded[: flat.numel()] = flat
        buffers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buffers, padded, group=group)
        pieces = [torch.split(buf[:total], [r * w for r, w in zip(rank_rows, widths)])
                  for buf, total, rank_rows in zip(buffers, totals, rows)]
        outputs = [torch.cat([pieces[r][i] for r in range(world)]).reshape(-1, *trailing[i])
                   for i in range(len(tensors))]
        ctx.group, ctx.me, ctx.rows, ctx.widths = group, me, rows, widths
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        # Autograd materialises unused outputs' gradients as zeros, so every entry is a tensor.
        rows, widths, me = ctx.rows, ctx.widths, ctx.me
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        local, offset = [], 0
        for i, grad in enumerate(grads):
            start = offset + sum(rows[r][i] for r in range(me)) * widths[i]
            local.append(flat[start: start + rows[me][i] * widths[i]].reshape(-1, *grad.shape[1:]))
            offset += grad.numel()
        return (None, None,
                *[g if need else None for g, need in zip(local, ctx.needs_input_grad[2:])])


def all_gather_list_with_grad(tensors: Sequence[torch.Tensor], group=None,
                              rows: Optional[Sequence[Sequence[int]]] = None) -> list[torch.Tensor]:
    """Concatenate each tensor over ``group`` along dim 0 (rank order), differentiably.

    All tensors must share dtype and device. Returns a list of the same length as ``tensors``.
    ``rows[r][i]``: rank r's row count of tensor i, when the caller knows them (no size
    exchange, no host sync); this rank's entry must match its tensors.
    """
    tensors = list(tensors)
    if not tensors:
        return []
    dtype, device = tensors[0].dtype, tensors[0].device
    for i, t in enumerate(tensors):
        if t.dim() == 0:
            raise ValueError(f"tensors[{i}] must have a dim 0 to gather along, got a scalar")
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"tensors[{i}] is {t.dtype} on {t.device}; expected {dtype} on "
                            f"{device} like tensors[0]")
    if rows is not None:
        rows = [list(map(int, r)) for r in rows]
        mine = rows[dist.get_rank(group)]
        assert mine == [t.shape[0] for t in tensors], (mine, [t.shape[0] for t in tensors])
    return list(_AllGatherList.apply(group, rows, *tensors))


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``tensor`` over ``group`` along dim 0 (rank order), differentiably."""
    return all_gather_list_with_grad([tensor], group)[0]


def data_parallel_gather(group=None, rows: Optional[Sequence[Sequence[int]]] = None):
    """The ``data_parallel`` sort scope's gather, ``gather(tensors) -> gathered``, applied to the
    loss's inputs before ``nemo_aot.losses.preference_loss`` sorts them: pass the data-parallel
    process group (``None`` = default) and, when known, every rank's row counts of the gathered
    tensors."""
    return functools.partial(all_gather_list_with_grad, group=group, rows=rows)

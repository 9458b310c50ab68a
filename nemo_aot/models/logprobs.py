"""Per-token log-probabilities from vocab-parallel logits, chunked over the sequence.

With the vocabulary split over the TP group, rank r holds logits z[..., V_r] for its slice V_r.
For target y:  log p(y) = z_y - logsumexp_v z_v,  with
    logsumexp = m + log(sum_r sum_{v in V_r} exp(z_v - m)),   m = max over all ranks,
so only three [tokens]-sized all-reduces cross the TP group (max, sum of exps, target logit);
the full vocabulary is never gathered. Columns past the tokenizer's vocabulary (padding added
so the table splits evenly over TP) are excluded, so the result equals a plain ``log_softmax``
over the true vocabulary at any TP size.

The fp32 work happens one chunk of sequence positions at a time, in forward and again in
backward (recomputed from the saved low-precision logits plus the per-token logsumexp), so no
[b, s, V] fp32 tensor is ever materialized. Gradient: d log p(y) / dz_v = 1[v = y] - softmax_v.

On request the same pass also returns each position's mean logit over the true vocabulary,
(1/V) sum_r sum_{v in V_r} z_v (TRL's ``logits/*`` metrics): one more reduction over the chunk
already in fp32 and one more row in the existing all-reduce, no further collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 logits (tests, gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_stats(logits, target, vocab_start, vocab_size, group, with_sum):
    """fp32 (target logit, lse, sum of the true-vocabulary logits or None) for one chunk;
    logits [n, V_r], target [n]."""
    z = logits.to(_acc(logits.dtype), copy=True)  # a chunk; masked in place below
    local_vocab = z.shape[-1]
    pad_from = vocab_size - vocab_start
    zsum = z[:, :min(max(pad_from, 0), local_vocab)].sum(-1) if with_sum else None
    if pad_from < local_vocab:
        z[:, max(pad_from, 0):] = float("-inf")
    m = z.max(dim=-1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sumexp = (z - m.unsqueeze(-1)).exp_().sum(-1)
    local_t = target - vocab_start
    mine = (local_t >= 0) & (local_t < local_vocab)
    picked = z.gather(-1, local_t.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(mine, picked, torch.zeros_like(picked))
    if group is not None:
        sums = torch.stack([sumexp, picked] + ([zsum] if with_sum else []))
        dist.all_reduce(sums, group=group)
        sumexp, picked = sums[0], sums[1]
        zsum = sums[2] if with_sum else None
    return picked, m + torch.log(sumexp), zsum


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, chunk, with_means):
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1)
        out = torch.empty(tgt.shape, dtype=_acc(logits.dtype), device=logits.device)
        lse = torch.empty_like(out)
        mean_logits = torch.empty_like(out) if with_means else out.new_empty(0)
        for i in range(0, flat.shape[0], chunk):
            picked, lse[i:i + chunk], zsum = _chunk_stats(
                flat[i:i + chunk], tgt[i:i + chunk], vocab_start, vocab_size, group, with_means)
            out[i:i + chunk] = picked - lse[i:i + chunk]
            if with_means:
                mean_logits[i:i + chunk] = zsum / vocab_size
        ctx.save_for_backward(logits, target, lse)
        ctx.vocab_start, ctx.vocab_size, ctx.chunk = vocab_start, vocab_size, chunk
        if with_means:
            mean_logits = mean_logits.view(target.shape)
        ctx.mark_non_differentiable(mean_logits)
        return out.view(target.shape), mean_logits

    @staticmethod
    def backward(ctx, grad_out, _grad_mean_logits):
        logits, target, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1) - ctx.vocab_start
        g = grad_out.reshape(-1).to(_acc(flat.dtype))
        grad = torch.empty_like(flat)
        local_vocab = flat.shape[-1]
        pad_from = ctx.vocab_size - ctx.vocab_start
        for i in range(0, flat.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            z = flat[sl].to(_acc(flat.dtype), copy=True)
            if pad_from < local_vocab:
                z[:, max(pad_from, 0):] = float("-inf")
            gs = g[sl].unsqueeze(-1)
            z.sub_(lse[sl].unsqueeze(-1)).exp_().mul_(-gs)  # -softmax * g, in place
            t = tgt[sl]
            mine = ((t >= 0) & (t < local_vocab)).unsqueeze(-1)
            # + g at the target column on the rank that holds it (no host sync)
            z.scatter_add_(-1, t.clamp(0, local_vocab - 1).unsqueeze(-1),
                           torch.where(mine, gs, torch.zeros_like(gs)))
            grad[sl] = z.to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int,
                            vocab_start: int = 0, group: Optional[dist.ProcessGroup] = None,
                            chunk_tokens: int = 1024, mean_logits: bool = False):
    """log p(target) per position, fp32, shape of ``target``; with ``mean_logits`` the pair
    (log-probs, mean logit over the true vocabulary per position, no gradient).

    Args:
        logits: [..., V_r] this TP rank's vocabulary slice (any float dtype).
        target: [...] global token ids.
        vocab_size: the tokenizer's true vocabulary size (padded columns are excluded).
        vocab_start: global id of this rank's first column.
        group: the tensor-parallel group, or None for an unsplit vocabulary.
        chunk_tokens: positions per fp32 chunk.
        mean_logits: also return the per-position mean logit.
    """
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    logps, means = _VocabParallelLogProbs.apply(logits, target, int(vocab_start), int(vocab_size),
                                                group, int(chunk_tokens), bool(mean_logits))
    return (logps, means) if mean_logits else logps


def tp_vocab_range(padded_vocab: int) -> tuple[int, Optional[dist.ProcessGroup]]:
    """(first column id on this rank, TP group) under megatron's parallel state."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    return rank * (padded_vocab // tp), group


def sequence_logprobs(token_logps: torch.Tensor, loss_mask: torch.Tensor,
                      length_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sum (or mean) of per-token log-probs per row -> ([b] log-probs, [b] token counts)."""
    mask = loss_mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    count = mask.sum(-1)
    if length_normalize:
        total = total / count.clamp(min=1)
    return total, count

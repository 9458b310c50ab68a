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

``hidden_state_logprobs`` goes one step further (the default, ``alignment.logprobs_from=
hidden_states``): it takes the final hidden states and the output weight instead of logits, so
no [b, s, V] tensor exists in any precision, not even the model's own bf16 logits; each chunk's
logits are one GEMM, recomputed in backward, where the chunk also gives its share of the hidden
states' and the output weight's gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 logits (tests, gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _mask_padding(z: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """-inf in place at the padded columns (ids >= vocab_size) of a chunk [n, V_r]."""
    pad_from = vocab_size - vocab_start
    if pad_from < z.shape[-1]:
        z[:, max(pad_from, 0):] = float("-inf")
    return z


def _chunk_stats(z, target, vocab_start, vocab_size, group, with_sum):
    """fp32 (target logit, lse, sum of the true-vocabulary logits or None) for one chunk;
    z [n, V_r] a fresh fp32 (or fp64) tensor this function may overwrite, target [n]."""
    local_vocab = z.shape[-1]
    pad_from = vocab_size - vocab_start
    zsum = z[:, :min(max(pad_from, 0), local_vocab)].sum(-1) if with_sum else None
    _mask_padding(z, vocab_start, vocab_size)
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


def _chunk_grad(z, target, lse, g, vocab_start, vocab_size):
    """d(g * log p(target)) / dz for one chunk, in place in z (fresh fp32 [n, V_r]):
    g * (1[v = target] - softmax_v), the target column only on the rank that holds it."""
    local_vocab = z.shape[-1]
    _mask_padding(z, vocab_start, vocab_size)
    gs = g.unsqueeze(-1)
    z.sub_(lse.unsqueeze(-1)).exp_().mul_(-gs)  # -softmax * g, in place
    t = target - vocab_start
    mine = ((t >= 0) & (t < local_vocab)).unsqueeze(-1)
    # + g at the target column on the rank that holds it (no host sync)
    z.scatter_add_(-1, t.clamp(0, local_vocab - 1).unsqueeze(-1),
                   torch.where(mine, gs, torch.zeros_like(gs)))
    return z


def _forward_chunks(logits_of, n, target, vocab_start, vocab_size, group, chunk, with_means,
                    like):
    """Per-position (log-prob, lse, mean logit or empty) over chunks of positions; ``logits_of``
    gives the fresh fp32 logits [c, V_r] of positions [i, i + c)."""
    out = torch.empty(target.shape, dtype=like, device=target.device)
    lse = torch.empty_like(out)
    means = torch.empty_like(out) if with_means else out.new_empty(0)
    for i in range(0, n, chunk):
        picked, lse[i:i + chunk], zsum = _chunk_stats(
            logits_of(i, chunk), target[i:i + chunk], vocab_start, vocab_size, group, with_means)
        out[i:i + chunk] = picked - lse[i:i + chunk]
        if with_means:
            means[i:i + chunk] = zsum / vocab_size
    return out, lse, means


def _forward_result(ctx, target, out, means, with_means, vocab_start, vocab_size, chunk):
    """Both log-prob functions' forward tail: keep what backward needs, shape the outputs like
    ``target`` (``means`` empty unless asked for) and mark the means non-differentiable."""
    ctx.vocab_start, ctx.vocab_size, ctx.chunk = vocab_start, vocab_size, chunk
    if with_means:
        means = means.view(target.shape)
    ctx.mark_non_differentiable(means)
    return out.view(target.shape), means


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, chunk, with_means):
        flat = logits.reshape(-1, logits.shape[-1])
        acc = _acc(logits.dtype)
        out, lse, means = _forward_chunks(
            lambda i, c: flat[i:i + c].to(acc, copy=True), flat.shape[0], target.reshape(-1),
            vocab_start, vocab_size, group, chunk, with_means, acc)
        ctx.save_for_backward(logits, target, lse)
        return _forward_result(ctx, target, out, means, with_means, vocab_start, vocab_size,
                               chunk)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean_logits):
        logits, target, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1)
        g = grad_out.reshape(-1).to(_acc(flat.dtype))
        grad = torch.empty_like(flat)
        for i in range(0, flat.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            z = flat[sl].to(_acc(flat.dtype), copy=True)
            grad[sl] = _chunk_grad(z, tgt[sl], lse[sl], g[sl], ctx.vocab_start,
                                   ctx.vocab_size).to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None


class _HiddenStateLogProbs(torch.autograd.Function):
    """The same log-probs from the final hidden states h [n, H] and this rank's slice of the
    output weight W [V_r, H]: each chunk's logits ``h_c W^T`` exist only inside the loop, in
    forward and again in backward, where they give ``dh_c = dz_c W`` and ``dW += dz_c^T h_c``
    (W's gradient summed over chunks in fp32, then handed to autograd once)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, vocab_size, group, chunk, with_means):
        flat = hidden.reshape(-1, hidden.shape[-1])
        acc = _acc(hidden.dtype)
        out, lse, means = _forward_chunks(
            lambda i, c: (flat[i:i + c] @ weight.t()).to(acc), flat.shape[0],
            target.reshape(-1), vocab_start, vocab_size, group, chunk, with_means, acc)
        ctx.save_for_backward(hidden, weight, target, lse)
        return _forward_result(ctx, target, out, means, with_means, vocab_start, vocab_size,
                               chunk)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean_logits):
        hidden, weight, target, lse = ctx.saved_tensors
        flat = hidden.reshape(-1, hidden.shape[-1])
        tgt = target.reshape(-1)
        acc = _acc(flat.dtype)
        g = grad_out.reshape(-1).to(acc)
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(flat) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        for i in range(0, flat.shape[0], ctx.chunk):
            sl = slice(i, i + ctx.chunk)
            h = flat[sl]
            z = (h @ weight.t()).to(acc)
            dz = _chunk_grad(z, tgt[sl], lse[sl], g[sl], ctx.vocab_start,
                             ctx.vocab_size).to(weight.dtype)
            if want_h:
                grad_h[sl] = dz @ weight
            if want_w:
                grad_w += (dz.t() @ h).to(acc)
        grad_h = grad_h.view_as(hidden) if want_h else None
        grad_w = grad_w.to(weight.dtype) if want_w else None
        return grad_h, grad_w, None, None, None, None, None, None


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


def hidden_state_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                          vocab_size: int, vocab_start: int = 0,
                          group: Optional[dist.ProcessGroup] = None, chunk_tokens: int = 1024,
                          mean_logits: bool = False):
    """``vocab_parallel_logprobs`` of the logits ``hidden @ weight.T`` without ever holding
    them: [..., V_r] logits exist one chunk of ``chunk_tokens`` positions at a time.

    Args:
        hidden: [..., H] final hidden states (after the final norm), the whole sequence on every
            TP rank (megatron's output layer input after its sequence-parallel gather / copy to
            the TP region, which also sums this function's input gradient over TP).
        weight: [V_r, H] this rank's rows of the output layer (or the tied embedding).
        target, vocab_size, vocab_start, group, chunk_tokens, mean_logits: as
            ``vocab_parallel_logprobs``.
    """
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    logps, means = _HiddenStateLogProbs.apply(hidden, weight, target, int(vocab_start),
                                              int(vocab_size), group, int(chunk_tokens),
                                              bool(mean_logits))
    return (logps, means) if mean_logits else logps


def tp_vocab_range(padded_vocab: int) -> tuple[int, Optional[dist.ProcessGroup]]:
    """(first column id on this rank, TP group) under megatron's parallel state."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    return rank * (padded_vocab // tp), group


def document_sums(values: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                  num_docs: Optional[int] = None) -> torch.Tensor:
    """Per-sequence sums of a [rows, positions] tensor: over each row, or, for packed rows,
    over each document's positions (``doc_ids``: document per position, -1 for padding)."""
    if doc_ids is None:
        return values.sum(-1)
    slot = torch.where(doc_ids >= 0, doc_ids, num_docs).flatten()  # padding -> a spare slot
    return values.new_zeros(num_docs + 1).index_add(0, slot, values.flatten())[:num_docs]


def sequence_logprobs(token_logps: torch.Tensor, loss_mask: torch.Tensor,
                      length_normalize: bool = False, doc_ids: Optional[torch.Tensor] = None,
                      num_docs: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked sum (or mean) of per-token log-probs per sequence -> ([n] log-probs, [n] token
    counts); n = rows, or ``num_docs`` for packed rows (``document_sums``)."""
    mask = loss_mask.to(token_logps.dtype)
    total = document_sums(token_logps * mask, doc_ids, num_docs)
    count = document_sums(mask, doc_ids, num_docs)
    if length_normalize:
        total = total / count.clamp(min=1)
    return total, count

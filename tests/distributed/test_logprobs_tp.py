"""Vocab-parallel log-probs at TP=2 equal the unsplit computation, values and gradients."""

import torch
import torch.distributed as dist

from multirank import run_multirank
from nemo_aot.models.logprobs import vocab_parallel_logprobs

VOCAB, PADDED = 45, 48


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, PADDED, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, VOCAB, (3, 6), generator=g)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    return logits, target, weight


def _tp_run():
    rank, world = dist.get_rank(), dist.get_world_size()
    logits, target, weight = _data()
    shard = PADDED // world
    mine = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
    out, mean_logits = vocab_parallel_logprobs(mine, target, vocab_size=VOCAB,
                                               vocab_start=rank * shard, group=dist.group.WORLD,
                                               chunk_tokens=4, mean_logits=True)
    (out * weight).sum().backward()
    return out.detach(), mine.grad, mean_logits


def test_tp2_equals_single_rank():
    logits, target, weight = _data()
    full = logits.clone().requires_grad_()
    ref = vocab_parallel_logprobs(full, target, vocab_size=VOCAB)
    (ref * weight).sum().backward()
    results = run_multirank(_tp_run, 2, timeout=120)
    # mean logit over the true vocabulary (padded columns excluded), as TP=1 gives it
    _, single_means = vocab_parallel_logprobs(logits, target, vocab_size=VOCAB, mean_logits=True)
    torch.testing.assert_close(single_means, logits[..., :VOCAB].mean(-1))
    for out, _, mean_logits in results:
        torch.testing.assert_close(out.double(), ref.detach().double(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mean_logits, single_means, rtol=1e-12, atol=1e-12)
    grad = torch.cat([g for _, g, _ in results], dim=-1)
    torch.testing.assert_close(grad, full.grad, rtol=1e-6, atol=1e-7)
    assert torch.all(grad[..., VOCAB:] == 0)


HIDDEN = 8


def _hidden_data():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 6, HIDDEN, generator=g, dtype=torch.float64)
    w = torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64)
    target = torch.randint(0, VOCAB, (3, 6), generator=g)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    return h, w, target, weight


def _hidden_tp_run():
    from nemo_aot.models.logprobs import hidden_state_logprobs

    rank, world = dist.get_rank(), dist.get_world_size()
    h, w, target, weight = _hidden_data()
    shard = PADDED // world
    h = h.requires_grad_()
    mine = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    out, means = hidden_state_logprobs(h, mine, target, vocab_size=VOCAB,
                                       vocab_start=rank * shard, group=dist.group.WORLD,
                                       chunk_tokens=4, mean_logits=True)
    (out * weight).sum().backward()
    return out.detach(), means, h.grad, mine.grad


def test_hidden_state_logprobs_tp2_equal_single_rank():
    """Each rank holds half the output rows: the same log-probs and mean logits on both ranks,
    the weight gradients are the halves of the single-rank one, and the hidden-state gradients
    add up over the ranks (the model's copy to the TP region does that sum)."""
    from nemo_aot.models.logprobs import hidden_state_logprobs

    h, w, target, weight = _hidden_data()
    h, w = h.requires_grad_(), w.requires_grad_()
    ref, ref_means = hidden_state_logprobs(h, w, target, vocab_size=VOCAB, mean_logits=True)
    (ref * weight).sum().backward()
    results = run_multirank(_hidden_tp_run, 2, timeout=120)
    for out, means, _, _ in results:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(means, ref_means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([r[3] for r in results]), w.grad, rtol=1e-10,
                               atol=1e-12)
    torch.testing.assert_close(results[0][2] + results[1][2], h.grad, rtol=1e-10, atol=1e-12)

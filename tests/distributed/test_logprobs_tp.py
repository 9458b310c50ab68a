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

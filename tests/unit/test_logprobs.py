import pytest
import torch

from nemo_aot.models.logprobs import sequence_logprobs, vocab_parallel_logprobs


def _reference(logits, target, vocab_size):
    return torch.log_softmax(logits[..., :vocab_size].double(), -1).gather(
        -1, target.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("padded", [0, 5])
def test_matches_log_softmax_values_and_grads(chunk, padded):
    torch.manual_seed(0)
    vocab = 37
    logits = (torch.randn(2, 7, vocab + padded) * 3).requires_grad_()
    target = torch.randint(0, vocab, (2, 7))
    out = vocab_parallel_logprobs(logits, target, vocab_size=vocab, chunk_tokens=chunk)
    ref = _reference(logits, target, vocab)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(2, 7)
    (out * w).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    (_reference(ref_logits, target, vocab) * w.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    if padded:
        assert torch.all(logits.grad[..., vocab:] == 0)


def test_gradcheck_float64():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (3, 4))
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprobs(z, target, vocab_size=9, chunk_tokens=5), (logits,))


def test_bf16_logits_are_upcast_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 16).bfloat16()
    before = logits.clone()
    target = torch.randint(0, 12, (2, 5))
    out = vocab_parallel_logprobs(logits, target, vocab_size=12)
    assert out.dtype == torch.float32
    assert torch.equal(logits, before)
    torch.testing.assert_close(out.double(), _reference(logits.float(), target, 12),
                               rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_sum_and_mean():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    total, count = sequence_logprobs(lp, mask)
    assert total.tolist() == [-5.0, -4.0] and count.tolist() == [2.0, 1.0]
    mean, _ = sequence_logprobs(lp, mask, length_normalize=True)
    assert mean.tolist() == [-2.5, -4.0]


@pytest.mark.parametrize("padded", [0, 5])
def test_mean_logits_over_the_true_vocabulary_leave_grads_alone(padded):
    torch.manual_seed(3)
    vocab = 37
    logits = (torch.randn(2, 7, vocab + padded) * 3).requires_grad_()
    target = torch.randint(0, vocab, (2, 7))
    out, means = vocab_parallel_logprobs(logits, target, vocab_size=vocab, chunk_tokens=3,
                                         mean_logits=True)
    torch.testing.assert_close(means, logits[..., :vocab].detach().mean(-1), rtol=1e-5, atol=1e-6)
    assert not means.requires_grad
    torch.testing.assert_close(out, vocab_parallel_logprobs(logits, target, vocab_size=vocab))
    out.sum().backward()     # the extra output adds nothing to backward
    ref = logits.detach().clone().requires_grad_()
    _reference(ref, target, vocab).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad.double(), rtol=1e-5, atol=1e-6)

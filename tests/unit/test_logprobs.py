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


# ------------------------------------------------- log-probs from hidden states (no logits)
def _hidden_case(padded, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    vocab, hidden = 37, 16
    h = torch.randn(2, 7, hidden, generator=g, dtype=dtype)
    w = torch.randn(vocab + padded, hidden, generator=g, dtype=dtype) * 0.5
    target = torch.randint(0, vocab, (2, 7), generator=g)
    return h, w, target, vocab


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("padded", [0, 5])
def test_hidden_state_logprobs_equal_log_softmax_of_the_product(chunk, padded):
    """Reference: the logits h W^T built in full, then log_softmax over the true vocabulary."""
    from nemo_aot.models.logprobs import hidden_state_logprobs

    h, w, target, vocab = _hidden_case(padded)
    h.requires_grad_(), w.requires_grad_()
    out, means = hidden_state_logprobs(h, w, target, vocab_size=vocab, chunk_tokens=chunk,
                                       mean_logits=True)
    hd, wd = (x.detach().double().requires_grad_() for x in (h, w))
    logits = hd @ wd.t()
    ref = _reference(logits, target, vocab)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means.double(), logits[..., :vocab].mean(-1).detach(),
                               rtol=1e-5, atol=1e-5)
    weight = torch.randn(2, 7)
    (out * weight).sum().backward()
    (ref * weight.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)
    if padded:
        assert torch.all(w.grad[vocab:] == 0)


def test_hidden_state_logprobs_equal_the_logits_path():
    from nemo_aot.models.logprobs import hidden_state_logprobs

    h, w, target, vocab = _hidden_case(3)
    a = hidden_state_logprobs(h, w, target, vocab_size=vocab, chunk_tokens=4)
    b = vocab_parallel_logprobs(h @ w.t(), target, vocab_size=vocab, chunk_tokens=4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_hidden_state_gradcheck_float64():
    from nemo_aot.models.logprobs import hidden_state_logprobs

    h, w, target, vocab = _hidden_case(2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: hidden_state_logprobs(a, b, target, vocab_size=vocab, chunk_tokens=5),
        (h.requires_grad_(), w.requires_grad_()))


def test_hidden_state_frozen_weight_gets_no_gradient():
    """A frozen output layer (LoRA's base) gets no gradient and no fp32 buffer for one."""
    from nemo_aot.models.logprobs import hidden_state_logprobs

    h, w, target, vocab = _hidden_case(0)
    h.requires_grad_()
    hidden_state_logprobs(h, w, target, vocab_size=vocab, chunk_tokens=4).sum().backward()
    assert h.grad is not None and w.grad is None


def test_hidden_state_bf16_matches_bf16_logits_path():
    """bf16 inputs: the chunk's GEMM in bf16 as the model's output layer computes it, the
    softmax in fp32: the same values as the logits path on the model's own bf16 logits."""
    from nemo_aot.models.logprobs import hidden_state_logprobs

    h, w, target, vocab = _hidden_case(0, dtype=torch.bfloat16)
    a = hidden_state_logprobs(h, w, target, vocab_size=vocab, chunk_tokens=5)
    b = vocab_parallel_logprobs(h @ w.t(), target, vocab_size=vocab, chunk_tokens=5)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)

"""The global-scope matched-partner terms reproduce the full-batch loss and gradient."""

import pytest
import torch

from nemo_aot.losses import (
    matched_partner_loss,
    plan_global_sort,
    preference_loss,
    transport_inputs,
)


def _model_batch(n, m, d=5, seed=0):
    """A tiny linear 'policy': log-probs = features @ theta, reference log-probs fixed."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    xc, xr = (torch.randn(n, d, generator=g, dtype=torch.float64),
              torch.randn(m, d, generator=g, dtype=torch.float64))
    rc, rr = (torch.randn(n, generator=g, dtype=torch.float64),
              torch.randn(m, generator=g, dtype=torch.float64))
    return theta, xc, xr, rc, rr


def _full_batch(loss_type, theta, xc, xr, rc, rr, surrogate, beta, ls):
    theta = theta.clone().requires_grad_()
    loss, _ = preference_loss(xc @ theta, xr @ theta, rc, rr, loss_type=loss_type, beta=beta,
                              surrogate=surrogate, label_smoothing=ls)
    loss.backward()
    return loss.detach(), theta.grad


def _split(count, parts, seed):
    """A random split of range(count) into `parts` micro-batches of uneven sizes (some empty)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, parts, (count,), generator=g)
    return [torch.nonzero(owner == p).flatten() for p in range(parts)]


def _micro_batched(loss_type, theta, xc, xr, rc, rr, surrogate, beta, ls, parts, seed=1):
    with torch.no_grad():    # first pass over the whole global batch
        u_all, v_all = transport_inputs(loss_type, xc @ theta, xr @ theta, rc, rr)
        plan = plan_global_sort(u_all, v_all)
    theta = theta.clone().requires_grad_()
    chosen_split = _split(xc.shape[0], parts, seed)
    rejected_split = (chosen_split if loss_type == "aot_paired"
                      else _split(xr.shape[0], parts, seed + 1))
    total = 0.0
    for ci, ri in zip(chosen_split, rejected_split):   # second pass, one micro-batch at a time
        if loss_type == "aot_paired":
            u, v = transport_inputs(loss_type, xc[ci] @ theta, xr[ci] @ theta, rc[ci], rr[ci])
        else:
            u, v = transport_inputs(loss_type, xc[ci] @ theta, xr[ri] @ theta, rc[ci], rr[ri])
        term = matched_partner_loss(u, v, ci, ri, plan, beta=beta, surrogate=surrogate,
                                    label_smoothing=ls)
        term.backward()
        total += term.detach()
    return total, theta.grad


CASES = [
    ("aot_unpaired", 24, 24, "logistic", 0.0),
    ("aot_unpaired", 24, 24, "logistic", 0.1),
    ("aot_unpaired", 17, 29, "logistic", 0.0),
    ("aot_unpaired", 30, 7, "squared_hinge", 0.0),
    ("aot_unpaired", 13, 20, "least_squares", 0.0),
    ("aot_unpaired", 12, 9, "hinge", 0.0),
    ("aot_paired", 20, 20, "logistic", 0.0),
    ("aot_paired", 20, 20, "squared_hinge", 0.0),
]


@pytest.mark.parametrize("loss_type,n,m,surrogate,ls", CASES)
@pytest.mark.parametrize("parts", [1, 3, 8])
def test_micro_batches_sum_to_full_batch_loss_and_gradient(loss_type, n, m, surrogate, ls, parts):
    batch = _model_batch(n, m, seed=n * m)
    full_loss, full_grad = _full_batch(loss_type, *batch, surrogate, 0.3, ls)
    loss, grad = _micro_batched(loss_type, *batch, surrogate, 0.3, ls, parts)
    torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-12)


def test_local_sort_per_micro_batch_is_not_the_full_batch_gradient():
    """Guards the test above: sorting each micro-batch alone gives a different gradient."""
    theta, xc, xr, rc, rr = _model_batch(24, 24, seed=5)
    _, full_grad = _full_batch("aot_unpaired", theta, xc, xr, rc, rr, "logistic", 0.3, 0.0)
    theta = theta.clone().requires_grad_()
    for idx in torch.arange(24).chunk(4):
        loss, _ = preference_loss(xc[idx] @ theta, xr[idx] @ theta, rc[idx], rr[idx],
                                  loss_type="aot_unpaired", beta=0.3)
        (loss / 4).backward()
    assert (theta.grad - full_grad).abs().max() > 1e-3


def test_second_pass_must_reproduce_first_pass():
    u, v = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    plan = plan_global_sort(u, v)
    idx = torch.arange(3)
    matched_partner_loss(u[idx], v[idx], idx, idx, plan, beta=0.1)   # exact: fine
    with pytest.raises(RuntimeError, match="first pass"):
        matched_partner_loss(u[idx] + 0.01, v[idx], idx, idx, plan, beta=0.1)
    matched_partner_loss(u[idx] + 0.01, v[idx], idx, idx, plan, beta=0.1, reproduce_atol=None)


def test_global_scope_bad_inputs():
    plan = plan_global_sort(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="chosen_values and chosen_index"):
        matched_partner_loss(torch.randn(2), torch.randn(2), torch.arange(3), torch.arange(2), plan,
                             beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        matched_partner_loss(torch.randn(2), torch.randn(2), torch.arange(2), torch.arange(2), plan,
                             beta=0.0, reproduce_atol=None)
    with pytest.raises(ValueError, match="rejected_values"):
        plan_global_sort(torch.randn(4), torch.randn(0))

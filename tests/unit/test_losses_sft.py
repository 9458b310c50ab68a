"""The SFT term (nemo_aot/losses/sft.py): shares that add up to the whole batch's per-token NLL,
its metric pieces, and its option's checks. TRL equality is in test_losses_trl.py."""

import pytest
import torch

from nemo_aot.losses import (
    AlignmentConfig,
    check_sft_loss_weight,
    chosen_nll,
    finalize_metrics,
    nll_metric_sums,
    preference_loss,
)


def _rows(n, seed):
    """Summed log-probs of n chosen responses and their token counts (1 to 30 tokens)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 31, (n,), generator=g).double()
    return -counts * torch.rand(n, generator=g, dtype=torch.float64) * 3, counts


def test_shares_over_any_split_add_up_to_the_whole_batch():
    """Micro-batches and ranks each hold some rows; with the whole batch's token count every
    split gives the same value and gradient as one call on the batch."""
    logps, counts = _rows(10, seed=0)
    total = int(counts.sum())
    whole = logps.clone().requires_grad_()
    expected = chosen_nll(whole, total)
    expected.backward()
    assert expected.item() == pytest.approx(-(logps.sum() / counts.sum()).item(), rel=1e-12)
    for bounds in ([0, 3, 3, 10], [0, 1, 2, 5, 9, 10]):   # an empty share included
        x = logps.clone().requires_grad_()
        shares = [chosen_nll(x[a:b], total) for a, b in zip(bounds, bounds[1:])]
        torch.stack(shares).sum().backward()
        assert torch.stack(shares).sum().item() == pytest.approx(expected.item(), rel=1e-12)
        torch.testing.assert_close(x.grad, whole.grad, rtol=0, atol=0)
    # not a mean of per-sequence means: long responses weigh more
    assert abs(expected.item() + (logps / counts).mean().item()) > 1e-3


def test_no_chosen_token_gives_zero_and_fp32_inputs_are_upcast():
    assert chosen_nll(torch.zeros(0), 0).item() == 0.0
    half = torch.tensor([-3.0, -5.0], dtype=torch.bfloat16)
    assert chosen_nll(half, 4).dtype == torch.float32
    assert chosen_nll(half, 4).item() == 2.0


@pytest.mark.parametrize("logps, tokens, match", [
    (torch.zeros(2, 2), 4, "1-D"), (torch.zeros(2, dtype=torch.long), 4, "floating"),
    ([0.0, 1.0], 4, "1-D"), (torch.zeros(2), -1, "num_tokens"),
    (torch.zeros(2), True, "num_tokens"), (torch.zeros(2), float("nan"), "num_tokens")])
def test_bad_inputs_are_refused(logps, tokens, match):
    with pytest.raises(ValueError, match=match):
        chosen_nll(logps, tokens)


def test_metric_pieces_reduce_to_nll_loss_and_the_total_loss():
    """Pieces summed over calls: nll_loss is the token mean over every call's chosen tokens, and
    loss = mean preference loss over calls + w * nll_loss."""
    weight = 0.4
    g = torch.Generator().manual_seed(1)
    calls = []
    for seed in (2, 3):
        logps, counts = _rows(4, seed)
        pr, rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
        loss, sums = preference_loss(logps, pr, rc, rr, loss_type="dpo", beta=0.1)
        sums.update(nll_metric_sums(logps, counts, weight))
        calls.append((loss, logps, counts, sums))
    summed = {k: sum(c[3][k] for c in calls) for k in calls[0][3]}
    m = finalize_metrics(summed)
    logps, counts = torch.cat([c[1] for c in calls]), torch.cat([c[2] for c in calls])
    nll = -(logps.sum() / counts.sum())
    assert m["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    preference = (calls[0][0] + calls[1][0]) / 2
    assert m["loss"].item() == pytest.approx((preference + weight * nll).item(), rel=1e-6)
    without = {k: v for k, v in calls[0][3].items() if not k.startswith(("nll", "sft"))}
    assert "nll_loss" not in finalize_metrics(without)   # the term off: TRL's names only


@pytest.mark.parametrize("weight", [-0.1, float("inf"), float("nan"), True, "1"])
def test_the_weight_must_be_a_finite_number_at_least_zero(weight):
    with pytest.raises(ValueError, match="sft_loss_weight"):
        check_sft_loss_weight(weight)
    with pytest.raises(ValueError, match=r"alignment\.sft_loss_weight must be .* >= 0"):
        AlignmentConfig(sft_loss_weight=weight).validate()


def test_the_weight_defaults_to_off():
    assert AlignmentConfig().sft_loss_weight == 0.0
    AlignmentConfig(sft_loss_weight=0.0).validate()
    AlignmentConfig(sft_loss_weight=1.0).validate()

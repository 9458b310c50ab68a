"""Metric pieces: exact against direct formulas, and reducible by summing across calls."""

import pytest
import torch

from nemo_aot.losses import finalize_metrics, logit_metric_sums, preference_loss


def _batch(n, m, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    pc, rc = (torch.randn(n, generator=g, dtype=torch.float64) + shift,
              torch.randn(n, generator=g, dtype=torch.float64))
    pr, rr = (torch.randn(m, generator=g, dtype=torch.float64),
              torch.randn(m, generator=g, dtype=torch.float64))
    return pc, pr, rc, rr


def test_metrics_of_one_call_match_direct_formulas():
    beta = 0.25
    pc, pr, rc, rr = _batch(12, 12, seed=0, shift=0.5)
    loss, sums = preference_loss(pc, pr, rc, rr, loss_type="aot_paired", beta=beta)
    m = finalize_metrics(sums)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    assert m["loss"].item() == pytest.approx(loss.item())
    assert m["rewards/chosen"].item() == pytest.approx(chosen.mean().item(), rel=1e-6)
    assert m["rewards/chosen_std"].item() == pytest.approx(chosen.std(unbiased=False).item(),
                                                           rel=1e-5)
    assert m["rewards/rejected_std"].item() == pytest.approx(rejected.std(unbiased=False).item(),
                                                             rel=1e-5)
    assert m["rewards/margins"].item() == pytest.approx((chosen - rejected).mean().item(), rel=1e-5)
    assert m["rewards/accuracies"].item() == pytest.approx(
        (chosen > rejected).double().mean().item())
    assert m["logps/chosen"].item() == pytest.approx(pc.mean().item(), rel=1e-6)
    assert m["logps/rejected"].item() == pytest.approx(pr.mean().item(), rel=1e-6)
    cs, rs = chosen.sort().values, rejected.sort().values
    assert m["fsd_violation"].item() == pytest.approx((cs < rs).double().mean().item())
    # x_(ceil(0.5*12))
    assert m["rewards/chosen_q50"].item() == pytest.approx(cs[5].item(), rel=1e-6)
    assert m["rewards/rejected_q90"].item() == pytest.approx(rs[10].item(), rel=1e-6)
    ms, rms = (pc - pr).sort().values, (rc - rr).sort().values
    assert m["fsd_violation/margins"].item() == pytest.approx((ms < rms).double().mean().item())
    assert all(not v.requires_grad for v in sums.values())


def test_summing_pieces_over_calls_gives_exact_pooled_statistics():
    beta = 0.5
    calls = [_batch(n, n, seed=n) for n in (3, 8, 5)]
    results = [preference_loss(*b, loss_type="dpo", beta=beta) for b in calls]
    summed = {k: sum(s[k] for _, s in results) for k in results[0][1]}
    m = finalize_metrics(summed)
    chosen = torch.cat([beta * (b[0] - b[2]) for b in calls])
    rejected = torch.cat([beta * (b[1] - b[3]) for b in calls])
    assert m["rewards/chosen"].item() == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert m["rewards/rejected_std"].item() == pytest.approx(rejected.std(unbiased=False).item(),
                                                             rel=1e-4)
    assert m["rewards/accuracies"].item() == pytest.approx(
        (chosen > rejected).double().mean().item())
    assert m["logps/rejected"].item() == pytest.approx(
        torch.cat([b[1] for b in calls]).mean().item(), rel=1e-5)
    assert m["loss"].item() == pytest.approx(sum(loss.item() for loss, _ in results) / 3, rel=1e-6)


def test_unpaired_unequal_sizes_have_no_pairwise_accuracy_but_a_violation():
    pc, pr, rc, rr = _batch(6, 4, seed=3, shift=-3.0)
    _, sums = preference_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=1.0)
    m = finalize_metrics(sums)
    assert torch.isnan(m["rewards/accuracies"])
    assert "fsd_violation/margins" not in m
    assert m["fsd_violation"].item() > 0.5     # chosen shifted well below rejected


def test_metric_keys_are_stable_per_loss_type():
    a = preference_loss(*_batch(6, 6, seed=1), loss_type="aot_unpaired", beta=1.0)[1]
    b = preference_loss(*_batch(6, 2, seed=1), loss_type="aot_unpaired", beta=1.0)[1]
    assert list(a) == list(b)        # so the trainer can stack and all-reduce them in one go


def test_logged_names_are_trls():
    _, sums = preference_loss(*_batch(4, 4, seed=2), loss_type="dpo", beta=0.1)
    names = finalize_metrics({**sums, **logit_metric_sums(*[torch.ones(4)] * 4)})
    trl = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    assert trl <= set(names)
    assert not {"rewards/accuracy", "rewards/margin"} & set(names)


def test_length_averaged_inputs_report_token_sums_but_sort_the_averages():
    """TRL logs rewards and log-probs of summed log-probs for every loss type (its IPO included)."""
    beta = 0.3
    pc, pr, rc, rr = _batch(8, 8, seed=4)
    g = torch.Generator().manual_seed(4)
    lc, lr = (torch.randint(1, 40, (8,), generator=g).double() for _ in range(2))
    averaged = (pc / lc, pr / lr, rc / lc, rr / lr)
    loss, sums = preference_loss(*averaged, loss_type="aot_unpaired", beta=beta, lengths=(lc, lr))
    plain_loss, plain = preference_loss(*averaged, loss_type="aot_unpaired", beta=beta)
    m, p = finalize_metrics(sums), finalize_metrics(plain)
    assert loss.item() == plain_loss.item()          # the loss itself ignores the counts
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    assert m["rewards/chosen"].item() == pytest.approx(chosen.mean().item(), rel=1e-5)
    assert m["rewards/rejected"].item() == pytest.approx(rejected.mean().item(), rel=1e-5)
    assert m["rewards/accuracies"].item() == pytest.approx(
        (chosen > rejected).double().mean().item())
    assert m["rewards/chosen_q50"].item() == pytest.approx(chosen.sort().values[3].item(), rel=1e-5)
    assert m["logps/chosen"].item() == pytest.approx(pc.mean().item(), rel=1e-5)
    assert m["fsd_violation"].item() == p["fsd_violation"].item()   # of what the loss sorts
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(*averaged, loss_type="dpo", beta=beta, lengths=(lc, lr[:3]))


def test_logit_pieces_give_the_token_weighted_mean_over_calls():
    rows = [(torch.tensor([3.0, -1.0]), torch.tensor([2.0, 1.0]), torch.tensor([4.0]),
             torch.tensor([8.0])),
            (torch.tensor([0.5]), torch.tensor([5.0]), torch.tensor([1.0, 1.0]),
             torch.tensor([1.0, 3.0]))]
    calls = [logit_metric_sums(*r) for r in rows]
    _, sums = preference_loss(*_batch(3, 3, seed=5), loss_type="dpo", beta=0.1)
    m = finalize_metrics({**sums, **{k: calls[0][k] + calls[1][k] for k in calls[0]}})
    assert m["logits/chosen"].item() == pytest.approx((3.0 - 1.0 + 0.5) / (2 + 1 + 5))
    assert m["logits/rejected"].item() == pytest.approx((4.0 + 1.0 + 1.0) / (8 + 1 + 3))

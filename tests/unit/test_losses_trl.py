"""Loss and gradients equal Hugging Face TRL's DPOTrainer for the cases both implement.

Two references:
* an independent transcription of TRL's per-loss-type formulas (always runs), and
* TRL itself (``trl`` + ``accelerate`` installed): ``DPOTrainer._compute_loss`` is called on a
  stand-in trainer and a stand-in model that returns the per-token log-probs we choose, with the
  reference log-probs precomputed. Skipped when TRL is not importable.

Mapping: TRL ``aot`` = our ``aot_paired``; TRL ``aot_unpaired`` (formerly ``aot_pair``) = our
``aot_unpaired``; TRL ``sigmoid`` = our ``dpo``; TRL ``ipo`` = our ``ipo`` on length-averaged
log-probs (TRL divides each log-ratio by its completion length).
"""

import collections
import types

import pytest
import torch
import torch.nn.functional as F

from nemo_aot.losses import finalize_metrics, logit_metric_sums, preference_loss

OURS = {"aot": "aot_paired", "aot_unpaired": "aot_unpaired", "sigmoid": "dpo", "ipo": "ipo"}


def transcribed_trl_loss(loss_type, pc, pr, rc, rr, beta, label_smoothing=0.0):
    """TRL's formulas, re-typed from its documentation of each loss type (not from our code)."""
    if loss_type == "sigmoid":
        logits = (pc - pr) - (rc - rr)
        per = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
               - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        logits = (pc - pr) - (rc - rr)
        per = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "aot":
        delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        per = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
               - F.logsigmoid(-beta * delta) * label_smoothing)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(pc - rc, dim=0)[0] - torch.sort(pr - rr, dim=0)[0]
        per = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
               - F.logsigmoid(-beta * delta) * label_smoothing)
    return per.mean()


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(-20 + 6 * torch.randn(n, generator=g, dtype=torch.float64)) for _ in range(4)]


def _loss_and_grads(fn, pc, pr, rc, rr):
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss = fn(pc, pr, rc, rr)
    loss.backward()
    return loss.detach(), pc.grad, pr.grad


@pytest.mark.parametrize("trl_type", sorted(OURS))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("n", [1, 3, 32])
def test_matches_transcribed_trl(trl_type, label_smoothing, n):
    if trl_type == "ipo" and label_smoothing:
        pytest.skip("no label smoothing for ipo")
    pc, pr, rc, rr = _inputs(n, seed=n)
    beta = 0.1
    ref = _loss_and_grads(lambda *a: transcribed_trl_loss(trl_type, *a, beta, label_smoothing),
                          pc, pr, rc, rr)
    ours = _loss_and_grads(lambda *a: preference_loss(*a, loss_type=OURS[trl_type], beta=beta,
                                                     label_smoothing=label_smoothing)[0],
                           pc, pr, rc, rr)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- TRL itself
def _trl_trainer_cls():
    pytest.importorskip("accelerate")
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    if not hasattr(trl_dpo.DPOTrainer, "_compute_loss"):
        pytest.skip("installed TRL has no DPOTrainer._compute_loss")
    return trl_dpo.DPOTrainer


class _StandInModel:
    """Returns the per-token log-probs (and mean logits) we set; TRL sums the log-probs over
    completion tokens."""
    training = True

    def __init__(self, per_token_logps, mean_logits=None):
        self.per_token_logps = per_token_logps
        self.mean_logits = (torch.zeros_like(per_token_logps.detach()) if mean_logits is None
                            else mean_logits)

    def __call__(self, **kwargs):
        lp = self.per_token_logps
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp.detach()),
                                     mean_logits=self.mean_logits,
                                     is_top1=torch.zeros(lp.shape, dtype=torch.bool))


def _trl_loss(trainer_cls, trl_type, pc, pr, rc, rr, completion_lengths, beta, label_smoothing):
    """Run TRL's _compute_loss with the reference log-probs precomputed."""
    return _trl_run(trainer_cls, trl_type, pc, pr, rc, rr, completion_lengths, beta,
                    label_smoothing)[0]


def _trl_run(trainer_cls, trl_type, pc, pr, rc, rr, completion_lengths, beta, label_smoothing,
             mean_logits=None):
    """TRL's (loss, logged metrics) with the reference log-probs precomputed."""
    n, seq = pc.shape[0], int(completion_lengths.max()) + 1
    # Put each sequence's whole log-prob on its first completion token; the rest are 0.
    per_token = torch.zeros(2 * n, seq - 1, dtype=pc.dtype)
    per_token = per_token + (F.one_hot(torch.zeros(2 * n, dtype=torch.long), seq - 1)
                             * torch.cat([pc, pr])[:, None])
    mask = (torch.arange(seq)[None, :] < completion_lengths[:, None]).long()
    accel = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                  gather_for_metrics=lambda x: x)
    model = _StandInModel(per_token, mean_logits)
    fake = types.SimpleNamespace(
        model=model, accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[trl_type],
        loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    inputs = {"input_ids": torch.ones(2 * n, seq, dtype=torch.long), "attention_mask": mask,
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trainer_cls._compute_loss(fake, model, inputs, False)
    return loss, {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("trl_type", ["aot", "aot_unpaired", "sigmoid", "ipo"])
@pytest.mark.parametrize("n", [1, 4, 16])
def test_matches_trl_dpo_trainer(trl_type, n):
    trainer_cls = _trl_trainer_cls()
    pc, pr, rc, rr = _inputs(n, seed=100 + n)
    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 9, (2 * n,), generator=g)
    beta = 0.1
    smoothing = 0.2 if trl_type.startswith("aot") else 0.0   # TRL's sigmoid no longer smooths
    ref = _loss_and_grads(lambda *a: _trl_loss(trainer_cls, trl_type, *a, lengths, beta, smoothing),
                          pc, pr, rc, rr)
    if trl_type == "ipo":   # TRL's IPO divides each log-ratio by its completion length
        lc, lr = lengths[:n].double(), lengths[n:].double()

        def scale(a, b, c, d):
            return a / lc, b / lr, c / lc, d / lr
    else:
        def scale(*a):
            return a
    ours = _loss_and_grads(lambda *a: preference_loss(*scale(*a), loss_type=OURS[trl_type],
                                                     beta=beta, label_smoothing=smoothing)[0],
                           pc, pr, rc, rr)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("trl_type", ["aot", "aot_unpaired", "sigmoid", "ipo"])
def test_logged_metrics_equal_trl_dpo_trainer(trl_type):
    """Same names, same values: TRL's rewards/* (beta-scaled, of summed log-probs even for its
    length-normalized IPO), logps/* and logits/* (token-weighted mean logit)."""
    trainer_cls = _trl_trainer_cls()
    n, beta = 8, 0.1
    pc, pr, rc, rr = _inputs(n, seed=7)
    rc[:2] = pc[:2] + 1.0       # a few pairs the policy gets wrong, so accuracy is not 0 or 1
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(2, 9, (2 * n,), generator=g)
    seq = int(lengths.max()) + 1
    mean_logits = torch.randn(2 * n, seq - 1, generator=g, dtype=torch.float64)
    _, trl = _trl_run(trainer_cls, trl_type, pc, pr, rc, rr, lengths, beta, 0.0, mean_logits)

    lc, lr = lengths[:n].double(), lengths[n:].double()
    inputs, extra = (pc, pr, rc, rr), {}
    if trl_type == "ipo":       # our IPO takes length-averaged log-probs, plus the counts
        inputs, extra = (pc / lc, pr / lr, rc / lc, rr / lr), {"lengths": (lc, lr)}
    _, sums = preference_loss(*inputs, loss_type=OURS[trl_type], beta=beta, **extra)
    # TRL averages the logits over the completion tokens after the first (its shifted mask)
    shifted = (torch.arange(seq)[None, :] < lengths[:, None]).double()[:, 1:]
    row_sums, row_tokens = (mean_logits * shifted).sum(-1), shifted.sum(-1)
    sums.update(logit_metric_sums(row_sums[:n], row_tokens[:n], row_sums[n:], row_tokens[n:]))
    ours = finalize_metrics(sums)
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
    assert 0 < trl["rewards/accuracies"] < 1
    for name in names:
        assert ours[name].item() == pytest.approx(trl[name], rel=1e-5, abs=1e-6), name


# ---------------------------------------------------------------- the SFT term (TRL's "sft")
def _token_batch(n, seed):
    """Per-token log-probs of n chosen then n rejected responses (0 off the response, as TRL's
    model output is), the response mask, and the reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * n, 9, dtype=torch.long)
    for i, length in enumerate(torch.randint(1, 10, (2 * n,), generator=g).tolist()):
        start = int(torch.randint(0, 10 - length, (1,), generator=g))
        mask[i, start:start + length] = 1
    per_token = -torch.rand(2 * n, 9, generator=g, dtype=torch.float64) * 4 * mask
    refs = [per_token[:n].sum(1) + torch.randn(n, generator=g, dtype=torch.float64),
            per_token[n:].sum(1) + torch.randn(n, generator=g, dtype=torch.float64)]
    return per_token, mask, refs


def _trl_token_run(trainer_cls, loss_types, weights, per_token, mask, rc, rr, beta):
    """TRL's loss on per-token log-probs we choose; ``mask`` marks the response tokens of
    ``per_token`` (TRL's completion mask, shifted by one position)."""
    completion = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
    accel = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                  gather_for_metrics=lambda x: x)
    model = _StandInModel(per_token)
    fake = types.SimpleNamespace(
        model=model, accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=weights, beta=beta, label_smoothing=0.0, use_weighting=False, _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
    inputs = {"input_ids": torch.ones_like(completion), "attention_mask": completion,
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return trainer_cls._compute_loss(fake, model, inputs, False)


def _ours_with_sft(trl_type, per_token, mask, rc, rr, beta, weight):
    """(total loss, NLL, finalized metrics) from the summed log-probs and the token counts."""
    from nemo_aot.losses import chosen_nll, nll_metric_sums

    n = rc.shape[0]
    sums, counts = (per_token * mask).sum(1), mask.sum(1).double()
    pc, pr = sums[:n], sums[n:]
    inputs, extra = (pc, pr, rc, rr), {}
    if trl_type == "ipo":   # TRL's IPO divides each log-ratio by its completion length
        lc, lr = counts[:n], counts[n:]
        inputs, extra = (pc / lc, pr / lr, rc / lc, rr / lr), {"lengths": (lc, lr)}
    loss, pieces = preference_loss(*inputs, loss_type=OURS[trl_type], beta=beta, **extra)
    nll = chosen_nll(pc, int(counts[:n].sum()))
    pieces.update(nll_metric_sums(pc, counts[:n], weight))
    return loss + weight * nll, nll, finalize_metrics(pieces)


@pytest.mark.parametrize("trl_type", ["aot", "aot_unpaired", "sigmoid", "ipo"])
@pytest.mark.parametrize("n", [1, 5])
def test_sft_term_matches_trl_dpo_trainer(trl_type, n):
    """loss_type=[<loss>, "sft"], loss_weights=[1, w] (TRL's rpo_alpha = w): same total loss and
    gradients; loss_type=["sft"] alone: the same NLL, a token mean over the batch's chosen
    tokens (responses of different lengths, so a mean of per-sequence means would differ)."""
    trainer_cls = _trl_trainer_cls()
    per_token, mask, (rc, rr) = _token_batch(n, seed=n)
    beta, weight = 0.1, 0.7
    grads = []
    for run in (lambda x: _trl_token_run(trainer_cls, [trl_type, "sft"], [1.0, weight], x,
                                         mask, rc, rr, beta),
                lambda x: _ours_with_sft(trl_type, x, mask, rc, rr, beta, weight)[0]):
        x = per_token.clone().requires_grad_()
        total = run(x * mask)   # a model's log-probs are 0 off the response (labels -100)
        total.backward()
        grads.append((total.detach(), x.grad))
    (trl_total, trl_grad), (our_total, our_grad) = grads
    torch.testing.assert_close(our_total, trl_total, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-12, atol=1e-15)
    trl_nll = _trl_token_run(trainer_cls, ["sft"], [1.0], per_token, mask, rc, rr, beta)
    total, nll, metrics = _ours_with_sft(trl_type, per_token, mask, rc, rr, beta, weight)
    torch.testing.assert_close(nll, trl_nll, rtol=1e-12, atol=1e-15)
    assert metrics["nll_loss"].item() == pytest.approx(trl_nll.item(), rel=1e-6)
    assert metrics["loss"].item() == pytest.approx(trl_total.item(), rel=1e-6)
    if n > 1:
        per_sequence = -((per_token * mask).sum(1) / mask.sum(1))[:n].mean()
        assert abs(per_sequence - trl_nll) > 1e-3   # the test tells the two reductions apart


def test_sft_term_matches_transcribed_trl():
    """Without TRL installed: its "sft" term, -per_token_logps[chosen_mask].mean(), re-typed."""
    from nemo_aot.losses import chosen_nll

    per_token, mask, _ = _token_batch(6, seed=3)
    expected = -per_token[:6][mask[:6].bool()].mean()
    got = chosen_nll((per_token * mask).sum(1)[:6], int(mask[:6].sum()))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)

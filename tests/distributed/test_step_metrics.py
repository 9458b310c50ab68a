"""The TRL-named metrics of one AOT step equal brute force from the tiny model's own logits.

``logps/*`` is the summed policy log-prob of the responses (log_softmax over the true vocabulary
of the full logits), ``rewards/*`` TRL's beta-scaled implicit rewards of summed log-probs (also
when the loss is given length-averaged ones), ``logits/*`` the mean logit over the vocabulary,
averaged over every response token of a side, and ``nll_loss`` (with the SFT term) minus the
summed chosen log-probs over the chosen response tokens. TP2 is checked against TP1 for every
metric in test_aot_step_invariance.py; here one rank and two micro-batches.
"""

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

VOCAB, PADDED, BETA = 250, 256, 0.1
TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


def _brute_force(chunk, mbs, paired):
    """Per side: summed log-probs, summed references, mean-logit sums and token counts."""
    out = {"chosen": [[], [], [], []], "rejected": [[], [], [], []]}
    with torch.no_grad():
        for mb in mbs:
            logits = chunk(mb["input_ids"], mb["position_ids"], None).double()[..., :VOCAB]
            token = torch.log_softmax(logits, -1).gather(-1, mb["labels"].unsqueeze(-1)).squeeze(-1)
            mask = mb["loss_mask"].double()
            per_row = ((token * mask).sum(-1), mb["reference_sum"].double(),
                       (logits.mean(-1) * mask).sum(-1), mask.sum(-1))
            half = mb["label"].shape[0] // 2
            for side, rows in (("chosen", mb["label"]), ("rejected", ~mb["label"])):
                if paired:  # chosen row i pairs with row i + B/2
                    rows = torch.arange(half) + (0 if side == "chosen" else half)
                for acc, x in zip(out[side], per_row):
                    acc.append(x[rows])
    return {side: [torch.cat(x) for x in cols] for side, cols in out.items()}


def _run(loss_type, length_normalize, sft_loss_weight):
    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig

    chunks, config = mu.setup(per_token_loss=False)
    paired = loss_type != "aot_unpaired"
    mbs = [mu.preference_rows(3, 3 if paired else 2, seed=i, paired=paired) for i in range(2)]
    for mb in mbs:
        # what attach_reference hands the step: sums, or per-token means under length_normalize
        mb["reference_sum"] = mb["reference_logps"].clone()
        if length_normalize:
            mb["reference_logps"] = mb["reference_logps"] / mb["loss_mask"].sum(-1)
    alignment = AlignmentConfig(loss_type=loss_type, beta=BETA, sort_scope="micro",
                                length_normalize=length_normalize, logprob_chunk_size=5,
                                sft_loss_weight=sft_loss_weight)
    step = PreferenceStep(chunks, config, vocab_size=VOCAB, padded_vocab_size=PADDED,
                          alignment=alignment)
    for c in chunks:
        c.eval()
    metrics = step.step(mbs, forward_only=True).metrics
    return metrics, _brute_force(chunks[0], mbs, paired)


@pytest.mark.parametrize("loss_type,length_normalize,sft_loss_weight", [
    ("dpo", False, 0.0), ("aot_unpaired", False, 0.0), ("ipo", True, 0.5)])
def test_trl_metrics_equal_brute_force(loss_type, length_normalize, sft_loss_weight):
    ((metrics, ref),) = run_multirank(_run, 1, args=(loss_type, length_normalize,
                                                     sft_loss_weight), timeout=240)
    assert set(TRL_NAMES) <= set(metrics)
    (pc, rc, lc, nc), (pr, rr, lr, nr) = ref["chosen"], ref["rejected"]
    chosen, rejected = BETA * (pc - rc), BETA * (pr - rr)
    expected = {"logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
                "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/margins": chosen.mean() - rejected.mean(),
                "logits/chosen": lc.sum() / nc.sum(), "logits/rejected": lr.sum() / nr.sum()}
    if loss_type != "aot_unpaired":
        expected["rewards/accuracies"] = (chosen > rejected).double().mean()
    assert ("nll_loss" in metrics) == bool(sft_loss_weight)
    if sft_loss_weight:  # token sums, also when the loss averages over tokens
        expected["nll_loss"] = -pc.sum() / nc.sum()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), name

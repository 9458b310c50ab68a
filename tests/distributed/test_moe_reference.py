"""The reference side of a mixture-of-experts policy: a scoring pass (what fills the reference
cache, and what cpu_swap and adapters_off run) routes deterministically - the same log-probs,
bit for bit, on a second pass - and records no router loss, while a training step of the same
policy records both (their gradients join the policy loss there, their values are logged)."""

import dataclasses

import torch

import mcore_utils as mu
from multirank import run_multirank

MOE = dataclasses.replace(
    mu.TINY, num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
    moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


def _case():
    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig
    from nemo_aot.models.router_metrics import router_loss_metrics

    chunks, config = mu.setup(model_cfg=MOE, per_token_loss=False)
    step = PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                          alignment=AlignmentConfig(loss_type="aot_unpaired", sort_scope="micro"))
    mbs = [mu.preference_rows(2, 2, seed=i) for i in range(2)]
    first = step.score(mbs)
    second = step.score(mbs)
    after_scoring = router_loss_metrics(len(mbs), MOE.num_layers)
    step.step(mbs)
    after_training = router_loss_metrics(len(mbs), MOE.num_layers)
    same = all(torch.equal(a[2], b[2]) for a, b in zip(first, second))
    return same, after_scoring, after_training


def test_scoring_is_deterministic_and_free_of_router_losses():
    ((same, after_scoring, after_training),) = run_multirank(_case, 1, timeout=300)
    assert same
    assert not any(after_scoring.values()), after_scoring
    assert set(after_training) == {"moe/load_balancing_loss", "moe/z_loss"}
    assert all(v > 0 for v in after_training.values()), after_training

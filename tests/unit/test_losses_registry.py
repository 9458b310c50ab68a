"""The loss registry: the built-in specs carry the facts the plumbing used to hard-code, and a
loss registered with one ``register_loss`` call is accepted by config validation,
``preference_loss``, its metrics and the global scope's building blocks with no other edit."""

import pytest
import torch

from config_stubs import DEMO_WITHOUT_CHECKPOINT
from nemo_aot.algorithms.resolve import compose_config
from nemo_aot.losses import (
    LOSS_SPECS,
    AlignmentConfig,
    LossSpec,
    aot_unpaired_loss,
    finalize_metrics,
    get_loss_spec,
    matched_partner_loss,
    plan_global_sort,
    preference_loss,
    register_loss,
    transport_inputs,
)


def test_builtin_specs():
    assert list(LOSS_SPECS) == ["aot_unpaired", "aot_paired", "dpo", "ipo"]
    facts = {name: (s.paired, s.sorts, s.uses_surrogate) for name, s in LOSS_SPECS.items()}
    assert facts == {"aot_unpaired": (False, True, True), "aot_paired": (True, True, True),
                     "dpo": (True, False, True), "ipo": (True, False, False)}
    assert all(s.name == name for name, s in LOSS_SPECS.items())


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_loss(LOSS_SPECS["dpo"])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        get_loss_spec("sigmoid")
    with pytest.raises(ValueError, match=r"must be one of \['aot_paired', 'aot_unpaired'\]"):
        transport_inputs("dpo", *_logps(3, 3))


# ---------------------------------------------------------------- toy losses, added and removed
def _slic(pc, pr, rc, rr, beta, surrogate, ls):
    """A paired, unsorted, surrogate-free calibration hinge: mean (beta - margin)_+."""
    return torch.relu(beta - ((pc - rc) - (pr - rr))).mean()


def _policy_only(pc, pr, rc, rr):
    """Reference-free transport inputs: the policy log-probs themselves."""
    return pc, pr


def _reference_free_aot(pc, pr, rc, rr, beta, surrogate, ls):
    """A sorting, unpaired toy: unpaired AOT on the policy log-probs, no reference."""
    return aot_unpaired_loss(*_policy_only(pc, pr, rc, rr), beta=beta, surrogate=surrogate,
                             label_smoothing=ls)


TOYS = [LossSpec("toy_slic", _slic, paired=True, uses_surrogate=False),
        LossSpec("toy_sorted", _reference_free_aot, paired=False, transport_inputs=_policy_only)]


@pytest.fixture
def toys():
    for spec in TOYS:
        register_loss(spec)
    yield {s.name: s for s in TOYS}
    for spec in TOYS:
        LOSS_SPECS.pop(spec.name)


def _logps(n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(-3 + torch.randn(k, generator=g, dtype=torch.float64) for k in (n, m, n, m))


def _compose(*overrides):
    return compose_config("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, *overrides])


def test_alignment_config_accepts_a_registered_loss(toys):
    AlignmentConfig(loss_type="toy_slic").validate()
    AlignmentConfig(loss_type="toy_sorted", surrogate="hinge").validate()
    with pytest.raises(ValueError, match="surrogate does not apply to loss_type='toy_slic'"):
        AlignmentConfig(loss_type="toy_slic", surrogate="hinge").validate()
    cfg = _compose("alignment.loss_type=toy_slic", "alignment.sort_scope=micro")
    assert cfg.alignment.loss_type == "toy_slic"


@pytest.mark.parametrize("overrides, match", [
    (["alignment.loss_type=toy_slic", "alignment.sort_scope=global"], "toy_slic never sorts"),
    (["data=bundled_unpaired", "alignment.loss_type=toy_slic"],
     "trains on paired data.*use alignment.loss_type=aot_unpaired or toy_sorted"),
    (["alignment.loss_type=toy_sorted", "alignment.sort_scope=micro", "trainer.micro_batch_size=1"],
     "makes toy_sorted exactly DPO"),
])
def test_run_config_rules_read_the_spec(toys, overrides, match):
    with pytest.raises(ValueError, match=match):
        _compose(*overrides)


def test_run_config_accepts_an_unpaired_sorting_loss_on_unpaired_data(toys):
    cfg = _compose("data=bundled_unpaired", "alignment.loss_type=toy_sorted",
                   "alignment.sort_scope=global")
    assert cfg.alignment.loss_type == "toy_sorted"


def test_preference_loss_and_metrics_of_a_paired_toy(toys):
    pc, pr, rc, rr = _logps(6, 6, seed=1)
    loss, sums = preference_loss(pc, pr, rc, rr, loss_type="toy_slic", beta=0.5)
    assert loss.item() == pytest.approx(_slic(pc, pr, rc, rr, 0.5, None, 0.0).item())
    metrics = finalize_metrics(sums)
    chosen, rejected = 0.5 * (pc - rc), 0.5 * (pr - rr)
    assert metrics["rewards/accuracies"].item() == pytest.approx(
        (chosen > rejected).double().mean().item())
    assert "fsd_violation/margins" in metrics          # the paired losses' margin diagnostic
    with pytest.raises(ValueError, match="loss_type='toy_slic' needs pairs"):
        preference_loss(*_logps(4, 3), loss_type="toy_slic", beta=0.5)


def test_preference_loss_metrics_and_global_scope_of_an_unpaired_toy(toys):
    pc, pr, rc, rr = _logps(5, 3, seed=2)
    loss, sums = preference_loss(pc, pr, rc, rr, loss_type="toy_sorted", beta=0.5,
                                 surrogate="hinge")
    assert loss.item() == pytest.approx(
        aot_unpaired_loss(pc, pr, beta=0.5, surrogate="hinge").item())
    metrics = finalize_metrics(sums)
    assert torch.isnan(metrics["rewards/accuracies"]) and "fsd_violation/margins" not in metrics
    # The global scope's pieces: plan on the transport inputs, matched-partner terms sum to the
    # loss.
    u, v = transport_inputs("toy_sorted", pc, pr, rc, rr)
    assert torch.equal(u, pc) and torch.equal(v, pr)
    plan = plan_global_sort(u, v)
    total = sum(matched_partner_loss(u[i:i + 1], v[i:i + 1], torch.tensor([i]), torch.tensor([i]),
                                     plan, beta=0.5, surrogate="hinge") for i in range(3))
    total = total + matched_partner_loss(u[3:], v[:0], torch.arange(3, 5), torch.arange(0), plan,
                                         beta=0.5, surrogate="hinge")
    assert total.item() == pytest.approx(loss.item())


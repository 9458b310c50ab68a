"""preference_loss against brute force, hand-checked values and the AOT/DPO identities."""

import math

import pytest
import torch

from nemo_aot.losses import LOSS_SPECS, SURROGATES, get_surrogate, preference_loss

SURROGATE_NAMES = sorted(SURROGATES)


def _logps(n, m=None, seed=0, dtype=torch.float64):
    """Four random log-prob vectors (n chosen, m rejected), tie-free with probability one."""
    m = n if m is None else m
    g = torch.Generator().manual_seed(seed)
    pc, rc = (-5 + 2 * torch.randn(n, generator=g, dtype=dtype) for _ in range(2))
    pr, rr = (-5 + 2 * torch.randn(m, generator=g, dtype=dtype) for _ in range(2))
    return pc, pr, rc, rr


def _h(surrogate, beta, ls=0.0):
    """Independent scalar surrogate formulas (math module, not torch)."""
    def logistic(x):
        z = beta * x
        def log_sig(s):
            return -math.log1p(math.exp(-s)) if s > 0 else s - math.log1p(math.exp(s))

        return -(1 - ls) * log_sig(z) - ls * log_sig(-z)
    return {"logistic": logistic,
            "squared_hinge": lambda x: max(beta - x, 0.0) ** 2,
            "least_squares": lambda x: (beta - x) ** 2,
            "hinge": lambda x: max(beta - x, 0.0)}[surrogate]


def _sorted_pairs_mean(u, v, h):
    u, v = sorted(u.tolist()), sorted(v.tolist())
    return sum(h(a - b) for a, b in zip(u, v)) / len(u)


# ---------------------------------------------------------------- brute force, equal sizes
@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_aot_equals_explicit_sort_and_pair(surrogate, n):
    pc, pr, rc, rr = _logps(n, seed=n)
    beta = 0.3
    h = _h(surrogate, beta)
    paired, _ = preference_loss(pc, pr, rc, rr, loss_type="aot_paired", beta=beta,
                                surrogate=surrogate)
    unpaired, _ = preference_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=beta,
                                  surrogate=surrogate)
    assert paired.item() == pytest.approx(_sorted_pairs_mean(pc - pr, rc - rr, h), rel=1e-12,
                                          abs=1e-12)
    assert unpaired.item() == pytest.approx(_sorted_pairs_mean(pc - rc, pr - rr, h), rel=1e-12,
                                            abs=1e-12)


@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
def test_dpo_and_ipo_equal_explicit_per_pair_formulas(surrogate):
    pc, pr, rc, rr = _logps(9, seed=3)
    beta = 0.2
    h = _h(surrogate, beta)
    d = ((pc - rc) - (pr - rr)).tolist()
    dpo, _ = preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=beta, surrogate=surrogate)
    assert dpo.item() == pytest.approx(sum(map(h, d)) / len(d), rel=1e-12)
    ipo, _ = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta)
    assert ipo.item() == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in d) / len(d),
                                       rel=1e-12)


# ---------------------------------------------------------------- hand-checked values
# chosen log-ratios [3, -1], rejected [0, 1] -> sorted differences [-1 - 0, 3 - 1] = [-1, 2],
# beta = 1
HAND = {
    "logistic": (math.log1p(math.e) + math.log1p(math.exp(-2))) / 2,   # 0.7200948...
    "squared_hinge": (2.0 ** 2 + 0.0) / 2,
    "least_squares": (2.0 ** 2 + 1.0 ** 2) / 2,
    "hinge": (2.0 + 0.0) / 2,
}


@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
def test_hand_checked_value(surrogate):
    zeros = torch.zeros(2, dtype=torch.float64)
    pc, pr = (torch.tensor([3.0, -1.0], dtype=torch.float64),
              torch.tensor([0.0, 1.0], dtype=torch.float64))
    loss, _ = preference_loss(pc, pr, zeros, zeros, loss_type="aot_unpaired", beta=1.0,
                              surrogate=surrogate)
    assert loss.item() == pytest.approx(HAND[surrogate], rel=1e-12)
    assert HAND["logistic"] == pytest.approx(0.72009485, abs=1e-8)


def test_hand_checked_unequal_sizes():
    # u = [0, 2] (n=2), v = [0, 1, 3] (m=3). Cells of the merged grid {0,1/3,1/2,2/3,1}:
    # (0,1/3]: 0-0=0  (1/3,1/2]: 0-1=-1  (1/2,2/3]: 2-1=1  (2/3,1]: 2-3=-1
    u = torch.tensor([2.0, 0.0], dtype=torch.float64)
    v = torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64)
    # beta = 1: h(0), h(-1), h(1), h(-1) with weights 1/3, 1/6, 1/6, 1/3
    expected = {"least_squares": 1 / 3 + 4 / 6 + 0 + 4 / 3, "hinge": 1 / 3 + 2 / 6 + 0 + 2 / 3}
    for surrogate, beta in (("least_squares", 1.0), ("hinge", 1.0)):
        loss, _ = preference_loss(u, v, torch.zeros(2, dtype=torch.float64),
                                  torch.zeros(3, dtype=torch.float64), loss_type="aot_unpaired",
                                  beta=beta, surrogate=surrogate)
        assert loss.item() == pytest.approx(expected[surrogate], rel=1e-12)


# ---------------------------------------------------------------- identities
@pytest.mark.parametrize("loss_type", ["aot_paired", "aot_unpaired", "dpo"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_logistic_losses_are_ln2_at_policy_equals_reference(loss_type, label_smoothing):
    pc, pr, _, _ = _logps(16, seed=5)
    loss, metrics = preference_loss(pc, pr, pc.clone(), pr.clone(), loss_type=loss_type, beta=0.1,
                                    label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)


@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
def test_batch_of_one_is_dpo(surrogate):
    pc, pr, rc, rr = _logps(1, seed=11)
    dpo, _ = preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=0.5, surrogate=surrogate)
    for loss_type in ("aot_paired", "aot_unpaired"):
        aot, _ = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=0.5, surrogate=surrogate)
        assert aot.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_aot_differs_from_dpo_when_sorting_rematches():
    pc, pr, rc, rr = _logps(32, seed=2)
    dpo, _ = preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=1.0)
    for loss_type in ("aot_paired", "aot_unpaired"):
        aot, _ = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=1.0)
        assert abs(aot.item() - dpo.item()) > 1e-3


def test_permutation_invariance():
    pc, pr, rc, rr = _logps(20, 13, seed=4)
    g = torch.Generator().manual_seed(9)
    p, q = torch.randperm(20, generator=g), torch.randperm(13, generator=g)
    base, _ = preference_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=0.7)
    perm, _ = preference_loss(pc[p], pr[q], rc[p], rr[q], loss_type="aot_unpaired", beta=0.7)
    assert perm.item() == pytest.approx(base.item(), rel=1e-12)
    pc, pr, rc, rr = _logps(20, seed=4)
    q = torch.randperm(20, generator=g)
    base, _ = preference_loss(pc, pr, rc, rr, loss_type="aot_paired", beta=0.7)
    # Pairs permuted jointly, and the reference pairs independently of the policy pairs.
    perm, _ = preference_loss(pc[p], pr[p], rc[q], rr[q], loss_type="aot_paired", beta=0.7)
    assert perm.item() == pytest.approx(base.item(), rel=1e-12)


def test_gradient_is_the_sorted_matching_gradient():
    pc, pr, rc, rr = _logps(6, seed=8)
    pc.requires_grad_(True)
    loss, _ = preference_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=0.5)
    loss.backward()
    u, v = (pc - rc).detach(), (pr - rr).detach()
    v_sorted = torch.sort(v).values
    rank = torch.argsort(torch.argsort(u))
    expected = -0.5 * torch.sigmoid(-0.5 * (u - v_sorted[rank])) / 6
    torch.testing.assert_close(pc.grad, expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- surrogates
@pytest.mark.parametrize("surrogate", SURROGATE_NAMES)
def test_surrogate_gradcheck(surrogate):
    h = get_surrogate(surrogate)
    beta = 0.8
    # no kink at beta
    x = torch.tensor([-2.1, -0.3, 0.45, 1.3, 2.7], dtype=torch.float64, requires_grad=True)
    ls = 0.15 if surrogate == "logistic" else 0.0
    assert torch.autograd.gradcheck(lambda t: h(t, beta, ls), (x,))
    if surrogate != "hinge":
        assert torch.autograd.gradgradcheck(lambda t: h(t, beta, ls), (x,))


@pytest.mark.parametrize("loss_type", sorted(LOSS_SPECS))
@pytest.mark.parametrize("surrogate", ["logistic", "squared_hinge"])
def test_whole_loss_gradcheck(loss_type, surrogate):
    spec = LOSS_SPECS[loss_type]
    if not spec.uses_surrogate and surrogate != "logistic":
        pytest.skip(f"{loss_type} has no surrogate")
    pc, pr, rc, rr = _logps(5, 5 if spec.paired else 3, seed=21)

    def fn(a, b):
        return preference_loss(a, b, rc, rr, loss_type=loss_type, beta=0.4,
                               surrogate=surrogate)[0]

    assert torch.autograd.gradcheck(fn, (pc.requires_grad_(), pr.requires_grad_()))


def test_low_precision_inputs_are_upcast():
    pc, pr, rc, rr = (t.to(torch.bfloat16) for t in _logps(8, seed=1))
    loss, metrics = preference_loss(pc, pr, rc, rr, loss_type="aot_paired", beta=0.1)
    assert loss.dtype == torch.float32
    ref, _ = preference_loss(*(t.float() for t in (pc, pr, rc, rr)), loss_type="aot_paired",
                             beta=0.1)
    assert loss.item() == ref.item()
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in metrics.values())

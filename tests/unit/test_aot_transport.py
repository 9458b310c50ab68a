"""Exact unequal-size OT on the merged quantile grid against independent integrations."""

import math
import random
from fractions import Fraction

import pytest
import torch

from nemo_aot.losses import dominance_violation, preference_loss, quantile_cells, transport_cost
from nemo_aot.losses.metrics import QUANTILE_LEVELS
from nemo_aot.losses.transport import empirical_quantiles


def _quantile(sorted_xs, t):
    """Left-continuous empirical quantile x_(ceil(t n)), t a Fraction in (0, 1]."""
    return sorted_xs[math.ceil(t * len(sorted_xs)) - 1]


def _integral_by_cells(u, v, h):
    """Enumerate the breakpoints with exact fractions; evaluate h at each cell's midpoint."""
    us, vs = sorted(u), sorted(v)
    points = sorted({Fraction(k, len(us)) for k in range(len(us) + 1)}
                    | {Fraction(j, len(vs)) for j in range(len(vs) + 1)})
    total = 0.0
    for a, b in zip(points, points[1:]):
        mid = (a + b) / 2
        total += float(b - a) * h(_quantile(us, mid) - _quantile(vs, mid))
    return total


def _integral_by_riemann(u, v, h, steps=200_000):
    """Plain midpoint rule over t, blind to where the breakpoints are (approximate)."""
    us, vs = sorted(u), sorted(v)
    n, m = len(us), len(vs)
    total = 0.0
    for i in range(steps):
        t = (i + 0.5) / steps
        total += h(us[min(int(t * n), n - 1)] - vs[min(int(t * m), m - 1)])
    return total / steps


def _softplus_neg(beta):
    return lambda x: math.log1p(math.exp(-beta * x)) if beta * x > -30 else -beta * x


@pytest.mark.parametrize("n,m", [(1, 2), (2, 3), (3, 2), (5, 7), (4, 6), (12, 8), (1, 9), (16, 16)])
def test_unequal_sizes_match_exact_cell_enumeration(n, m):
    rnd = random.Random(n * 100 + m)
    u = [rnd.gauss(0, 2) for _ in range(n)]
    v = [rnd.gauss(0.5, 2) for _ in range(m)]
    beta = 0.6
    expected = _integral_by_cells(u, v, _softplus_neg(beta))
    loss, _ = preference_loss(torch.tensor(u, dtype=torch.float64),
                              torch.tensor(v, dtype=torch.float64),
                              torch.zeros(n, dtype=torch.float64),
                              torch.zeros(m, dtype=torch.float64), loss_type="aot_unpaired",
                              beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_unequal_sizes_match_blind_numerical_integration():
    rnd = random.Random(7)
    u = [rnd.gauss(0, 1) for _ in range(7)]
    v = [rnd.gauss(0, 1) for _ in range(11)]

    def h(x):
        return max(0.5 - x, 0.0) ** 2

    got = transport_cost(torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64),
                         lambda x: torch.relu(0.5 - x).square())
    assert got.item() == pytest.approx(_integral_by_riemann(u, v, h), abs=2e-4)


@pytest.mark.parametrize("n,m", [(3, 3), (2, 5), (6, 4), (7, 13), (1, 1), (1000, 999)])
def test_quantile_cells_structure(n, m):
    ui, vi, w = quantile_cells(n, m)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (w > 0).all()
    assert len(w) == n + m - math.gcd(n, m)       # distinct interior breakpoints + 1
    assert ui[0] == 0 and vi[0] == 0 and ui[-1] == n - 1 and vi[-1] == m - 1
    assert ((ui.diff() >= 0) & (vi.diff() >= 0)).all()
    # each order statistic owns exactly 1/n (1/m) of the unit interval
    torch.testing.assert_close(torch.zeros(n, dtype=torch.float64).index_add_(0, ui, w),
                               torch.full((n,), 1 / n, dtype=torch.float64))
    torch.testing.assert_close(torch.zeros(m, dtype=torch.float64).index_add_(0, vi, w),
                               torch.full((m,), 1 / m, dtype=torch.float64))


def test_equal_sizes_take_the_sorted_pairs_mean_exactly():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(50, generator=g), torch.randn(50, generator=g)

    def cost(x):
        return torch.nn.functional.softplus(-x)

    expected = cost(torch.sort(u).values - torch.sort(v).values).mean()
    assert transport_cost(u, v, cost).item() == expected.item()        # bitwise: TRL's formula
    ui, vi, w = quantile_cells(50, 50)
    via_cells = (w * cost(torch.sort(u).values[ui].double()
                          - torch.sort(v).values[vi].double())).sum()
    assert via_cells.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unequal_gradient_matches_finite_differences_of_the_exact_integral():
    rnd = random.Random(3)
    u = [rnd.gauss(0, 1) for _ in range(4)]
    v = [rnd.gauss(0, 1) for _ in range(6)]
    h = _softplus_neg(1.3)
    ut = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    transport_cost(ut, torch.tensor(v, dtype=torch.float64),
                   lambda x: torch.nn.functional.softplus(-1.3 * x)).backward()
    eps = 1e-6
    for i in range(4):
        up, dn = list(u), list(u)
        up[i] += eps
        dn[i] -= eps
        fd = (_integral_by_cells(up, v, h) - _integral_by_cells(dn, v, h)) / (2 * eps)
        assert ut.grad[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("n,m", [(5, 5), (4, 7), (9, 3)])
def test_dominance_violation_matches_cell_enumeration(n, m):
    rnd = random.Random(n + 10 * m)
    u = [rnd.gauss(0.3, 1) for _ in range(n)]
    v = [rnd.gauss(0, 1) for _ in range(m)]
    expected = _integral_by_cells(u, v, lambda d: 1.0 if d < 0 else 0.0)
    got = dominance_violation(torch.tensor(u, dtype=torch.float64),
                              torch.tensor(v, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_dominance_violation_extremes():
    low, high = torch.arange(5.0), torch.arange(5.0) + 10
    assert dominance_violation(high, low).item() == 0.0
    assert dominance_violation(low, high).item() == 1.0


def test_empirical_quantiles():
    x = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 9.0, 8.0, 7.0, 6.0])
    expected = [_quantile(sorted(x.tolist()), Fraction(t).limit_denominator(1000))
                for t in QUANTILE_LEVELS]
    assert empirical_quantiles(x, QUANTILE_LEVELS).tolist() == expected == [0.0, 4.0, 8.0]

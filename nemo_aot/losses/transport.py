"""Exact 1-D optimal transport between two empirical distributions, by sorting.

For samples ``u_1..u_n`` and ``v_1..v_m`` with empirical quantile functions
``Q_u(t) = u_(ceil(t n))`` and ``Q_v(t) = v_(ceil(t m))`` (order statistics, 1-based), and a convex
cost ``h``, the transport cost is

    W_h(u, v) = integral_0^1 h(Q_u(t) - Q_v(t)) dt.

Both quantile functions are step functions, constant on the cells of the merged grid of levels
``{k/n} U {l/m}``, so the integral is a finite weighted sum over at most ``n + m - 1`` cells:
cell ``c = (t_a, t_b]`` pairs ``u_(ceil(t_b n))`` with ``v_(ceil(t_b m))`` with weight
``t_b - t_a``. For ``n == m`` every cell has weight ``1/n`` and the cost is the sorted-pairs mean
``mean_i h(u_(i) - v_(i))``, computed as exactly that. Gradients flow through the sorted values
with the matching held fixed (``torch.sort``'s backward), which is the gradient of the OT cost
wherever the sort order is unique.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch


@functools.lru_cache(maxsize=64)
def _cells_cached(n: int, m: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Work in integer units of 1/(n m): level k/n is k*m, level l/m is l*n. No rounding anywhere.
    edges = torch.unique(torch.cat([
        torch.arange(n + 1, device=device, dtype=torch.int64) * m,
        torch.arange(m + 1, device=device, dtype=torch.int64) * n,
    ]))
    right = edges[1:]
    chosen_idx = (right + m - 1) // m - 1       # ceil(t_b n) - 1, 0-based
    rejected_idx = (right + n - 1) // n - 1     # ceil(t_b m) - 1, 0-based
    weight = (right - edges[:-1]).to(torch.float64) / (n * m)
    return chosen_idx, rejected_idx, weight


def quantile_cells(n: int, m: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells of the merged quantile grid for ``n`` and ``m`` samples.

    Returns ``(u_index, v_index, weight)``: 0-based order-statistic indices into the ascending
    sorted samples and the float64 width of each cell; the widths sum to 1. The result depends only
    on ``(n, m, device)`` and is cached; treat it as read-only.
    """
    if n < 1 or m < 1:
        raise ValueError(f"quantile_cells needs n >= 1 and m >= 1, got n={n}, m={m}")
    return _cells_cached(int(n), int(m), torch.device(device))


def sorted_transport_cost(
    u_sorted: torch.Tensor, v_sorted: torch.Tensor, cost: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``integral_0^1 cost(Q_u(t) - Q_v(t)) dt`` for ascending ``u_sorted`` and ``v_sorted``."""
    n, m = u_sorted.shape[0], v_sorted.shape[0]
    if n == m:
        return cost(u_sorted - v_sorted).mean()
    ui, vi, w = quantile_cells(n, m, u_sorted.device)
    return (w.to(u_sorted.dtype) * cost(u_sorted[ui] - v_sorted[vi])).sum()


def transport_cost(
    u: torch.Tensor, v: torch.Tensor, cost: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Sort ``u`` and ``v`` independently (stable, ascending) and return their transport cost."""
    u_sorted = torch.sort(u, stable=True).values
    v_sorted = torch.sort(v, stable=True).values
    return sorted_transport_cost(u_sorted, v_sorted, cost)


@torch.no_grad()
def dominance_violation(u: torch.Tensor, v: torch.Tensor, *,
                        presorted: bool = False) -> torch.Tensor:
    """Fraction of quantile levels ``t`` in (0, 1] where ``Q_u(t) < Q_v(t)``.

    Zero exactly when the empirical distribution of ``u`` first-order stochastically dominates
    that of ``v``; one when every quantile of ``u`` lies below the same quantile of ``v``.
    ``presorted=True`` skips the sorts for inputs already in ascending order.
    """
    u_sorted = u.detach() if presorted else torch.sort(u.detach()).values
    v_sorted = v.detach() if presorted else torch.sort(v.detach()).values
    return sorted_transport_cost(u_sorted, v_sorted, lambda d: (d < 0).to(u_sorted.dtype))


@torch.no_grad()
def empirical_quantiles(x: torch.Tensor, levels: tuple[float, ...], *,
                        presorted: bool = False) -> torch.Tensor:
    """``Q_x(t) = x_(ceil(t n))`` at each level (the same quantile function the loss integrates)."""
    x_sorted = x.detach() if presorted else torch.sort(x.detach()).values
    n = x_sorted.shape[0]
    # The tiny offset keeps float round-off (0.7 * 10 = 7.000000000000001) from moving a level up.
    # Indexing with Python ints takes views: no host-to-device copy of an index tensor.
    return torch.stack([x_sorted[min(max(math.ceil(t * n - 1e-9), 1), n) - 1] for t in levels])

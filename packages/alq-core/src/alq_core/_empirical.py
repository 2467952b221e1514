"""Level tables for an empirical distribution given as weighted sums between grid edges.

The objective of SPEC section 6 for a weighted point set ``{(v_i, w_i)}`` is
``Var(l) = sum_i w_i (l_{j+1} - v_i)(v_i - l_j)`` with ``l_j <= v_i <= l_{j+1}``. When every
level sits on a grid edge, the points between two levels are whole bins, so with per-bin
sums ``S0 = sum w``, ``S1 = sum w v``, ``S2 = sum w v^2`` the cost of the interval between
edges ``a < b`` is exact:

    C(a, b) = -S2 + (g_a + g_b) S1 - g_a g_b S0        (sums over the bins a .. b-1)

(a point on an edge contributes 0 on either side). As a function of one level between
fixed neighbours the objective is convex and piecewise linear between points, so a
minimizer always lies on a point: with the points themselves as edges the grid optimum is
the exact optimum. This module holds the two solvers on such a grid:

* :func:`dp_levels` -- dynamic programming over a subset of the edges, ``O(L K^2)`` for
  ``K`` candidate edges: the exact optimum among tables on those edges;
* :func:`descend_levels` -- exact coordinate descent over every edge (ALQ's update for a
  discrete distribution): each level moves to the best edge between its neighbours, so the
  objective never increases.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


class Prefix:
    """Edges and cumulative bin sums of a weighted empirical distribution.

    Parameters
    ----------
    edges : ndarray of float64, shape (M + 1,)
        Strictly increasing, ``edges[0] = -1``, ``edges[-1] = 1``.
    sums : ndarray of float64, shape (3, M)
        Per bin ``[edges[k], edges[k+1])``: ``sum w``, ``sum w v``, ``sum w v^2``.
    """

    def __init__(self, edges: F64, sums: F64) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        cum = np.zeros((3, self.edges.size), dtype=np.float64)
        np.cumsum(sums, axis=1, out=cum[:, 1:])
        self.cum = cum

    def cost(self, a: I64 | int, b: I64 | int) -> F64:
        """``C(a, b)`` for edge indices ``a <= b`` (broadcasting); clamped at 0 against round-off."""
        g = self.edges
        s0 = self.cum[0][b] - self.cum[0][a]
        s1 = self.cum[1][b] - self.cum[1][a]
        s2 = self.cum[2][b] - self.cum[2][a]
        ga, gb = g[a], g[b]
        out: F64 = np.maximum(-s2 + (ga + gb) * s1 - ga * gb * s0, 0.0)
        return out

    def variance(self, idx: I64) -> float:
        """Objective of the table whose levels sit on edges ``idx`` (increasing, ends included)."""
        return float(self.cost(idx[:-1], idx[1:]).sum())

    @property
    def energy(self) -> float:
        """``sum w v^2``: the squared norm the objective is normalized by."""
        return float(self.cum[2][-1])


def dp_levels(prefix: Prefix, num_levels: int, candidates: I64) -> I64:
    """The best table of ``num_levels`` levels on the candidate edges (ends fixed at ±1).

    Parameters
    ----------
    prefix : Prefix
    num_levels : int
        ``L >= 2``.
    candidates : ndarray of int64, shape (K,)
        Strictly increasing edge indices, holding ``0`` and ``M`` (the ±1 ends) and at least
        ``L - 2`` others.

    Returns
    -------
    ndarray of int64, shape (L,)
        Edge indices of the optimal table.
    """
    cand = np.asarray(candidates, dtype=np.int64)
    k = cand.size
    free = num_levels - 2
    if free == 0:
        return np.array([cand[0], cand[-1]], dtype=np.int64)
    cost = prefix.cost(cand[:, None], cand[None, :])
    cost[np.tril_indices(k)] = np.inf  # levels strictly increase
    best = cost[0].copy()  # best[b]: first free level on candidate b
    back = np.empty((free, k), dtype=np.int64)
    back[0] = 0
    for t in range(1, free):
        total = best[:, None] + cost
        back[t] = np.argmin(total, axis=0)
        best = total[back[t], np.arange(k)]
    last = best + cost[:, -1]
    last[-1] = np.inf
    pos = int(np.argmin(last))
    path = [k - 1, pos]
    for t in range(free - 1, 0, -1):
        pos = int(back[t, pos])
        path.append(pos)
    path.append(0)
    return cand[np.array(path[::-1], dtype=np.int64)]


def dp_lower_bound(prefix: Prefix, num_levels: int, candidates: I64) -> tuple[float, I64]:
    """A lower bound on the objective of *every* table, levels anywhere in ``[-1, 1]``.

    A level between candidate edges ``c_j < l < c_{j+1}`` is represented by the cell
    ``(c_j, c_{j+1})``; for consecutive levels ``l < u`` the points between them cost at
    least ``C(hi(l), lo(u))``, with ``hi`` / ``lo`` the nearest candidates above ``l`` and
    below ``u`` (``u - v >= lo(u) - v`` and ``v - l >= v - hi(l)``). The minimum of these
    bounds over all placements is a dynamic program over the ``2K - 1`` positions.

    Returns
    -------
    bound : float
    edges : ndarray of int64, shape (L - 2,)
        The edge just below each free level of the minimizing placement (where refining the
        candidates tightens the bound).
    """
    cand = np.asarray(candidates, dtype=np.int64)
    k = cand.size
    free = num_levels - 2
    # positions 0 .. 2K-2: even 2j = on candidate j, odd 2j+1 = inside cell (j, j+1)
    pos = np.arange(2 * k - 1)
    lo = cand[pos // 2]
    hi = cand[(pos + 1) // 2]
    cost = prefix.cost(hi[:, None], np.maximum(lo[None, :], hi[:, None]))
    cost[np.tril_indices(pos.size, -1)] = np.inf
    if free == 0:
        return float(cost[0, -1]), np.zeros(0, dtype=np.int64)
    best = cost[0].copy()
    back = np.zeros((free, pos.size), dtype=np.int64)
    for t in range(1, free):
        total = best[:, None] + cost
        back[t] = np.argmin(total, axis=0)
        best = total[back[t], np.arange(pos.size)]
    last = best + cost[:, -1]
    at = int(np.argmin(last))
    value = float(last[at])
    path = [at]
    for t in range(free - 1, 0, -1):
        at = int(back[t, at])
        path.append(at)
    return value, lo[np.array(path[::-1], dtype=np.int64)]


def descend_levels(prefix: Prefix, idx: I64, *, max_sweeps: int = 100) -> I64:
    """Exact coordinate descent over all edges until no level moves (or ``max_sweeps``).

    Parameters
    ----------
    prefix : Prefix
    idx : ndarray of int64, shape (L,)
        Starting table as strictly increasing edge indices, ends ``0`` and ``M``.

    Returns
    -------
    ndarray of int64, shape (L,)
        A table whose every free level is the best edge between its neighbours; its
        objective is at most the start's.
    """
    out = np.array(idx, dtype=np.int64)
    for _ in range(max_sweeps):
        moved = False
        for i in range(1, out.size - 1):
            a, b = int(out[i - 1]), int(out[i + 1])
            if b - a < 2:
                continue
            ks = np.arange(a + 1, b, dtype=np.int64)
            h = prefix.cost(a, ks) + prefix.cost(ks, b)
            cur = out[i] - (a + 1)
            j = int(np.argmin(h))
            if h[j] < h[cur]:
                out[i] = ks[j]
                moved = True
        if not moved:
            break
    return out

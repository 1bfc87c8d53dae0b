"""Exact hard assignments of a stack of ``k x k`` costs, with as little host work as possible.

One training step solves the linear assignment of every permutation group (LLaMA-2-7B, G = 4,
synchronised sites: 512 groups of 1024 or 2752 channels); on a GPU that was 93 % of the step
(issue 17), most of it moving every cost to the host in float64 and scanning it there. Here:

1. **The certificate on the cost's device.** Each channel's cheapest position (a row
   ``argmin``, float32, exact). When the channels of a group all pick different positions,
   that matching reaches the lower bound ``Σ_i min_j C_ij`` and is optimal: no solver runs and
   only ``(G, k)`` indices leave the device.
2. **The other groups on host threads**, each moved alone (in its own dtype, widened to
   float64 on the host) and reduced (each row, then each column, less its minimum: the same
   optimum) before scipy's solver, whose shortest paths then end sooner: 1.6x faster over the
   steps of a training run at 7B width (bench/results/assignment.md).

Every group gets an optimal assignment, so its permutation is scipy's on the raw costs whenever
the optimum is unique (float costs with noise: in practice always; tests/test_assignment.py).
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["cheapest_positions", "reduce_costs", "lsa_rows", "solve_assignments"]

#: Float32 bytes per chunk of the device-side argmin (bounds its transient on a GPU).
_CHUNK_BYTES = 512 * 2**20


def cheapest_positions(cost: torch.Tensor) -> np.ndarray:
    """``(G, k)`` on the host: each channel's (row's) cheapest position (column) in each group,
    found where ``cost`` lives (numpy on the host: torch's threaded kernels are slower there)."""
    cost = cost.detach()
    if cost.device.type == "cpu":
        return cost.numpy().argmin(axis=2)
    g, k, _ = cost.shape
    per = max(1, _CHUNK_BYTES // (cost.element_size() * k * k))
    with torch.no_grad():
        return torch.cat([cost[a : a + per].argmin(dim=2).cpu() for a in range(0, g, per)]).numpy()


def reduce_costs(c: np.ndarray) -> np.ndarray:
    """``c`` less its row minima, then less its column minima, in place (same optimum; every
    row and column then holds a zero)."""
    c -= c.min(axis=1, keepdims=True)
    c -= c.min(axis=0, keepdims=True)
    return c


def lsa_rows(c: np.ndarray) -> np.ndarray:
    """scipy's optimal assignment of one ``(k, k)`` cost as ``row4col``: the row at each column."""
    rows, cols = linear_sum_assignment(c)
    out = np.empty(c.shape[0], dtype=np.int64)
    out[cols] = rows
    return out


def _solve_one(cost: torch.Tensor) -> np.ndarray:
    """One group, copied off its device by the worker thread that solves it (the copies overlap
    the other threads' solving)."""
    c = cost.detach().cpu()
    c = c.numpy() if c.dtype in (torch.float32, torch.float64) else c.double().numpy()
    return lsa_rows(reduce_costs(c.astype(np.float64)))


def solve_assignments(cost: torch.Tensor, pool: Executor | None = None, stats: dict | None = None) -> torch.Tensor:
    """Optimal assignment of every group of ``cost`` ``(G, k, k)`` (any device): local indices
    ``(G, k)`` on the host, ``result[g, j]`` = the row (original channel) placed at column
    (position) ``j``, minimising ``Σ_j C[result[g, j], j]``. ``pool``: host threads for the
    groups that need the solver; ``stats``: ``direct`` and ``solved`` group counts added in."""
    g, k, _ = cost.shape
    best = cheapest_positions(cost)  # (G, k)
    distinct = (np.diff(np.sort(best, axis=1), axis=1) != 0).all(axis=1)  # (G,)
    out = np.empty((g, k), dtype=np.int64)
    direct = np.flatnonzero(distinct)
    out[direct[:, None], best[direct]] = np.arange(k)  # each position takes the channel that chose it
    todo = np.flatnonzero(~distinct).tolist()
    groups = [cost[gi] for gi in todo]  # views: each leaves the device in its own thread
    solved = pool.map(_solve_one, groups) if pool is not None and len(todo) > 1 else map(_solve_one, groups)
    for gi, rows in zip(todo, solved):
        out[gi] = rows
    if stats is not None:
        stats["direct"] = stats.get("direct", 0) + int(direct.size)
        stats["solved"] = stats.get("solved", 0) + len(todo)
    return torch.from_numpy(out)

"""Exact hard assignments: every result a permutation, optimal, scipy's when the optimum is unique."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from permsparse.core.assignment import cheapest_positions, reduce_costs, solve_assignments
from permsparse.core.sinkhorn import hard_assignment, solver_threads


def _total(c: np.ndarray, rows: np.ndarray) -> float:
    """Σ_j c[rows[j], j]."""
    return float(c[rows, np.arange(c.shape[0])].sum())


def _scipy(c: np.ndarray) -> np.ndarray:
    r, col = linear_sum_assignment(c)
    out = np.empty_like(r)
    out[col] = r
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    groups=st.integers(1, 4),
    k=st.integers(1, 24),
    levels=st.sampled_from([2, 5, 0]),  # a few integer levels (many ties) or continuous costs
    seed=st.integers(0, 2**31 - 1),
    planted=st.booleans(),
)
def test_every_result_is_an_optimal_permutation(groups, k, levels, seed, planted):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randint(0, levels, (groups, k, k), generator=gen).float() if levels else torch.randn(groups, k, k, generator=gen)
    if planted:  # a clear optimum near a permutation: the direct route takes some groups
        c[:, torch.randperm(k, generator=gen), torch.arange(k)] -= 3.0
    stats: dict = {}
    got = solve_assignments(c, stats=stats).numpy()
    assert got.shape == (groups, k) and stats["direct"] + stats["solved"] == groups
    for g in range(groups):
        assert sorted(got[g].tolist()) == list(range(k))  # a permutation
        arr = c[g].double().numpy()
        assert _total(arr, got[g]) == pytest.approx(_total(arr, _scipy(arr)), abs=1e-9)  # optimal
        if not levels:  # continuous costs: the optimum is unique, so it is scipy's
            assert (got[g] == _scipy(arr)).all()


def test_direct_route_certifies_distinct_row_minima_without_solving():
    c = torch.rand(3, 6, 6) + 1.0
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    c[:, torch.arange(6), perm] = 0.0  # channel i cheapest at position perm[i], all distinct
    c[2, 0, 0] = -1.0  # ... except group 2, where channels 0 and 1 both want position 0
    c[2, 1, 0] = -1.0
    stats: dict = {}
    got = solve_assignments(c, stats=stats)
    assert stats == {"direct": 2, "solved": 1}
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(6)
    assert torch.equal(got[0], inv) and torch.equal(got[1], inv)
    assert sorted(got[2].tolist()) == list(range(6))
    assert cheapest_positions(c)[0].tolist() == perm.tolist()


def test_reduction_keeps_the_optimum_and_leaves_zeros():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(30, 30))
    r = reduce_costs(c.copy())
    assert (r >= 0).all() and (r.min(axis=0) == 0).all()
    assert (_scipy(r) == _scipy(c)).all()


def test_float64_costs_stay_float64():
    """Costs that differ only below float32's resolution must still be told apart."""
    c = torch.zeros(1, 2, 2, dtype=torch.float64)
    c[0, 0, 1] = c[0, 1, 0] = -1e-12  # the swap is better, by less than a float32 ulp of 1
    c += 1.0
    assert hard_assignment(c)[0].tolist() == [1, 0]


def test_threads_give_the_same_result_and_bad_input_is_refused():
    c = torch.randn(8, 20, 20, generator=torch.Generator().manual_seed(1))
    with solver_threads(1):
        one = hard_assignment(c)
    with ThreadPoolExecutor(3) as pool:
        assert torch.equal(solve_assignments(c, pool), one)
    with solver_threads(3):
        assert torch.equal(hard_assignment(c), one)
    bad = c.clone()
    bad[3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        hard_assignment(bad)
    with pytest.raises(ValueError, match="must be"):
        hard_assignment(torch.zeros(2, 3, 4))


def test_training_run_costs_match_scipy():
    """Costs shaped like a training run's (a warm permutation with a margin, noise, and steps of
    drift): the library's assignments are scipy's on the raw costs."""
    gen = torch.Generator().manual_seed(0)
    k = 96
    c = 0.01 * torch.randn(4, k, k, generator=gen)
    c[:, torch.arange(k), torch.randperm(k, generator=gen)] -= 0.1
    for _ in range(4):
        c += 0.02 * torch.randn(4, k, k, generator=gen)
        got = hard_assignment(c).numpy()
        for g in range(4):
            assert (got[g] == _scipy(c[g].double().numpy())).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_costs_give_the_host_result():
    c = torch.randn(6, 64, 64, generator=torch.Generator().manual_seed(2))
    c[:3, torch.arange(64), torch.randperm(64)] -= 5.0
    stats: dict = {}
    assert torch.equal(solve_assignments(c.cuda(), stats=stats), solve_assignments(c))
    assert stats["direct"] >= 3

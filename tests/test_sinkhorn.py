"""Log-domain Sinkhorn, hard assignment, permutation entropy, temperature schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.core.permutation import Permutation
from permsparse.core.sinkhorn import (
    TemperatureSchedule,
    hard_assignment,
    log_sinkhorn,
    permutation_entropy,
    sinkhorn,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_marginal_error(p: torch.Tensor) -> float:
    return max(float((p.sum(-1) - 1).abs().max()), float((p.sum(-2) - 1).abs().max()))


def _assignment_cost(cost: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Total cost per group of placing row ``local[g, j]`` at column ``j``: ``(G,)``."""
    g, k, _ = cost.shape
    return cost.gather(1, local.unsqueeze(1)).reshape(g, k).sum(-1)


def _brute_force_min(cost_g: torch.Tensor) -> float:
    k = cost_g.shape[0]
    cols = torch.arange(k)
    return min(float(cost_g[list(sigma), cols].sum()) for sigma in itertools.permutations(range(k)))


# -- Sinkhorn ----------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [10.0, 1.0, 0.1, 0.01])
def test_doubly_stochastic_small_costs(tau):
    """Costs of the scale the learnable cost starts at (noise ~ 0.01): converges at every τ."""
    cost = 0.02 * torch.randn(4, 16, 16, generator=_gen(0))
    p = sinkhorn(cost, tau, n_iters=200)
    assert p.shape == cost.shape
    assert bool((p >= 0).all())
    assert _max_marginal_error(p) < 1e-4


@pytest.mark.parametrize(("tau", "n_iters"), [(10.0, 20), (1.0, 100), (0.1, 3000)])
def test_doubly_stochastic_unit_costs(tau, n_iters):
    """Unit-scale costs: Sinkhorn converges, but needs many more iterations as τ falls."""
    cost = torch.randn(3, 8, 8, generator=_gen(1), dtype=torch.float64)
    p = sinkhorn(cost, tau, n_iters=n_iters)
    assert _max_marginal_error(p) < 1e-4


def test_last_step_normalises_columns():
    cost = torch.randn(2, 8, 8, generator=_gen(2))
    p = sinkhorn(cost, 0.01, n_iters=3)  # far from converged at this τ
    torch.testing.assert_close(p.sum(-2), torch.ones(2, 8), rtol=0, atol=1e-5)


def test_more_iterations_approach_doubly_stochastic_at_small_tau():
    cost = torch.rand(3, 8, 8, generator=_gen(3), dtype=torch.float64)
    errs = [_max_marginal_error(sinkhorn(cost, 0.01, n)) for n in (20, 200, 2000)]
    assert errs[0] > errs[1] > errs[2]


def test_extreme_costs_stay_finite_with_finite_gradients():
    cost = (torch.rand(4, 16, 16, generator=_gen(4)) * 2 - 1) * 1e4  # up to ±1e4
    cost[0, 0, 0] = 1e4
    cost[1, 3, 5] = -1e4
    cost.requires_grad_(True)
    tau = 1e-3  # |log alpha| up to 1e7
    log_p = log_sinkhorn(-cost / tau, n_iters=20)
    p = log_p.exp()
    assert bool(torch.isfinite(log_p).all()) and bool(torch.isfinite(p).all())
    assert bool((p >= 0).all()) and bool((p <= 1 + 1e-6).all())
    torch.testing.assert_close(p.sum(-2), torch.ones(4, 16), rtol=0, atol=1e-4)
    (p * torch.randn(p.shape, generator=_gen(5))).sum().backward()
    assert cost.grad is not None and bool(torch.isfinite(cost.grad).all())
    # the same through sinkhorn() and through a loss on log P
    c2 = cost.detach().clone().requires_grad_(True)
    sinkhorn(c2, tau).sum().backward()
    assert bool(torch.isfinite(c2.grad).all())


def test_uniform_cost_gives_uniform_p():
    p = sinkhorn(torch.zeros(2, 5, 5), 0.7)
    torch.testing.assert_close(p, torch.full((2, 5, 5), 0.2))


# -- hard assignment ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_hard_assignment_matches_brute_force(k):
    g = _gen(10 + k)
    for trial in range(4):
        if trial % 2:
            cost = torch.randint(0, 3, (3, k, k), generator=g).float()  # many ties
        else:
            cost = torch.randn(3, k, k, generator=g)
        local = hard_assignment(cost)
        assert local.shape == (3, k) and local.dtype == torch.long
        for gi in range(3):
            assert sorted(local[gi].tolist()) == list(range(k))
        got = _assignment_cost(cost, local)
        for gi in range(3):
            assert float(got[gi]) == pytest.approx(_brute_force_min(cost[gi]), abs=1e-5)


def test_hard_assignment_unique_optimum_and_conventions():
    perm = Permutation.random(18, 3, _gen(20))
    p_true = perm.to_matrices()  # P[i, j] = 1: column j is original i
    cost = 0.1 * torch.rand(3, 6, 6, generator=_gen(21)) - p_true  # unique optimum on p_true
    local = hard_assignment(cost)
    assert torch.equal(local, perm.local)
    assert Permutation.from_local(local) == perm
    w = torch.randn(4, 18)
    assert torch.equal(w[:, Permutation.from_local(local).indices], w @ torch.block_diag(*p_true))
    # a 2-D cost is one group
    assert torch.equal(hard_assignment(cost[1]), perm.local[1:2])


def test_hard_assignment_solver_path():
    """Costs whose per-column minima collide, so the linear assignment solver must run."""
    cost = torch.tensor([[[0.0, 0.0, 5.0], [1.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    local = hard_assignment(cost)
    # columns 0 and 1 both prefer row 0; the optimum puts row 1 at column 2: 0 + 9 + 0 = 9
    assert float(_assignment_cost(cost, local)[0]) == pytest.approx(9.0) == _brute_force_min(cost[0])
    assert int(local[0, 2]) == 1


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.sampled_from([10.0, 1.0, 0.1, 0.01]), st.integers(1, 30))
def test_assignment_of_log_p_equals_assignment_of_cost(seed, tau, n_iters):
    """Sinkhorn adds only row and column constants to log P: same assignment for any τ, n."""
    cost = torch.rand(2, 6, 6, generator=_gen(seed), dtype=torch.float64)
    log_p = log_sinkhorn(-cost / tau, n_iters)
    local = hard_assignment(-log_p)
    torch.testing.assert_close(_assignment_cost(cost, local), _assignment_cost(cost, hard_assignment(cost)))


def test_soft_argmax_agrees_with_hard_assignment_at_small_tau():
    for seed in range(20):
        cost = torch.rand(4, 6, 6, generator=_gen(100 + seed), dtype=torch.float64)
        p = sinkhorn(cost, 1e-3, n_iters=1000)
        expect = hard_assignment(cost)
        assert torch.equal(p.argmax(dim=-2), expect)
        assert torch.equal(hard_assignment(-p), expect)


# -- entropy -----------------------------------------------------------------------------


def test_permutation_entropy():
    k = 8
    uniform = torch.full((3, k, k), 1.0 / k)
    assert float(permutation_entropy(uniform)) == pytest.approx(1.0, abs=1e-6)
    hard = Permutation.random(3 * k, 3, _gen(0)).to_matrices()
    assert float(permutation_entropy(hard)) == pytest.approx(0.0, abs=1e-6)
    mid = sinkhorn(torch.randn(3, k, k, generator=_gen(1)), 0.3)
    assert 0.0 < float(permutation_entropy(mid)) < 1.0
    assert float(permutation_entropy(torch.ones(2, 1, 1))) == 0.0
    # entropy falls as the temperature falls
    cost = torch.randn(3, k, k, generator=_gen(2))
    ents = [float(permutation_entropy(sinkhorn(cost, t, 50))) for t in (10.0, 1.0, 0.1)]
    assert ents[0] > ents[1] > ents[2]


# -- schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exponential", "linear", "cosine"])
@pytest.mark.parametrize(("start", "end"), [(1.0, 0.01), (5.0, 0.5), (0.1, 1.0)])
def test_schedule_endpoints_and_monotonic(kind, start, end):
    steps = 50
    s = TemperatureSchedule(start, end, steps, kind)
    assert s(0) == pytest.approx(start, rel=1e-12)
    assert s(steps - 1) == pytest.approx(end, rel=1e-9)
    values = [s(i) for i in range(steps)]
    diffs = [b - a for a, b in zip(values, values[1:])]
    if start > end:
        assert all(d <= 1e-12 for d in diffs)
    else:
        assert all(d >= -1e-12 for d in diffs)
    assert all(min(start, end) - 1e-12 <= v <= max(start, end) + 1e-12 for v in values)
    # clamped outside [0, steps - 1]
    assert s(-5) == pytest.approx(start) and s(steps + 10) == pytest.approx(end)


def test_schedule_shapes():
    exp = TemperatureSchedule(1.0, 0.01, 101, "exponential")
    assert exp(50) == pytest.approx(0.1)  # geometric midpoint
    lin = TemperatureSchedule(1.0, 0.01, 101, "linear")
    assert lin(50) == pytest.approx(0.505)
    cos = TemperatureSchedule(1.0, 0.01, 101, "cosine")
    assert cos(50) == pytest.approx(0.505)
    assert cos(10) > lin(10)  # cosine stays hot longer at first
    const = TemperatureSchedule(0.5, 0.01, 10, "constant")
    assert all(const(i) == 0.5 for i in range(12))
    assert TemperatureSchedule(2.0, 0.01, 1)(0) == 2.0  # a single step stays at start
    assert TemperatureSchedule().kind == "exponential"


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan])
def test_sinkhorn_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match=r"tau must be > 0"):
        sinkhorn(torch.zeros(1, 3, 3), tau)


def test_rejects_non_square_and_bad_shapes():
    with pytest.raises(ValueError, match=r"square matrices, got shape \(2, 3, 4\)"):
        sinkhorn(torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        log_sinkhorn(torch.zeros(1, 3, 3), 0)
    with pytest.raises(ValueError, match=r"cost must be \(G, k, k\), got shape \(2, 3, 4\)"):
        hard_assignment(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"cost must be \(G, k, k\)"):
        hard_assignment(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"cost must be \(G, k, k\)"):
        hard_assignment(torch.zeros(5))
    bad = torch.zeros(1, 3, 3)
    bad[0, 1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        hard_assignment(bad)


def test_schedule_rejects_bad_args():
    with pytest.raises(ValueError, match=r"temperatures must be > 0, got start=0"):
        TemperatureSchedule(0.0, 0.01)
    with pytest.raises(ValueError, match=r"end=-0.1"):
        TemperatureSchedule(1.0, -0.1)
    with pytest.raises(ValueError, match="unknown temperature schedule 'step'"):
        TemperatureSchedule(1.0, 0.01, 10, "step")


def test_solver_threads_sets_the_host_threads_and_not_the_result():
    import permsparse.core.sinkhorn as sk

    # Columns' cheapest rows collide in every group, so every group goes to the solver.
    cost = torch.randn(6, 12, 12, generator=_gen(40))
    cost[:, 0, :] -= 10.0
    want = hard_assignment(cost)
    with sk.solver_threads(1):
        assert sk._THREADS == 1
        assert torch.equal(hard_assignment(cost), want)
        with sk.solver_threads(3):
            assert torch.equal(hard_assignment(cost), want)
            assert sk._POOL[1] == 3  # the pool of the requested size solved them
        assert sk._THREADS == 1
    assert sk._THREADS is None
    with pytest.raises(ValueError, match="threads"):
        with sk.solver_threads(0):
            pass

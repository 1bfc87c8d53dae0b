"""The learnable permuter: straight-through matrices, permuted pruning, inits, layer-level learning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import permsparse.core.permuter as permuter_mod
from permsparse.core.heuristics import zigzag_permutation
from permsparse.core.metrics import efficacy, retained
from permsparse.core.pattern import count_violations, nm_mask
from permsparse.core.permutation import Permutation
from permsparse.core.permuter import INITS, permute_columns, permuted_prune, unpermute_columns
from permsparse.experimental.layer_learner import LearnablePermuter, fit_to_score
from permsparse.core.sinkhorn import permutation_entropy


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """Small tensors: threads only add overhead, and on a shared 2-core machine intra-op
    threads can stall each other badly (seen: 10x slower). Restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- straight-through ----------------------------------------------------------------------


@pytest.mark.parametrize("init", ["noise", "identity"])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_straight_through_value_is_exactly_hard(init, tau):
    pm = LearnablePermuter(24, groups=3, init=init, generator=_gen(0))
    with torch.no_grad():
        pm.cost.add_(torch.randn(pm.cost.shape, generator=_gen(1)))  # a non-trivial assignment
    p_st, hard, ent = pm(tau)
    assert p_st.shape == (3, 8, 8)
    assert torch.equal(p_st.detach(), hard.to_matrices())
    assert hard == pm.hard()
    assert 0.0 <= float(ent) <= 1.0
    # gradient reaches the cost, finite and non-zero
    target = torch.randn(p_st.shape, generator=_gen(2))
    (p_st * target).sum().backward()
    grad = pm.cost.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_straight_through_gradient_is_the_soft_gradient():
    pm = LearnablePermuter(12, groups=2, init="noise", generator=_gen(3))
    target = torch.randn(2, 6, 6, generator=_gen(4))
    p_st, _, _ = pm(0.5)
    (p_st * target).sum().backward()
    g_st = pm.cost.grad.clone()
    pm.cost.grad = None
    (pm.soft(0.5) * target).sum().backward()
    torch.testing.assert_close(g_st, pm.cost.grad)


def test_hard_is_the_assignment_of_the_soft_matrices_at_low_tau():
    pm = LearnablePermuter(16, groups=2, init="noise", noise=1.0, generator=_gen(5))
    soft = pm.soft(1e-3, n_iters=1000).detach()
    assert Permutation.from_matrices(soft) == pm.hard()


# -- permuted pruning --------------------------------------------------------------------


def test_permute_columns_matches_indexing():
    perm = Permutation.random(24, 3, _gen(6))
    p = perm.to_matrices()
    w = torch.randn(5, 24, generator=_gen(7))
    assert torch.equal(permute_columns(w, p), w[:, perm.indices])
    assert torch.equal(unpermute_columns(permute_columns(w, p), p), w)
    assert torch.equal(unpermute_columns(w, p), perm.inverse().apply_to_columns(w))


@pytest.mark.parametrize(("groups", "pattern"), [(1, "2:4"), (4, "2:4"), (2, "4:8"), (4, "1:4")])
def test_permuted_prune_with_hard_p_is_exact(groups, pattern):
    d_in = 64
    perm = Permutation.random(d_in, groups, _gen(groups))
    p = perm.to_matrices()
    w = torch.randn(12, d_in, generator=_gen(8))
    s = w.abs() * torch.rand(d_in, generator=_gen(9))  # a Wanda-like score, not |W| itself
    (w_eff,) = permuted_prune([w], [s], p, pattern)
    m = nm_mask(perm.apply_to_columns(s), pattern)  # mask in permuted coordinates
    expect = w * perm.inverse().apply_to_columns(m)  # W ⊙ M[:, π⁻¹]
    assert torch.equal(w_eff, expect)
    assert count_violations(perm.apply_to_columns(w_eff), pattern) == 0  # deployable layout
    # the same function as the deployed layer on permuted inputs
    x = torch.randn(3, d_in, generator=_gen(10))
    y_dep = perm.apply_to_activations(x) @ (perm.apply_to_columns(w) * m).T
    torch.testing.assert_close(x @ w_eff.T, y_dep)


def test_permuted_prune_several_weights_share_p():
    perm = Permutation.random(32, 4, _gen(11))
    p = perm.to_matrices()
    ws = [torch.randn(d_out, 32, generator=_gen(12 + d_out)) for d_out in (8, 16, 5)]
    ss = [w.abs() for w in ws]
    outs = permuted_prune(ws, ss, p, "2:4")
    assert len(outs) == 3
    for w, s, out in zip(ws, ss, outs):
        assert out.shape == w.shape
        assert torch.equal(out, w * perm.inverse().apply_to_columns(nm_mask(perm.apply_to_columns(s), "2:4")))
        assert count_violations(perm.apply_to_columns(out), "2:4") == 0


def test_permuted_prune_gradient_reaches_cost():
    pm = LearnablePermuter(32, groups=4, init="noise", generator=_gen(13))
    ws = [torch.randn(8, 32, generator=_gen(14)), torch.randn(6, 32, generator=_gen(15))]
    x = torch.randn(10, 32, generator=_gen(16))
    for use_st in (True, False):
        pm.cost.grad = None
        p = pm(0.5)[0] if use_st else pm.soft(0.5)
        outs = permuted_prune(ws, [w.abs() for w in ws], p, "2:4")
        loss = sum(((x @ o.T - x @ w.T) ** 2).mean() for o, w in zip(outs, ws))
        loss.backward()
        assert bool(torch.isfinite(pm.cost.grad).all()) and float(pm.cost.grad.abs().sum()) > 0
        assert all(not w.requires_grad for w in ws)


def test_permuted_prune_bad_args():
    p = Permutation.identity(8).to_matrices()
    w = torch.randn(2, 8)
    with pytest.raises(ValueError, match="2 weights but 1 scores"):
        permuted_prune([w, w], [w.abs()], p, "2:4")
    with pytest.raises(ValueError, match=r"weight \(2, 8\) and score \(3, 8\) differ in shape"):
        permuted_prune([w], [torch.rand(3, 8)], p, "2:4")
    with pytest.raises(ValueError, match="invalid N:M pattern"):
        permuted_prune([w], [w.abs()], p, "4:2")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(d_out=st.integers(1, 12), groups=st.sampled_from([1, 2, 4]), blocks=st.integers(1, 3),
       pattern=st.sampled_from(["2:4", "1:4", "4:8"]), seed=st.integers(0, 10_000))
def test_hard_permuted_prune_value_and_gradient_law(d_out, groups, blocks, pattern, seed):
    # Any shape: W_eff = (W P ⊙ M) Pᵀ and the cost gradient of the dense straight-through form.
    m = int(pattern.split(":")[1])
    d_in = groups * blocks * m
    pm = LearnablePermuter(d_in, groups=groups, init="noise", generator=_gen(seed))
    w = torch.randn(d_out, d_in, generator=_gen(seed + 1), dtype=torch.float64)
    s = w.abs() * torch.rand(d_in, generator=_gen(seed + 2), dtype=torch.float64)
    target = torch.randn(d_out, d_in, generator=_gen(seed + 3), dtype=torch.float64)
    pm.double()
    p_st, hard, _ = pm(0.5)
    (dense,) = permuted_prune([w], [s], p_st, pattern)
    g_dense = torch.autograd.grad((dense * target).sum(), pm.cost)[0]
    p_st, hard, _ = pm(0.5)
    fast = permuter_mod.hard_permuted_prune(w, s, hard, p_st, pattern)
    g_fast = torch.autograd.grad((fast * target).sum(), pm.cost)[0]
    assert torch.equal(fast.detach(), dense.detach())
    assert torch.equal(fast.detach() != 0, permuter_mod.unpermuted_mask(s, hard, pattern) & (w != 0))
    torch.testing.assert_close(g_fast, g_dense, rtol=1e-9, atol=1e-9)


def test_hard_permuted_prune_matches_dense_straight_through():
    pm = LearnablePermuter(32, groups=4, init="noise", generator=_gen(17))
    w = torch.randn(8, 32, generator=_gen(18))
    s = w.abs() * torch.rand(32, generator=_gen(19))
    target = torch.randn(8, 32, generator=_gen(20))
    p_st, hard, _ = pm(0.3)
    (dense,) = permuted_prune([w], [s], p_st, "2:4")
    (dense * target).sum().backward()
    g_dense = pm.cost.grad.clone()
    pm.cost.grad = None
    p_st, hard, _ = pm(0.3)
    fast = permuter_mod.hard_permuted_prune(w, s, hard, p_st, "2:4")
    (fast * target).sum().backward()
    assert torch.equal(fast.detach(), dense.detach())
    torch.testing.assert_close(pm.cost.grad, g_dense, rtol=1e-4, atol=1e-6)


# -- inits -------------------------------------------------------------------------------


def test_init_identity_and_warm_start():
    pm = LearnablePermuter(32, groups=4, init="identity", generator=_gen(21))
    assert pm.hard() == Permutation.identity(32, 4)
    assert pm.hard().groups == 4 and pm.group_size == 8
    warm = Permutation.random(32, 4, _gen(22))
    pm = LearnablePermuter(32, groups=4, init="permutation", warm_start=warm, generator=_gen(23))
    assert pm.hard() == warm
    p_st, hard, _ = pm(0.1)
    assert hard == warm and torch.equal(p_st.detach(), warm.to_matrices())
    # the soft matrices lean toward the warm start at low temperature
    assert Permutation.from_matrices(pm.soft(0.05).detach()) == warm


def test_init_noise_is_nearly_uniform_and_seeded():
    a = LearnablePermuter(64, groups=2, init="noise", generator=_gen(24))
    b = LearnablePermuter(64, groups=2, init="noise", generator=_gen(24))
    assert torch.equal(a.cost, b.cost)
    assert a.cost.shape == (2, 32, 32)
    assert float(a.cost.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert float(permutation_entropy(a.soft(1.0).detach())) > 0.999
    assert LearnablePermuter(64, groups=2, init="noise", noise=0.0).cost.abs().sum() == 0
    assert set(INITS) == {"noise", "identity", "permutation"}


def test_bad_init_args():
    with pytest.raises(ValueError, match="d_in=30 is not divisible by groups=4"):
        LearnablePermuter(30, groups=4)
    with pytest.raises(ValueError, match="d_in=32 is not divisible by groups=0"):
        LearnablePermuter(32, groups=0)
    with pytest.raises(ValueError, match="unknown init 'random'"):
        LearnablePermuter(32, groups=4, init="random")
    with pytest.raises(ValueError, match="init='permutation' needs warm_start"):
        LearnablePermuter(32, groups=4, init="permutation")
    with pytest.raises(ValueError, match="warm start has d_in=16, groups=4; expected d_in=32, groups=4"):
        LearnablePermuter(32, groups=4, init="permutation", warm_start=Permutation.identity(16, 4))
    with pytest.raises(ValueError, match="warm start has d_in=32, groups=1; expected d_in=32, groups=4"):
        LearnablePermuter(32, groups=4, init="permutation", warm_start=Permutation.identity(32, 1))


# -- layer-level learning (the required test) ------------------------------------


@pytest.fixture(scope="module")
def lognormal_layer():
    g = _gen(0)
    w = torch.randn(256, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    return w.abs()


def test_fit_to_score_from_noise_beats_identity(lognormal_layer, one_thread):
    score = lognormal_layer
    perm, history = fit_to_score(score, "2:4", groups=4, steps=120, init="noise", seed=0)
    assert perm.groups == 4 and perm.d_in == 256
    assert len(history) == 120 and all(0.0 < h < 1.0 for h in history)
    eff = efficacy(score, "2:4", perm)
    assert eff > 0.3, eff
    assert retained(score, "2:4", perm) > retained(score, "2:4")


def test_fit_to_score_warm_start_keeps_heuristic_gain(lognormal_layer, one_thread):
    score = lognormal_layer
    zz = zigzag_permutation(score, "2:4", groups=4)
    perm, history = fit_to_score(score, "2:4", groups=4, steps=100, init="permutation", warm_start=zz, seed=0)
    assert efficacy(score, "2:4", perm) >= efficacy(score, "2:4", zz)
    assert len(history) == 100


def test_fit_to_score_rejects_bad_width():
    with pytest.raises(ValueError, match=r"groups\*M = 4\*4"):
        fit_to_score(torch.rand(4, 24), "2:4", groups=4, steps=1)


# -- the one straight-through forward, the unpermuted mask ------------------------------------


@pytest.mark.parametrize("exact", [False, True])
def test_straight_through_is_hard_in_value_and_soft_in_gradient(exact):
    from permsparse.core.permuter import straight_through
    from permsparse.core.sinkhorn import hard_assignment, sinkhorn, sinkhorn_detached

    cost = torch.randn(3, 8, 8, generator=_gen(30), requires_grad=True)
    st = straight_through(cost, 0.5, 7, exact=exact)
    assert torch.equal(st.local, hard_assignment(cost))
    assert torch.equal(st.matrices.detach(), Permutation.from_local(st.local).to_matrices())
    assert st.entropy.shape == (3,) and bool(((st.entropy >= 0) & (st.entropy <= 1)).all())
    target = torch.randn(3, 8, 8, generator=_gen(31))
    (g_st,) = torch.autograd.grad((st.matrices * target).sum(), cost)
    soft = sinkhorn(cost, 0.5, 7) if exact else sinkhorn_detached(-cost / 0.5, 7)[0]
    (g_soft,) = torch.autograd.grad((soft * target).sum(), cost)
    torch.testing.assert_close(g_st, g_soft)
    with pytest.raises(ValueError, match="tau"):
        straight_through(cost, 0.0)


def test_unpermuted_mask_checks_unless_told_not_to():
    from permsparse.core.permuter import unpermuted_mask

    perm = Permutation.random(16, 2, _gen(32))
    s = torch.rand(4, 16, generator=_gen(33))
    m = unpermuted_mask(s, perm, "2:4")
    assert torch.equal(m, perm.inverse().apply_to_columns(nm_mask(perm.apply_to_columns(s), "2:4")))
    assert torch.equal(unpermuted_mask(s, perm, "2:4", validate=False), m)
    bad = s.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError):
        unpermuted_mask(bad, perm, "2:4")
    with pytest.raises(ValueError):
        unpermuted_mask(s, Permutation.identity(8), "2:4")
    unpermuted_mask(bad, perm, "2:4", validate=False)  # the trainer's form: a checked score, no check

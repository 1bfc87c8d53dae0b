"""Reconstruction after the mask: the kept weights refitted to the dense output, the mask untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from permsparse.api import prune
from permsparse.config import LearnConfig, PruneConfig
from permsparse.core.pattern import NMPattern, count_violations, nm_mask
from permsparse.core.permutation import Permutation
from permsparse.core.scores import ColumnStats, SparseGPT
from permsparse.models.calibrate import collect_stats
from permsparse.models.sites import get_module


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    # Channels driven by a few shared factors, as activations are: what a refit can exploit.
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g)
    return factors + 0.1 * torch.randn(n, d, generator=g)


def _stats(x: torch.Tensor) -> ColumnStats:
    st = ColumnStats(x.shape[1], hessian=True)
    st.add_batch(x)
    return st


@pytest.mark.parametrize("with_perm", [False, True])
def test_fixed_mask_keeps_the_mask_and_lowers_the_output_error(with_perm):
    torch.manual_seed(0)
    d_out, d_in = 24, 32
    pattern = NMPattern.parse("2:4")
    w = torch.randn(d_out, d_in)
    x = _correlated_inputs(512, d_in)
    perm = Permutation.random(d_in, 2, torch.Generator().manual_seed(1)) if with_perm else None
    score = w.abs() * x.pow(2).sum(0).sqrt()
    if perm is None:
        mask = nm_mask(score, pattern)
    else:
        mask = perm.inverse().apply_to_columns(nm_mask(perm.apply_to_columns(score), pattern))
    new, kept = SparseGPT(_stats(x).H).prune(w, pattern, perm, mask=mask)
    assert torch.equal(kept, mask)
    assert torch.all(new[~mask] == 0)  # nothing outside the mask comes back
    layout = perm.apply_to_columns(new) if perm is not None else new
    assert count_violations(layout, pattern) == 0  # N:M along the deployed (permuted) layout
    err_plain = ((w * mask - w) @ x.T).pow(2).sum()
    err_refit = ((new - w) @ x.T).pow(2).sum()
    assert err_refit < 0.8 * err_plain, (float(err_refit), float(err_plain))


def test_fixed_mask_of_the_wrong_shape_is_refused():
    x = _correlated_inputs(64, 16)
    with pytest.raises(ValueError, match="mask of shape"):
        SparseGPT(_stats(x).H).prune(torch.randn(8, 16), "2:4", mask=torch.ones(8, 12, dtype=torch.bool))


@pytest.mark.parametrize("score, refits, hessian", [("wanda", True, True), ("ria", True, True),
                                                    ("magnitude", False, False), ("sparsegpt", False, True)])
def test_reconstruct_is_the_default_where_a_score_leaves_weights_to_refit(score, refits, hessian):
    # SparseGPT refits by itself; magnitude prunes without data, so the default cannot need any.
    cfg = PruneConfig(score=score)
    assert cfg.reconstruct and (cfg.refits, cfg.needs_hessian) == (refits, hessian)
    assert not PruneConfig(score=score, reconstruct=False).refits


def test_reconstruct_prunes_to_the_same_masks_closer_to_each_dense_layer(tiny):
    """What the refit promises: the same plan and masks, and every layer's output error on the
    calibration inputs, ``tr((W' - W) H (W' - W)ᵀ)``, lower than with the plain mask."""
    t = tiny("llama")
    dense = copy.deepcopy(t.model)
    calib = t.batches(8)
    layers = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    stats = collect_stats(dense, calib, layers, hessian=True, progress=False)
    pruned = {}
    for recon in (False, True):
        model = copy.deepcopy(dense)
        cfg = PruneConfig(pattern="2:4", score="wanda", permutation="heuristic", groups=2, reconstruct=recon,
                          progress=False, learn=LearnConfig(batch_size=2))
        pruned[recon] = (model, prune(model, None, cfg, calib=calib))
    (plain, res_plain), (refit, res_refit) = pruned[False], pruned[True]
    pattern = NMPattern.parse("2:4")
    for site in res_refit.sites:
        perm = res_refit.perms[site.name]
        assert perm == res_plain.perms[site.name]  # the same plan: only the kept weights change
        for c in site.consumers:
            w0 = get_module(dense, c).weight.double()
            w_plain, w_refit = get_module(plain, c).weight.double(), get_module(refit, c).weight.double()
            assert torch.all(w_refit[w_plain == 0] == 0)  # the plain mask's zeros stay zero
            assert count_violations(perm.apply_to_columns(w_refit), pattern) == 0
            h = stats[c].H.double()
            err = {k: float(torch.trace((w - w0) @ h @ (w - w0).T)) for k, w in (("plain", w_plain), ("refit", w_refit))}
            assert err["refit"] < err["plain"], (c, err)


# --- the exact refit: masked least squares by conjugate gradient ------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from permsparse.core.reconstruct import damped_hessian, masked_lstsq, refit_error, restored_weights  # noqa: E402


def _brute_force(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row, the normal equations H_KK w'_K = (H w)_K solved densely in float64."""
    out = torch.zeros_like(w, dtype=torch.float64)
    hw = w.double() @ h
    for r in range(w.shape[0]):
        k = torch.nonzero(mask[r]).squeeze(1)
        if len(k):
            out[r, k] = torch.linalg.solve(h[k][:, k], hw[r, k])
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(1, 12), groups=st.integers(1, 6),
       pattern=st.sampled_from(["2:4", "4:8", "1:4"]))
def test_masked_lstsq_is_the_exact_least_squares_and_keeps_the_mask(seed, d_out, groups, pattern):
    """Property: on correlated inputs the CG solution equals the dense per-row solve of the damped
    problem, keeps N:M, and fits no worse than the plain mask or SparseGPT's OBS update."""
    pat = NMPattern.parse(pattern)
    d_in = pat.m * groups * 2
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    x = _correlated_inputs(4 * d_in, d_in, seed)
    h = _stats(x).H
    mask = nm_mask(w.abs() * x.pow(2).sum(0).sqrt(), pat)
    new = masked_lstsq(w, h, mask, max_iters=4 * d_in, tol=1e-6)
    assert new.dtype == w.dtype and torch.all(new[~mask] == 0)
    assert count_violations(new, pat) == 0
    hd = damped_hessian(h.double())
    exact = _brute_force(w, hd, mask)
    e_cg, e_exact = refit_error(new, w, hd), refit_error(exact, w, hd)
    assert e_cg <= e_exact * (1 + 1e-3) + 1e-6, (e_cg, e_exact)
    assert e_cg <= refit_error(w * mask, w, hd) + 1e-6
    obs = SparseGPT(h).prune(w, pat, mask=mask)[0]
    assert e_cg <= refit_error(obs, w, hd) * (1 + 1e-4) + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restored_weights_keep_the_refit_and_give_each_pruned_entry_its_best_single_value(seed):
    # What a trainer that sees the refit permutes: the refit on the kept entries; a pruned entry, if
    # it alone came back, takes the value that fits the dense output best (not its dense weight,
    # which the refit has partly made up for already).
    pat = NMPattern.parse("2:4")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 16, generator=g)
    h = _stats(_correlated_inputs(256, 16, seed)).H
    mask = nm_mask(w.abs(), pat)
    refitted = masked_lstsq(w, h, mask, max_iters=200, tol=1e-7)
    got = restored_weights(w, refitted, h)
    assert torch.equal(got[mask], refitted[mask]) and got.dtype == w.dtype
    hd = damped_hessian(h.double())
    for i, j in zip(*torch.nonzero(~mask, as_tuple=True)):
        def err(v: float) -> float:
            row = refitted[i].clone().double()
            row[j] = v
            return refit_error(row[None], w[i : i + 1], hd)

        v = float(got[i, j])
        assert err(v) <= min(err(v + 1e-2), err(v - 1e-2), err(float(w[i, j])), err(0.0)) + 1e-9


def test_masked_lstsq_handles_dead_inputs_and_refuses_bad_shapes():
    # An input never active in calibration has a zero Hessian row: damping gives it a unit
    # diagonal, so the solve stays defined and the weight on it goes to zero (it carries nothing).
    x = _correlated_inputs(256, 16)
    x[:, 3] = 0
    h = _stats(x).H
    w = torch.randn(6, 16)
    mask = nm_mask(w.abs(), NMPattern.parse("2:4"))
    new = masked_lstsq(w, h, mask)
    assert torch.isfinite(new).all()
    assert torch.all(new[:, 3].abs() <= w[:, 3].abs() + 1e-6)
    with pytest.raises(ValueError, match="Hessian"):
        masked_lstsq(w, h[:8, :8], mask)
    with pytest.raises(ValueError, match="mask of shape"):
        masked_lstsq(w, h, mask[:, :8])
    with pytest.raises(ValueError, match="refit must be one of"):
        PruneConfig(refit="cholesky")


def test_the_refit_method_reaches_the_pruned_layers(tiny):
    """``refit``: lstsq (the default) and obs prune to the same masks; lstsq fits every layer at
    least as close to its dense output on the calibration inputs."""
    t = tiny("llama")
    dense = copy.deepcopy(t.model)
    calib = t.batches(8)
    layers = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    stats = collect_stats(dense, calib, layers, hessian=True, progress=False)
    assert PruneConfig().refit_method == "lstsq" and PruneConfig(score="magnitude").refit_method is None
    models = {}
    for method in ("lstsq", "obs"):
        models[method] = copy.deepcopy(dense)
        cfg = PruneConfig(pattern="2:4", score="wanda", permutation="none", refit=method, progress=False,
                          learn=LearnConfig(batch_size=2))
        prune(models[method], None, cfg, calib=calib)
    for name in layers:
        w0 = get_module(dense, name).weight
        w_l, w_o = (get_module(models[k], name).weight for k in ("lstsq", "obs"))
        assert torch.all(w_l[w_o == 0] == 0)  # the same masks
        hd = damped_hessian(stats[name].H.double())
        assert refit_error(w_l, w0, hd) <= refit_error(w_o, w0, hd) * (1 + 1e-3) + 1e-8, name

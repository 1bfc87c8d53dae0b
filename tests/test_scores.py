"""Pruning scores against direct formulas, activation statistics, and SparseGPT."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from permsparse.core.pattern import NMPattern, count_violations, nm_mask, unstructured_mask
from permsparse.core.permutation import Permutation
from permsparse.core.scores import SCORES, ColumnStats, SparseGPT, compute_score, gram, magnitude, ria, wanda


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calibration(n: int, d_in: int, seed: int) -> torch.Tensor:
    """Correlated inputs with uneven channel scales, like a transformer's hidden states."""
    g = _gen(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    scale = torch.exp(0.5 * torch.randn(d_in, generator=g))
    return (torch.randn(n, d_in, generator=g) @ mix) * scale  # (n, d_in)


def _stats(x: torch.Tensor, hessian: bool = True, batch: int = 100) -> ColumnStats:
    stats = ColumnStats(x.shape[-1], hessian=hessian)
    for i in range(0, x.shape[0], batch):
        stats.add_batch(x[i : i + batch])
    return stats


def _recon_error(x: torch.Tensor, w_new: torch.Tensor, w: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w_new.T - x @ w.T))


# -- scores against direct formulas ------------------------------------------------------


def test_magnitude_wanda_ria_small():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]])
    norm = torch.tensor([2.0, 1.0, 4.0])
    assert torch.equal(magnitude(w), torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.0, 4.0]]))
    torch.testing.assert_close(wanda(w, norm), torch.tensor([[2.0, 2.0, 2.0], [6.0, 0.0, 16.0]]))
    # RIA by hand: row sums 3.5 and 7; column sums 4, 2, 4.5; sqrt of the norms
    a = w.abs()
    expect = torch.empty(2, 3)
    row_sum, col_sum = [3.5, 7.0], [4.0, 2.0, 4.5]
    for i in range(2):
        for j in range(3):
            expect[i, j] = (a[i, j] / row_sum[i] + a[i, j] / col_sum[j]) * norm[j] ** 0.5
    torch.testing.assert_close(ria(w, norm), expect)
    assert float(ria(w, norm)[0, 0]) == pytest.approx((1 / 3.5 + 1 / 4) * 2**0.5)
    torch.testing.assert_close(ria(w, norm, alpha=1.0), expect * norm.sqrt())


def test_scores_random_against_loops():
    g = _gen(0)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    norm = torch.rand(8, generator=g, dtype=torch.float64) + 0.1
    r = ria(w, norm)
    wa = wanda(w, norm)
    for i in range(5):
        for j in range(8):
            rel = abs(w[i, j]) / w[i].abs().sum() + abs(w[i, j]) / w[:, j].abs().sum()
            assert float(r[i, j]) == pytest.approx(float(rel * norm[j] ** 0.5), rel=1e-5)
            assert float(wa[i, j]) == pytest.approx(float(abs(w[i, j]) * norm[j]), rel=1e-5)
    assert r.dtype == torch.float32 and wa.dtype == torch.float32


def test_scores_ignore_gradients():
    w = torch.randn(4, 8, requires_grad=True)
    assert not magnitude(w).requires_grad
    assert not wanda(w, torch.ones(8)).requires_grad


def test_compute_score_dispatch_and_errors():
    x = _calibration(64, 8, 1)
    w = torch.randn(4, 8, generator=_gen(2))
    stats = _stats(x, hessian=False)
    assert set(SCORES) == {"magnitude", "wanda", "ria", "sparsegpt"}
    torch.testing.assert_close(compute_score("magnitude", w), w.abs())
    torch.testing.assert_close(compute_score("wanda", w, stats), wanda(w, stats.col_norm))
    torch.testing.assert_close(compute_score("ria", w, stats), ria(w, stats.col_norm))
    torch.testing.assert_close(compute_score("sparsegpt", w, stats), wanda(w, stats.col_norm))
    with pytest.raises(ValueError, match="'wanda' needs calibration statistics"):
        compute_score("wanda", w)
    with pytest.raises(ValueError, match="unknown score 'taylor'"):
        compute_score("taylor", w)
    with pytest.raises(ValueError, match=r"norms of shape \(7,\) do not match the weight's 8"):
        wanda(w, torch.ones(7))
    with pytest.raises(ValueError, match=r"norms of shape \(8, 1\)"):
        ria(w, torch.ones(8, 1))
    w_bad = w.clone()
    w_bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="magnitude score has 1 non-finite"):
        compute_score("magnitude", w_bad)


# -- activation statistics ---------------------------------------------------------------


def test_column_stats_over_batches_equal_direct():
    x = _calibration(300, 16, 3).double()
    stats = ColumnStats(16, hessian=True)
    stats.add_batch(x[:100].reshape(4, 25, 16))  # (batch, seq, d_in) inputs flatten
    stats.add_batch(x[100:250])
    stats.add_batch(x[250:])
    assert stats.n_tokens == 300
    torch.testing.assert_close(stats.sq_sum, (x * x).sum(0))
    torch.testing.assert_close(stats.col_norm, x.norm(dim=0).float())
    torch.testing.assert_close(stats.H, (2.0 / 300 * x.T @ x).float())
    assert stats.sq_sum.dtype == torch.float64 and stats.H.dtype == torch.float32


def test_column_stats_merge_equals_single_accumulation():
    x = _calibration(240, 12, 4)
    whole = _stats(x, hessian=True, batch=60)
    a, b = _stats(x[:90], hessian=True, batch=30), _stats(x[90:], hessian=True, batch=50)
    a.merge(b)
    assert a.n_tokens == whole.n_tokens == 240
    torch.testing.assert_close(a.sq_sum, whole.sq_sum)
    torch.testing.assert_close(a.H, whole.H)
    # a Hessian-free accumulator may absorb one with the Hessian (it just ignores it)
    c = _stats(x[:90], hessian=False)
    c.merge(_stats(x[90:], hessian=True))
    torch.testing.assert_close(c.sq_sum, whole.sq_sum)


def test_column_stats_hessian_allocated_by_the_first_batch():
    # A 7B model has ~220 of these d_in x d_in accumulators: none is allocated before data comes,
    # and where the data lives decides where it accumulates (float32 on an accelerator).
    stats = ColumnStats(6, hessian=True)
    assert stats.xxt is None
    torch.testing.assert_close(stats.H, torch.zeros(6, 6))  # no tokens yet: no curvature
    stats.add_batch(torch.ones(2, 6))
    assert stats.xxt.dtype == torch.float64 and stats.to_host() is stats and stats.xxt.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_column_stats_on_cuda_match_the_host():
    x = _calibration(300, 32, 7)
    host, dev = ColumnStats(32, hessian=True), ColumnStats(32, hessian=True)
    for chunk in x.split(100):
        host.add_batch(chunk)
        dev.add_batch(chunk.cuda().half())
    assert dev.xxt.is_cuda and dev.xxt.dtype == torch.float32
    dev.to_host()
    assert dev.xxt.device.type == "cpu"
    torch.testing.assert_close(dev.H, _hessian_of_half(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dev.sq_sum, (x.half().double() ** 2).sum(0), rtol=1e-6, atol=1e-6)


def _hessian_of_half(x: torch.Tensor) -> torch.Tensor:
    xh = x.half().double()
    return (2.0 / x.shape[0] * xh.T @ xh).float()


def test_column_stats_under_bf16_autocast_take_the_hessian_in_full_precision():
    # A calibration pass under the trainer's bfloat16 autocast: the Hessian's products must not run
    # in bfloat16 (a low-rank XᵀX then turns indefinite and the refit diverged to NaN).
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0))
    ref = ColumnStats(24, hessian=True)
    ref.add_batch(x)
    got = ColumnStats(24, hessian=True)
    with torch.autocast("cpu", torch.bfloat16):
        got.add_batch(x)
    assert torch.equal(got.xxt, ref.xxt) and torch.equal(got.sq_sum, ref.sq_sum)


def test_refit_that_diverges_is_refused_not_written():
    from permsparse.core.reconstruct import masked_lstsq

    w = torch.randn(4, 8)
    h = torch.eye(8)
    h[0, 1] = h[1, 0] = float("inf")  # overflowed statistics: whatever the cause, no NaN model is written
    mask = nm_mask(w.abs(), NMPattern.parse("2:4"))
    with pytest.raises(FloatingPointError, match="refit diverged"):
        masked_lstsq(w, h, mask)


def test_column_stats_errors():
    stats = ColumnStats(8)
    with pytest.raises(ValueError, match="input has 7 features, stats expect 8"):
        stats.add_batch(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"without the Hessian \(hessian=False\)"):
        _ = stats.H
    with pytest.raises(ValueError, match="cannot merge statistics of 4 input channels into 8"):
        stats.merge(ColumnStats(4))
    with_h = ColumnStats(8, hessian=True)
    with pytest.raises(ValueError, match="merged Hessian would miss those tokens"):
        with_h.merge(stats)


# -- SparseGPT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer():
    d_out, d_in = 48, 64
    x = _calibration(512, d_in, 5)
    w = torch.randn(d_out, d_in, generator=_gen(6))
    return w, x, _stats(x, hessian=True, batch=128)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_sparsegpt_nm_valid_and_beats_wanda(layer, pattern):
    w, x, stats = layer
    new_w, kept = SparseGPT(stats.H).prune(w, pattern)
    p = NMPattern.parse(pattern)
    assert new_w.shape == w.shape and new_w.dtype == w.dtype
    assert count_violations(new_w, p) == 0
    assert bool((kept.reshape(w.shape[0], -1, p.m).sum(-1) == p.n_kept).all())
    assert bool((new_w[~kept] == 0).all())
    wanda_w = w * nm_mask(wanda(w, stats.col_norm), p)
    err_sgpt, err_wanda = _recon_error(x, new_w, w), _recon_error(x, wanda_w, w)
    assert err_sgpt < err_wanda, (err_sgpt, err_wanda)


def test_sparsegpt_small_blocksize_matches_pattern(layer):
    """A block size that is not a multiple of M is rounded down to one."""
    w, x, stats = layer
    new_w, _ = SparseGPT(stats.H, blocksize=10).prune(w, "4:8")
    assert count_violations(new_w, "4:8") == 0
    assert _recon_error(x, new_w, w) < _recon_error(x, w * nm_mask(wanda(w, stats.col_norm), "4:8"), w)


def test_sparsegpt_with_permutation(layer):
    w, x, stats = layer
    perm = Permutation.random(w.shape[1], 4, _gen(7))
    new_w, kept = SparseGPT(stats.H).prune(w, "2:4", perm=perm)
    # valid N:M in the deployed (permuted) coordinates, not necessarily in the original ones
    assert count_violations(perm.apply_to_columns(new_w), "2:4") == 0
    kept_p = perm.apply_to_columns(kept)
    assert bool((kept_p.reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    assert bool((new_w[~kept] == 0).all())
    # same function: the permuted deployed layer computes what new_w computes
    y = x @ new_w.T
    y_dep = perm.apply_to_activations(x) @ perm.apply_to_columns(new_w).T
    torch.testing.assert_close(y_dep, y, rtol=1e-4, atol=1e-4)
    wanda_p = perm.inverse().apply_to_columns(
        perm.apply_to_columns(w) * nm_mask(perm.apply_to_columns(wanda(w, stats.col_norm)), "2:4")
    )
    assert _recon_error(x, new_w, w) < _recon_error(x, wanda_p, w)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_unstructured_sparsity(layer, sparsity):
    w, x, stats = layer
    new_w, kept = SparseGPT(stats.H, blocksize=32).prune(w, None, sparsity=sparsity)
    pruned_frac = 1.0 - float(kept.float().mean())
    assert pruned_frac == pytest.approx(sparsity, abs=0.01)
    assert bool((new_w[~kept] == 0).all())
    wanda_u = w * unstructured_mask(wanda(w, stats.col_norm), sparsity)
    assert _recon_error(x, new_w, w) < _recon_error(x, wanda_u, w)


def test_sparsegpt_dead_inputs_and_errors():
    x = _calibration(256, 16, 8)
    x[:, 3] = 0.0  # a channel that never fires
    stats = _stats(x, hessian=True)
    w = torch.randn(8, 16, generator=_gen(9))
    new_w, kept = SparseGPT(stats.H).prune(w, "2:4")
    assert bool(torch.isfinite(new_w).all())
    assert float(new_w[:, 3].abs().sum()) == 0.0
    assert count_violations(new_w, "2:4") == 0
    with pytest.raises(ValueError, match="Hessian must be square"):
        SparseGPT(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="Hessian is 16x16, weight has 12 inputs"):
        SparseGPT(stats.H).prune(torch.randn(8, 12), "2:4")
    with pytest.raises(ValueError, match=r"width 18 .*divisible by M=4"):
        SparseGPT(torch.eye(18)).prune(torch.randn(2, 18), "2:4")


@given(d=st.integers(1, 700), tokens=st.integers(1, 40), blocks=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_gram_from_the_upper_block_triangle_is_xtx(d, tokens, blocks, seed):
    # Any width (a remainder block, widths under the split's threshold) and any number of blocks.
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = gram(x, blocks)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-10)

"""N:M patterns and masks: validity, hand-computed masks, tie-breaking, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.core.pattern import NMPattern, check_finite, count_violations, nm_mask, unstructured_mask


@st.composite
def score_and_pattern(draw):
    m = draw(st.integers(2, 16))
    n_kept = draw(st.integers(1, m - 1))
    d_out = draw(st.integers(1, 9))
    n_blocks = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    score = torch.randn(d_out, n_blocks * m, generator=gen)
    if draw(st.booleans()):  # heavy ties: a few distinct values only
        score = torch.round(score)
    return score, NMPattern(n_kept, m)


# -- patterns ----------------------------------------------------------------------------


def test_parse_keeps_n_of_m():
    p = NMPattern.parse("2:4")
    assert (p.n_kept, p.m) == (2, 4)
    assert p.sparsity == pytest.approx(0.5)
    assert NMPattern.parse(" 4 : 8 ") == NMPattern(4, 8)
    assert NMPattern.parse(p) is p
    assert str(NMPattern.parse("1:4")) == "1:4"
    assert NMPattern.parse("3:4").sparsity == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("4:2", r"4:2.*0 < N < M"),
        ("0:4", r"0:4.*0 < N < M"),
        ("4:4", r"4:4.*0 < N < M"),
        ("2-4", r"'2-4'.*'N:M'"),
        ("a:b", r"'a:b'.*'N:M'"),
        ("", r"''.*'N:M'"),
        ("2:4:8", r"'2:4:8'.*'N:M'"),
    ],
)
def test_parse_rejects_bad_patterns(text, match):
    with pytest.raises(ValueError, match=match):
        NMPattern.parse(text)


def test_pattern_needs_integers():
    with pytest.raises(ValueError, match="integers"):
        NMPattern(2.0, 4)  # type: ignore[arg-type]


def test_check_width():
    p = NMPattern(2, 4)
    p.check_width(16, groups=4)
    with pytest.raises(ValueError, match=r"width 10 .*divisible by M=4"):
        p.check_width(10)
    with pytest.raises(ValueError, match=r"width 24 .*groups\*M = 4\*4"):
        p.check_width(24, groups=4)
    with pytest.raises(ValueError, match=r"groups\*M = 0\*4"):
        p.check_width(16, groups=0)


# -- masks -------------------------------------------------------------------------------


@settings(max_examples=150)
@given(score_and_pattern())
def test_mask_validity(args):
    score, p = args
    mask = nm_mask(score, p)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    per_block = mask.reshape(score.shape[0], -1, p.m).sum(-1)
    assert bool((per_block == p.n_kept).all())
    weight = torch.randn(score.shape) + 10.0  # no accidental zeros
    assert count_violations(weight * mask, p) == 0
    assert count_violations(mask, p) == 0
    # the kept entries are the block's top n: every kept score >= every dropped score
    blocks = score.reshape(score.shape[0], -1, p.m)
    mb = mask.reshape(blocks.shape)
    lowest_kept = torch.where(mb, blocks, torch.full_like(blocks, math.inf)).amin(-1)
    highest_dropped = torch.where(~mb, blocks, torch.full_like(blocks, -math.inf)).amax(-1)
    assert bool((lowest_kept >= highest_dropped).all())


@settings(max_examples=150)
@given(score_and_pattern())
def test_mask_equals_the_stable_sort_mask(args):
    # Small M counts beating block-mates instead of sorting; ties must break the same way.
    score, p = args
    blocks = score.reshape(score.shape[0], -1, p.m)
    order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices
    ref = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order[..., : p.n_kept], True)
    assert torch.equal(nm_mask(score, p), ref.reshape(score.shape))
    assert torch.equal(nm_mask(score, p, validate=False), ref.reshape(score.shape))


def test_hand_computed_masks():
    score = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3, 4.0, 1.0, 2.0, 3.0],
            [7.0, -1.0, 6.0, 0.0, 0.2, 0.4, 0.3, 0.1],
        ]
    )
    expect_2_4 = torch.tensor(
        [
            [0, 1, 1, 0, 1, 0, 0, 1],
            [1, 0, 1, 0, 0, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    expect_1_4 = torch.tensor(
        [
            [0, 1, 0, 0, 1, 0, 0, 0],
            [1, 0, 0, 0, 0, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    expect_3_4 = torch.tensor(
        [
            [0, 1, 1, 1, 1, 0, 1, 1],
            [1, 0, 1, 1, 1, 1, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(nm_mask(score, "2:4"), expect_2_4)
    assert torch.equal(nm_mask(score, "1:4"), expect_1_4)
    assert torch.equal(nm_mask(score, "3:4"), expect_3_4)
    # one block of 8 for 4:8
    expect_4_8 = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(nm_mask(score, "4:8"), expect_4_8)


def test_ties_keep_lowest_indices():
    score = torch.ones(3, 8)
    assert torch.equal(nm_mask(score, "2:4")[0], torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool))
    assert torch.equal(nm_mask(score, "1:4")[1], torch.tensor([1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool))
    assert torch.equal(nm_mask(score, "3:8")[2], torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool))
    # partial ties: the higher score wins, then the lower index among equals
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0]])
    assert torch.equal(nm_mask(s, "2:4"), torch.tensor([[0, 1, 1, 0]], dtype=torch.bool))
    # deterministic: the same mask every call
    r = torch.round(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(nm_mask(r, "2:4"), nm_mask(r.clone(), "2:4"))


def test_mask_has_no_gradient_and_keeps_device():
    score = torch.randn(4, 8, requires_grad=True)
    mask = nm_mask(score, "2:4")
    assert not mask.requires_grad
    assert mask.device == score.device


def test_count_violations_counts_blocks():
    w = torch.ones(2, 8)
    assert count_violations(w, "2:4") == 4  # every block holds 4 > 2 non-zeros
    w[0, :2] = 0.0  # block (0, 0) now holds exactly 2
    assert count_violations(w, "2:4") == 3
    assert count_violations(torch.zeros(2, 8), "1:4") == 0


@settings(max_examples=60)
@given(score_and_pattern())
def test_unstructured_mask_counts_and_ceiling(args):
    score, p = args
    score = score.abs()
    mask = unstructured_mask(score, p.sparsity)
    d_in = score.shape[1]
    assert bool((mask.sum(1) == d_in * p.n_kept // p.m).all())
    # the kept score is the row's top: at least the N:M mask's kept score, per row
    kept_u = (score * mask).sum(1)
    kept_nm = (score * nm_mask(score, p)).sum(1)
    assert bool((kept_u >= kept_nm - 1e-5).all())


def test_unstructured_mask_sparsity_bounds():
    s = torch.rand(3, 10)
    assert bool(unstructured_mask(s, 0.0).all())
    assert int(unstructured_mask(s, 0.3).sum()) == 3 * 7
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            unstructured_mask(s, bad)


# -- bad input ---------------------------------------------------------------------------


def test_mask_rejects_bad_width_and_shape():
    with pytest.raises(ValueError, match=r"width 10 .*divisible by M=4"):
        nm_mask(torch.rand(2, 10), "2:4")
    with pytest.raises(ValueError, match=r"width 6 .*divisible by M=4"):
        count_violations(torch.rand(2, 6), "2:4")
    with pytest.raises(ValueError, match="2-D"):
        nm_mask(torch.rand(8), "2:4")
    with pytest.raises(ValueError, match="invalid N:M pattern"):
        nm_mask(torch.rand(2, 8), "4:2")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_rejected(bad):
    s = torch.rand(2, 8)
    s[1, 3] = bad
    with pytest.raises(ValueError, match=r"1 non-finite values \(NaN or inf\).*mask"):
        nm_mask(s, "2:4")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\)"):
        unstructured_mask(s, 0.5)
    with pytest.raises(ValueError, match=r"^my score has 1 non-finite"):
        check_finite(s, "my score")


def test_property_tests_reproduce():
    """conftest's profile: every property test draws the same examples on every run."""
    assert settings().derandomize and settings().deadline is None

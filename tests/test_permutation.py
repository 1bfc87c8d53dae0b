"""Group-wise permutations: algebra, validity, function equivalence, matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.core.permutation import Permutation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def perm_setup(draw, max_groups: int = 4, max_k: int = 12):
    groups = draw(st.integers(1, max_groups))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    return groups * k, groups, seed


def _assert_respects_groups(p: Permutation, groups: int) -> None:
    k = p.d_in // groups
    assert torch.equal(p.indices // k, torch.arange(p.d_in) // k)
    assert torch.equal(torch.sort(p.indices).values, torch.arange(p.d_in))


# -- algebra -----------------------------------------------------------------------------


@settings(max_examples=60)
@given(perm_setup())
def test_inverse_is_identity(setup):
    d_in, groups, seed = setup
    p = Permutation.random(d_in, groups, _gen(seed))
    ident = Permutation.identity(d_in, groups)
    assert p.compose(p.inverse()) == ident
    assert p.inverse().compose(p) == ident
    assert p.inverse().inverse() == p
    x = torch.randn(3, d_in)
    assert torch.equal(p.inverse().apply_to_activations(p.apply_to_activations(x)), x)


@settings(max_examples=60)
@given(perm_setup())
def test_compose_semantics_and_associativity(setup):
    d_in, groups, seed = setup
    g = _gen(seed)
    p, q, r = (Permutation.random(d_in, groups, g) for _ in range(3))
    x = torch.randn(2, d_in, generator=g)
    assert torch.equal(x[:, p.indices][:, q.indices], x[:, p.compose(q).indices])
    assert torch.equal(q.apply_to_columns(p.apply_to_columns(x)), p.compose(q).apply_to_columns(x))
    assert p.compose(q).compose(r) == p.compose(q.compose(r))
    assert p.compose(Permutation.identity(d_in)) == p
    _assert_respects_groups(p.compose(q), groups)


def test_compose_groups():
    a = Permutation.random(24, 4, _gen(0))
    b = Permutation.random(24, 1, _gen(1))
    assert a.compose(b).groups == 1
    assert a.compose(Permutation.random(24, 2, _gen(2))).groups == 2
    # groupings that do not nest: 3 groups of 4 and 2 groups of 6 -> only the whole width
    c = Permutation(torch.tensor([0, 1, 2, 3, 7, 5, 6, 4, 8, 9, 10, 11]), 3)
    d = Permutation.identity(12, 2)
    assert c.compose(d) == c and c.compose(d).groups == 1
    with pytest.raises(ValueError, match="cannot compose permutations of 8 and 12"):
        Permutation.identity(8).compose(d)


def test_equality_and_hash():
    p = Permutation(torch.tensor([1, 0, 3, 2]), 2)
    q = Permutation([1, 0, 3, 2], 1)
    assert p == q and hash(p) == hash(q)
    assert p != Permutation.identity(4)
    assert p != [1, 0, 3, 2]
    assert Permutation.identity(6).is_identity()
    assert not p.is_identity()
    assert p.to_list() == [1, 0, 3, 2]
    assert "d_in=4" in repr(p)


# -- validity ----------------------------------------------------------------------------


def test_validate_rejects_bad_indices():
    with pytest.raises(ValueError, match="not a permutation"):
        Permutation(torch.tensor([0, 0, 2, 3]))
    with pytest.raises(ValueError, match="not a permutation"):
        Permutation(torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="not a permutation"):
        Permutation(torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(ValueError, match="across its 2 groups of 2"):
        Permutation(torch.tensor([0, 2, 1, 3]), 2)
    with pytest.raises(ValueError, match="cannot be split into 4 equal groups"):
        Permutation(torch.arange(6), 4)
    with pytest.raises(ValueError, match="cannot be split"):
        Permutation(torch.arange(6), 0)
    with pytest.raises(ValueError, match="cannot be split"):
        Permutation(torch.arange(0))
    with pytest.raises(ValueError, match="not divisible by groups=4"):
        Permutation.random(10, 4)


def test_wrong_length_application_rejected():
    p = Permutation.random(8, 2, _gen(0))
    with pytest.raises(ValueError, match="weight columns: size 6 does not match the permutation's 8"):
        p.apply_to_columns(torch.randn(3, 6))
    with pytest.raises(ValueError, match="activation features: size 7"):
        p.apply_to_activations(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="producer rows: size 3"):
        p.apply_to_rows(torch.randn(3, 8))


# -- function equivalence ----------------------------------------------------------------


@settings(max_examples=60)
@given(perm_setup(), st.integers(1, 6), st.integers(1, 3))
def test_columns_and_activations_preserve_function(setup, d_out, batch):
    d_in, groups, seed = setup
    g = _gen(seed)
    p = Permutation.random(d_in, groups, g)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(batch, 5, d_in, generator=g, dtype=torch.float64)
    y = x @ w.T
    y_p = p.apply_to_activations(x) @ p.apply_to_columns(w).T
    torch.testing.assert_close(y_p, y, rtol=1e-12, atol=1e-12)
    # W x == W[:, π] x[π] also as index expressions
    assert torch.equal(p.apply_to_columns(w), w[:, p.indices])


@settings(max_examples=60)
@given(perm_setup(), st.integers(1, 6), st.integers(1, 6))
def test_rows_fold_into_producer(setup, d_prod_in, d_out):
    d_mid, groups, seed = setup
    g = _gen(seed)
    p = Permutation.random(d_mid, groups, g)
    w1 = torch.randn(d_mid, d_prod_in, generator=g, dtype=torch.float64)  # producer
    b1 = torch.randn(d_mid, generator=g, dtype=torch.float64)
    w2 = torch.randn(d_out, d_mid, generator=g, dtype=torch.float64)  # consumer
    x = torch.randn(4, d_prod_in, generator=g, dtype=torch.float64)
    ref = (x @ w1.T + b1) @ w2.T
    h_p = x @ p.apply_to_rows(w1).T + p.apply_to_rows(b1)  # producer emits permuted channels
    torch.testing.assert_close(h_p @ p.apply_to_columns(w2).T, ref, rtol=1e-12, atol=1e-12)
    # through an elementwise nonlinearity too (it commutes with a channel permutation)
    ref_act = torch.relu(x @ w1.T + b1) @ w2.T
    torch.testing.assert_close(torch.relu(h_p) @ p.apply_to_columns(w2).T, ref_act, rtol=1e-12, atol=1e-12)


# -- matrices ----------------------------------------------------------------------------


@settings(max_examples=60)
@given(perm_setup())
def test_matrices_roundtrip(setup):
    d_in, groups, seed = setup
    g = _gen(seed)
    p = Permutation.random(d_in, groups, g)
    mats = p.to_matrices(torch.float64)
    k = d_in // groups
    assert mats.shape == (groups, k, k)
    assert torch.equal(mats.sum(-1), torch.ones(groups, k, dtype=torch.float64))
    assert torch.equal(mats.sum(-2), torch.ones(groups, k, dtype=torch.float64))
    assert Permutation.from_matrices(mats) == p
    assert Permutation.from_matrices(mats).groups == groups
    w = torch.randn(3, d_in, generator=g, dtype=torch.float64)
    assert torch.equal(w @ torch.block_diag(*mats), w[:, p.indices])
    # the per-group statement W_g @ P_g == W_g[:, π_g]
    for gi in range(groups):
        w_g = w[:, gi * k : (gi + 1) * k]
        assert torch.equal(w_g @ mats[gi], w_g[:, p.local[gi]])


def test_local_and_from_local():
    p = Permutation(torch.tensor([1, 0, 2, 5, 3, 4]), 2)
    assert torch.equal(p.local, torch.tensor([[1, 0, 2], [2, 0, 1]]))
    assert Permutation.from_local(p.local) == p
    assert p.group_size == 3 and p.d_in == 6
    assert torch.equal(Permutation.identity(4).to_matrices(), torch.eye(4).unsqueeze(0))


def test_random_respects_groups_and_is_seeded():
    for groups in (1, 2, 4, 8):
        p = Permutation.random(64, groups, _gen(groups))
        _assert_respects_groups(p, groups)
        assert p.groups == groups
        assert p == Permutation.random(64, groups, _gen(groups))
    # with one group it does move channels across what would be group boundaries
    assert not torch.equal(Permutation.random(64, 1, _gen(0)).indices // 16, torch.arange(64) // 16)


def test_indices_stored_on_cpu_as_long():
    p = Permutation([2, 0, 1])
    assert p.indices.dtype == torch.long and p.indices.device.type == "cpu"

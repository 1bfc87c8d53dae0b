"""The data-driven cost predictor (open question 2) and the random-permutation start."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.models import apply

from permsparse.models import calibrate
from permsparse.train.learn import LearnConfig, PermutationBank, make_batches, site_features, train_end_to_end
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.experimental.predictor import N_FEATURES, CostPredictor, channel_features
from permsparse.models.sites import find_sites

PATTERN = NMPattern.parse("2:4")
VOCAB = 128


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _setup(tiny, groups=2):
    t = tiny("llama")
    sites = find_sites(t.model)
    calib = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    batches = make_batches(calib, 2)
    stats = calibrate.collect_stats(t.model, batches, [c for s in sites for c in s.consumers], progress=False)
    scores, heur = {}, {}
    for s in sites:
        sc = apply.site_scores(t.model, s, "wanda", stats)
        scores.update(zip(s.consumers, sc))
        heur[s.name] = apply.heuristic_permutation(s, sc, PATTERN, groups)
    weights = {c: t.model.get_submodule(c).weight.detach() for s in sites for c in s.consumers}
    return t, sites, calib, scores, heur, weights


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), groups=st.sampled_from([1, 2, 4]), k=st.sampled_from([4, 8]), seed=st.integers(0, 99))
def test_features_are_standardised_per_group(rows, groups, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * k, generator=g)
    act = torch.rand(groups * k, generator=g) + 0.1
    f = channel_features([w.abs() * act], [w], groups)
    assert f.shape == (groups, k, N_FEATURES) and torch.isfinite(f).all()
    # Every feature has mean 0 in each group, and std 1 unless it is constant (then all zero).
    assert torch.allclose(f.mean(1), torch.zeros(groups, N_FEATURES), atol=1e-5)
    std = f.std(1)
    assert ((std - 1).abs() < 1e-4).logical_or(std == 0).all()


def test_features_read_activations_and_ignore_constants():
    w = torch.ones(3, 8)
    act = torch.arange(1, 9, dtype=torch.float)
    f = channel_features([w * act], [w], 1)[0]
    # Weights are constant: the weight-norm and peakedness features carry nothing.
    assert torch.equal(f[:, 1], torch.zeros(8)) and torch.equal(f[:, 3], torch.zeros(8))
    # The activation feature orders the channels by their activation norm.
    assert torch.equal(f[:, 2].argsort(), torch.arange(8))
    with pytest.raises(ValueError, match="divisible"):
        channel_features([w], [w], 3)
    with pytest.raises(ValueError, match="same shape"):
        channel_features([w], [w[:, :4]], 1)


def test_predictor_starts_at_base_and_learns_through_both_parts():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, N_FEATURES, generator=g)
    base = torch.randn(2, 8, 8, generator=g)
    pred = CostPredictor(feats, base, m=4, dim=3, hidden=5, generator=g)
    assert torch.equal(pred(), base)
    # Parameters: 2 blocks x 3 dims per group plus the shared MLP, not 8 x 8 per group.
    n_mlp = (N_FEATURES * 5 + 5) + (5 * 3 + 3)
    assert sum(p.numel() for p in pred.parameters()) == 2 * 2 * 3 + n_mlp
    opt = torch.optim.SGD(pred.parameters(), lr=0.1)
    target = torch.randn(2, 8, 8, generator=g)
    for _ in range(2):
        opt.zero_grad()
        loss = (pred() * target).sum()
        loss.backward()
        opt.step()
    assert pred.psi.grad.abs().sum() > 0 and pred.mlp[0].weight.grad.abs().sum() > 0
    # Slots of one N:M block get the same predicted row: only the block matters.
    delta = pred() - base
    assert torch.allclose(delta[:, :, 0], delta[:, :, 3], atol=1e-6) and torch.allclose(delta[:, :, 4], delta[:, :, 7], atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        CostPredictor(feats[:, :6], base[:, :6, :6], m=4)


def test_bank_with_predictor_starts_at_warm_start_with_fewer_parameters(tiny):
    t, sites, calib, scores, heur, weights = _setup(tiny)
    feats = site_features(sites, 2, scores, weights)
    table = PermutationBank(sites, 2, PATTERN, heur, "permutation", margin=0.1)
    pred = PermutationBank(sites, 2, PATTERN, heur, "permutation", margin=0.1, cost_model="predictor",
                           features=feats, predictor_dim=2)
    assert {n: p.indices.tolist() for n, p in pred.hard().items()} == {n: heur[n].indices.tolist() for n in heur}
    assert {n: p.indices.tolist() for n, p in table.hard().items()} == {n: heur[n].indices.tolist() for n in heur}
    n_table = sum(p.numel() for p in table.parameters())
    n_pred = sum(p.numel() for p in pred.parameters())
    assert n_pred < n_table, (n_pred, n_table)
    with pytest.raises(ValueError, match="features"):
        PermutationBank(sites, 2, PATTERN, heur, "permutation", cost_model="predictor")
    with pytest.raises(ValueError, match="cost_model"):
        PermutationBank(sites, 2, PATTERN, heur, "permutation", cost_model="mlp", features=feats)
    with pytest.raises(ValueError, match="cost_model"):
        LearnConfig(cost_model="mlp")


def test_predictor_trains_end_to_end_and_resumes(tiny, tmp_path):
    t, sites, calib, scores, heur, weights = _setup(tiny)
    kw = dict(epochs=4, lr=0.05, batch_size=2, cost_model="predictor", predictor_dim=4)
    perms, hist = train_end_to_end(t.model, sites, scores, PATTERN, 2, calib, LearnConfig(**kw), start=heur,
                                   progress=False)
    assert len(hist) == 16 and all(math.isfinite(h.loss) for h in hist)
    assert sum(h.changed for h in hist) > 0  # the predicted costs did move channels
    for s in sites:
        assert isinstance(perms[s.name], Permutation) and perms[s.name].d_in == s.d_in
    # Interrupted after 8 steps and resumed: the same permutations as uninterrupted.
    ck = tmp_path / "state.safetensors"
    cut = LearnConfig(**kw, checkpoint_path=str(ck), checkpoint_every=8)
    seen = []

    def stop(rec, state):
        seen.append(rec.step)
        if rec.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_end_to_end(t.model, sites, scores, PATTERN, 2, calib, cut, start=heur, progress=False, on_step=stop)
    resumed, _ = train_end_to_end(t.model, sites, scores, PATTERN, 2, calib, cut, start=heur, progress=False,
                                  resume=True)
    assert {n: p.indices.tolist() for n, p in resumed.items()} == {n: p.indices.tolist() for n, p in perms.items()}


def test_random_init_starts_from_a_seeded_random_permutation(tiny):
    t, sites, calib, scores, heur, weights = _setup(tiny)
    a = PermutationBank(sites, 2, PATTERN, None, "random", seed=1).hard()
    b = PermutationBank(sites, 2, PATTERN, None, "random", seed=1).hard()
    c = PermutationBank(sites, 2, PATTERN, None, "random", seed=2).hard()
    assert {n: p.indices.tolist() for n, p in a.items()} == {n: p.indices.tolist() for n, p in b.items()}
    assert any(not torch.equal(a[n].indices, c[n].indices) for n in a)
    assert all(not p.is_identity() for p in a.values())
    for s in sites:  # tied sites stay tied (foldable into their producer)
        if s.head_tied:
            s.untie(a[s.name], 2)
    assert LearnConfig(init="random").init == "random"

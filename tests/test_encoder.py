"""An objective for every family: models without logits learn against the dense model's last
hidden states, and a model with nothing to prune is refused, naming what it could not handle.

The claims: on a tiny random ``BertModel`` (no LM head, no logits) the end-to-end trainer
lowers the hidden-state loss below the unpermuted plan's, the guard ranks the plans by that
loss, a cached teacher trains like a live one; the hidden-state losses are what they say
(padding ignored); GPT-2 (``Conv1D`` projections) is refused before any calibration.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from permsparse.api import prune
from permsparse.config import LearnConfig, PruneConfig
from permsparse.core.pattern import NMPattern
from permsparse.models import apply, calibrate
from permsparse.models.sites import find_sites
from permsparse.train.guard import TeacherCache, evaluate_plan, teacher_logits
from permsparse.train.loop import train_end_to_end
from permsparse.train.loss import dense_target, hidden_loss

PATTERN = NMPattern.parse("2:4")
#: 8 batches of 2 sentences of 12 tokens, 8 epochs: 64 steps on the tiny BERT, end to end (auto: block-wise).
LEARN = dict(epochs=8, batch_size=2, lr=0.05, guard_batches=4, objective="e2e")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _padded(batches: list[dict]) -> list[dict]:
    """The batches with the last 4 positions of every second row padding."""
    out = []
    for b in batches:
        mask = b["attention_mask"].clone()
        mask[1::2, -4:] = 0
        out.append({**b, "attention_mask": mask})
    return out


# -- the losses --------------------------------------------------------------------------------


def test_hidden_losses_match_their_plain_forms_and_ignore_padding():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 8, generator=g)
    h = t + 0.3 * torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    keep = mask.bool()
    cos = (1 - F.cosine_similarity(h[keep], t[keep], dim=-1)).mean()
    pooled = torch.stack([1 - F.cosine_similarity(h[i, keep[i]].mean(0), t[i, keep[i]].mean(0), dim=0)
                          for i in range(2)]).mean()
    nmse = (h[keep] - t[keep]).pow(2).sum() / t[keep].pow(2).sum()
    for kind, want in (("cosine", cos), ("pooled-cosine", pooled), ("nmse", nmse)):
        loss, ce, kl = hidden_loss(h, t, mask, kind)
        torch.testing.assert_close(loss, want)
        assert math.isnan(float(ce)) and math.isnan(float(kl))  # no task loss, no KL
        # What the padded positions hold does not count; without a mask every position does.
        h2 = h.clone()
        h2[1, 3:] = 100.0
        torch.testing.assert_close(hidden_loss(h2, t, mask, kind)[0], want)
        assert float(hidden_loss(h2, t, None, kind)[0]) > float(want)
        assert float(hidden_loss(t, t, mask, kind)[0]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="hidden_loss"):
        hidden_loss(h, t, mask, "l1")
    with pytest.raises(ValueError, match="hidden_loss"):
        LearnConfig(hidden_loss="l1")
    with pytest.raises(ValueError, match="do not match"):
        hidden_loss(h, t[:, :4], None)


def test_dense_target_reads_logits_else_the_last_hidden_states(tiny):
    bert, llama = tiny("bert"), tiny("llama")
    with torch.no_grad():
        out = bert.model(**bert.inputs)
        assert dense_target(out) is out.last_hidden_state
        lm = llama.model(**llama.inputs)
        assert dense_target(lm) is lm.logits
    with pytest.raises(ValueError, match="neither logits nor last_hidden_state"):
        dense_target({"pooler_output": torch.zeros(1)})


# -- learning without logits ---------------------------------------------------------------------


def test_tiny_bert_learns_end_to_end_without_logits_and_the_guard_ranks_its_plans(tiny):
    t = tiny("bert")
    batches = _padded(t.batches(8))
    cfg = PruneConfig(permutation="learned", groups=2, progress=False, learn=LearnConfig(**LEARN))
    res = prune(t.model, None, cfg, batches)

    assert len(res.history) == 64
    for h in res.history:  # the hidden-state loss; no CE or KL
        assert math.isfinite(h.loss) and 0.0 <= h.loss <= 2.0 and math.isnan(h.ce) and math.isnan(h.kl)
    masked = {k: v for k, v in res.guard.items() if not k.endswith("+refit")}
    assert set(k for k in masked if not k.startswith("learned@")) == {"none", "heuristic", "learned"}
    assert all(math.isfinite(v) for v in res.guard.values())
    best = min(v for k, v in masked.items() if k.startswith("learned"))
    assert best < res.guard["heuristic"] < res.guard["none"], res.guard
    # The last round weighs the finalists refitted (reconstruction, the default), by the same hidden loss.
    refit = {k.removesuffix("+refit"): v for k, v in res.guard.items() if k.endswith("+refit")}
    assert set(refit) == {"learned", "heuristic"}
    assert res.kept_plan == min(refit, key=lambda k: (refit[k], k != "learned"))


def test_a_trainer_that_sees_the_refit_has_every_plan_judged_refitted(tiny):
    t = tiny("bert")
    batches = _padded(t.batches(8))
    learn = {**LEARN, "epochs": 2}
    plain = prune(copy.deepcopy(t.model), None, PruneConfig(permutation="learned", groups=2, progress=False,
                                                              learn=LearnConfig(**learn)), batches)
    model = copy.deepcopy(t.model)
    res = prune(model, None, PruneConfig(permutation="learned", groups=2, progress=False,
                                         learn=LearnConfig(**learn, refit_every=4)), batches)
    assert len(res.history) == 16 and all(math.isfinite(h.loss) for h in res.history)
    # One guard round, every plan refitted as the model will be: no plain-mask round before it.
    assert not any(k.endswith("+refit") for k in res.guard)
    assert res.guard["heuristic"] == pytest.approx(plain.guard["heuristic+refit"], rel=1e-5)
    assert res.guard["heuristic"] < plain.guard["heuristic"]  # the refit recovers error the plain mask keeps
    assert res.kept_plan == min(("none", "heuristic", "learned"), key=lambda k: (res.guard[k], k != "learned"))
    for s in res.sites:  # still N:M in the kept plan's layout
        for c in s.consumers:
            w = model.get_submodule(c).weight
            perm = res.perms.get(s.name)
            w = perm.apply_to_columns(w) if perm is not None else w
            assert bool((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all())


def test_refit_every_where_it_cannot_apply_is_said(tiny, caplog):
    # auto takes the block-wise objective for a BertModel: the trainer that sees the refit is end to end only.
    t = tiny("bert")
    learn = LearnConfig(epochs=1, batch_size=4, refit_every=2, steps_per_block=2)
    with caplog.at_level("WARNING", logger="permsparse.api"):
        res = prune(t.model, None, PruneConfig(permutation="learned", groups=2, progress=False, learn=learn),
                    t.batches(8))
    assert res.config.learn.objective == "blockwise"
    assert "refit_every is ignored" in caplog.text and "blockwise" in caplog.text


def test_guard_loss_of_an_encoder_is_the_hidden_loss_of_the_pruned_model(tiny):
    t = tiny("bert")
    dense = t.clone()
    batches = _padded(t.batches(4))
    sites = find_sites(t.model)
    stats = calibrate.collect_stats(t.model, batches, [c for s in sites for c in s.consumers], progress=False)
    scores, heur = {}, {}
    for s in sites:
        sc = apply.site_scores(t.model, s, "wanda", stats)
        scores.update(zip(s.consumers, sc))
        heur[s.name] = apply.heuristic_permutation(s, sc, PATTERN, 2)
    weights = {c: t.model.get_submodule(c).weight.detach() for s in sites for c in s.consumers}
    teachers = teacher_logits(t.model, batches, bf16=False)
    got = {kind: evaluate_plan(t.model, sites, heur, weights, scores, PATTERN, batches, 1.0, False, teachers, kind)
           for kind in ("cosine", "nmse")}
    # α = 0 makes no teachers: the guard runs the dense model itself, for the same loss.
    assert evaluate_plan(t.model, sites, heur, weights, scores, PATTERN, batches, 0.0, False, None,
                         "cosine") == pytest.approx(got["cosine"], rel=1e-6)
    # The same number from the model pruned in place with the heuristic plan.
    for s in sites:
        apply.prune_site_(t.model, s, PATTERN, "wanda", stats, heur[s.name], [scores[c] for c in s.consumers])
    with torch.no_grad():
        for kind in ("cosine", "nmse"):
            want = sum(float(hidden_loss(t.model(**b).last_hidden_state, dense.model(**b).last_hidden_state,
                                         b["attention_mask"], kind)[0]) for b in batches) / len(batches)
            assert got[kind] == pytest.approx(want, rel=1e-4)


def test_cached_hidden_states_train_like_a_live_teacher(tiny):
    t = tiny("bert")
    batches = t.batches(4)
    sites = find_sites(t.model)
    cache = TeacherCache(1.0)
    stats = calibrate.collect_stats(t.model, batches, [c for s in sites for c in s.consumers], progress=False,
                                    on_output=cache)
    assert len(cache.logits) == 4 and cache.logits[0].shape == (2, 12, 64)  # (B, T, hidden)
    scores, heur = {}, {}
    for s in sites:
        sc = apply.site_scores(t.model, s, "wanda", stats)
        scores.update(zip(s.consumers, sc))
        heur[s.name] = apply.heuristic_permutation(s, sc, PATTERN, 2)
    cfg = LearnConfig(epochs=1, batch_size=2, bf16=False, hidden_loss="nmse")
    _, cached = train_end_to_end(t.model, sites, scores, PATTERN, 2, batches, cfg, start=heur, progress=False,
                                 teachers=cache.logits)
    _, live = train_end_to_end(t.model, sites, scores, PATTERN, 2, batches, cfg, start=heur, progress=False)
    assert [h.loss for h in cached] == pytest.approx([h.loss for h in live], rel=1e-3)


def test_blockwise_objective_learns_a_tiny_bert(tiny):
    t = tiny("bert")
    cfg = PruneConfig(permutation="learned", groups=2, progress=False,
                      learn=LearnConfig(objective="blockwise", steps_per_block=8, batch_size=2))
    res = prune(t.model, None, cfg, t.batches(4))
    assert len(res.history) == 2 * 8 and all(math.isfinite(h.loss) for h in res.history)
    masked = [k for k in res.guard if not k.endswith("+refit")]
    assert len(masked) == 2 * 2  # none and heuristic per block (the learned plan is weighed refitted only)
    assert 2 * 2 <= len(res.guard) - len(masked) <= 2 * 3  # their finalists refitted


# -- nothing to prune ----------------------------------------------------------------------------


@pytest.mark.parametrize("permutation", ["none", "learned"])
def test_a_model_with_nothing_to_prune_is_refused_naming_conv1d(permutation, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()

    def no_calibration(*a, **k):
        raise AssertionError("calibrated a model with nothing to prune")

    monkeypatch.setattr(calibrate, "collect_stats", no_calibration)
    import permsparse.pipeline.calibration as pc

    monkeypatch.setattr(pc, "collect_stats", no_calibration)
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"nothing to prune.*Conv1D \(8\)"):
        prune(model, None, PruneConfig(permutation=permutation, progress=False), calib)
    with pytest.raises(ValueError, match=r"Conv1D"):  # without calibration data, too (magnitude)
        prune(model, None, PruneConfig(permutation="none", score="magnitude", progress=False))


@pytest.mark.slow
def test_embedded_minilm_learns_through_the_api(minilm):
    # The case: permsparse.prune(..., permutation="learned") on the embedded MiniLM
    # (a BertModel: no LM head) used to fail reading .logits.
    import copy

    model, tok = minilm
    model = copy.deepcopy(model)
    text = ["The quick brown fox jumps over the lazy dog near the river bank today."] * 4
    batches = [dict(tok(text[:2], return_tensors="pt")), dict(tok(text[2:], return_tensors="pt"))]
    cfg = PruneConfig(permutation="learned", progress=False, learn=LearnConfig(epochs=2, batch_size=2, objective="e2e"))
    res = prune(model, tok, cfg, batches)
    assert len(res.history) == 4 and all(math.isfinite(h.loss) for h in res.history)
    assert res.kept_plan in ("none", "heuristic", "learned") and all(math.isfinite(v) for v in res.guard.values())


# -- the headroom bench's search (bench/encoder_headroom.py) ------------------------------------


def test_headroom_search_keeps_a_valid_plan_and_never_raises_the_refitted_error(tiny):
    """The bench's reference search: every swap stays inside one group, the error it reports is
    the returned plan's refitted error, and it never ends above its start (the heuristic's plan)."""
    import random

    from bench_module import load_bench

    from permsparse.api import plan_candidates

    bench = load_bench("encoder_headroom")

    t = tiny("bert")
    cfg = PruneConfig(pattern="2:4", score="wanda", permutation="heuristic", groups=2, progress=False)
    cal = plan_candidates(t.model, cfg, _padded(t.batches(4)), bf16_calibration=False).calibration
    site = next(s for s in cal.sites if not s.head_tied)
    start = cal.heuristic[site.name]
    e0 = bench.site_error(t.model, cal, site, start)
    plan, err, tries, kept = bench.search_site(t.model, cal, site, start, 0.5, random.Random(0))

    assert tries > 0 and 0 <= kept <= tries
    assert err <= e0 and err == pytest.approx(bench.site_error(t.model, cal, site, plan), rel=1e-6)
    k = site.d_in // plan.groups
    idx = plan.indices.view(plan.groups, k)
    assert sorted(plan.indices.tolist()) == list(range(site.d_in))
    assert all(set(idx[g].tolist()) == set(range(g * k, (g + 1) * k)) for g in range(plan.groups))
    if kept:  # a kept swap lowered the error
        assert err < e0

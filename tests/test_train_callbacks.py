"""The trainer's callbacks: averages, snapshots, checkpoint/resume, phase timing, hook order."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern
from permsparse.models import apply, calibrate
from permsparse.models.sites import find_sites
from permsparse.train.callbacks import PHASES, Averages, Callback, PhaseTimer, Snapshots
from permsparse.train.checkpoint import load_checkpoint
from permsparse.train.loop import make_batches, train_end_to_end
from permsparse.train.state import Clock

PATTERN = NMPattern.parse("2:4")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def run(tiny):
    """``run(cfg, **kw)``: train_end_to_end on the tiny LLaMA (8 windows, batches of 2: 4
    batches) from its Wanda heuristic."""
    t = tiny("llama")
    sites = find_sites(t.model)
    calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate.collect_stats(t.model, make_batches(calib, 2), [c for s in sites for c in s.consumers],
                                    progress=False)
    scores, heur = {}, {}
    for s in sites:
        sc = apply.site_scores(t.model, s, "wanda", stats)
        scores.update(zip(s.consumers, sc))
        heur[s.name] = apply.heuristic_permutation(s, sc, PATTERN, 2)

    def go(cfg: LearnConfig, **kw):
        return train_end_to_end(t.model, sites, scores, PATTERN, 2, calib, cfg, start=heur, progress=False, **kw)

    go.weights = {c: t.model.get_submodule(c).weight.detach() for s in sites for c in s.consumers}
    go.heuristic = heur
    return go


def _fake_state(params: dict[str, torch.Tensor]):
    bank = nn.Module()
    for k, v in params.items():
        bank.register_parameter(k, nn.Parameter(v.clone()))
    return SimpleNamespace(bank=bank, progress=0.0, history=[])


# -- averages -------------------------------------------------------------------------------------


def test_averages_tail_mean_is_the_plain_mean_and_ema_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    state = _fake_state({"a": torch.randn(2, 3, 3, generator=gen), "b": torch.randn(1, 4, 4, generator=gen)})
    start = {k: p.detach().clone() for k, p in state.bank.named_parameters()}
    cb = Averages((0.5, 0.9), tail=0.5)
    cb.on_train_begin(state)
    steps, seen = 9, []
    for i in range(steps):
        with torch.no_grad():
            for p in state.bank.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        state.progress = i / (steps - 1)
        seen.append((state.progress, {k: p.detach().clone() for k, p in state.bank.named_parameters()}))
        cb.on_step_end(state, None)
    tail = [costs for prog, costs in seen if prog >= 0.5]
    assert cb.tail_n == len(tail) == 5
    for k in start:
        torch.testing.assert_close(cb.tail_mean[k], torch.stack([c[k] for c in tail]).mean(0))
        for d in (0.5, 0.9):  # e_n = d^n e_0 + (1 - d) Σ d^(n-i) x_i
            want = d**steps * start[k] + sum((1 - d) * d ** (steps - 1 - i) * c[k] for i, (_, c) in enumerate(seen))
            torch.testing.assert_close(cb.ema[d][k], want)
    # Round trip through a checkpoint's (tensors, meta): a fresh callback holds the same.
    tensors, meta = cb.state_dict()
    again = Averages((0.5, 0.9), tail=0.5)
    again.on_train_begin(state)
    again.load_state_dict(tensors, meta)
    assert again.tail_n == cb.tail_n
    assert all(torch.equal(again.tail_mean[k], cb.tail_mean[k]) for k in start)
    assert all(torch.equal(again.ema[d][k], cb.ema[d][k]) for d in (0.5, 0.9) for k in start)


def test_snapshots_take_the_plan_once_per_mark():
    out: dict = {}
    cb = Snapshots(3, out)
    state = SimpleNamespace(progress=0.0, plan=None)
    for step in range(9):
        state.progress, state.plan = step / 8, {"s": f"plan {step}"}
        cb.on_step_end(state, SimpleNamespace(step=step))
    assert out == {2: {"s": "plan 2"}, 4: {"s": "plan 4"}, 6: {"s": "plan 6"}}  # 2/8 >= 1/4, 4/8, 6/8


# -- checkpoint and resume ------------------------------------------------------------------------


def test_checkpoint_resume_through_the_callbacks_gives_identical_plans(run, tmp_path):
    cfg = LearnConfig(epochs=3, batch_size=2, bf16=False, snapshots=2, average=(0.7,), tail_average=0.25,
                      checkpoint_every=2, checkpoint_path=str(tmp_path / "state.safetensors"))
    ref_snap, ref_avg = {}, {}
    ref, ref_hist = run(replace(cfg, checkpoint_path=None), snapshots=ref_snap, averaged=ref_avg)

    class Stop(Exception):
        pass

    class StopAfter(Callback):
        def on_step_end(self, state, log):
            if state.step == 7:
                raise Stop

    with pytest.raises(Stop):
        run(cfg, snapshots={}, averaged={}, callbacks=[StopAfter()])
    _, meta = load_checkpoint(cfg.checkpoint_path)
    assert meta["step"] == 6 and set(meta["snapshots"]) == {"4"} and meta["tail_n"] == 3  # steps 3, 4, 5 of 12
    snap, avg = {}, {}
    got, hist = run(cfg, snapshots=snap, averaged=avg, resume=True)
    assert got == ref and snap == ref_snap and avg == ref_avg
    assert set(avg) == {"avg0.7", "tail0.25"} and sorted(snap) == [4, 8]

    def drop_time(h):
        return {k: v for k, v in h.to_json().items() if k != "seconds"}

    assert [drop_time(h) for h in hist] == [drop_time(h) for h in ref_hist]


# -- the trainer that sees the refit ------------------------------------------------------------


def test_refit_every_refits_at_its_steps_and_a_refit_that_keeps_the_weights_changes_nothing(run):
    cfg = LearnConfig(epochs=2, batch_size=2, lr=0.05, bf16=False, refit_every=3)  # 8 steps: refits at 0, 3, 6
    ref, ref_hist = run(replace(cfg, refit_every=0))
    plans = []

    def dense(plan):  # W' = W on the kept entries: the trainer's weights stay the dense ones
        plans.append(plan)
        return dict(run.weights)

    got, hist = run(cfg, refit=dense)
    assert len(plans) == 3 and plans[0] == run.heuristic  # the first refit is of the warm start
    assert got == ref and [h.loss for h in hist] == [h.loss for h in ref_hist]
    # Refitted weights enter the loss: twice the dense ones on every kept entry change the first step.
    _, doubled = run(cfg, refit=lambda plan: {c: 2 * w for c, w in run.weights.items()})
    assert doubled[0].loss != ref_hist[0].loss
    _, off = run(replace(cfg, refit_every=0), refit=lambda plan: pytest.fail("refit_every=0 must not refit"))
    assert [h.loss for h in off] == [h.loss for h in ref_hist]


# -- timing and the hooks -------------------------------------------------------------------------


def test_phase_timer_reports_every_part_of_every_step(run):
    timer = PhaseTimer()
    _, history = run(LearnConfig(epochs=1, batch_size=2, snapshots=0), on_step=timer)
    assert set(timer.times) == set(PHASES) and all(len(v) == len(history) == 4 for v in timer.times.values())
    for i, h in enumerate(history):  # the parts lie inside the step
        assert 0 < sum(timer.times[p][i] for p in PHASES) <= h.seconds
    med = timer.medians()
    assert set(med) == {f"{p}_s" for p in PHASES} and all(v >= 0 for v in med.values())


def test_step_parts_are_profiler_ranges(run):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, history = run(LearnConfig(epochs=0.5, batch_size=2, snapshots=0))
    counts = {e.key: e.count for e in prof.key_averages()}
    assert all(counts.get(f"permsparse.{p}") == len(history) == 2 for p in PHASES), counts


def test_hooks_run_in_order_and_close_runs_on_errors(run):
    class Record(Callback):
        def __init__(self, fail_at=None):
            self.calls, self.fail_at = [], fail_at

        def on_train_begin(self, state):
            self.calls.append(("begin", state.step))

        def on_step_end(self, state, log):
            assert state.history[-1] is log and state.step == log.step + 1 and state.plan is not None
            self.calls.append(("step", log.step))
            if log.step == self.fail_at:
                raise RuntimeError("stop")

        def on_train_end(self, state):
            self.calls.append(("end", state.step))

        def close(self):
            self.calls.append(("close",))

    ok = Record()
    run(LearnConfig(epochs=0.5, batch_size=2, snapshots=0), callbacks=[ok])
    assert ok.calls == [("begin", 0), ("step", 0), ("step", 1), ("end", 2), ("close",)]
    bad = Record(fail_at=0)
    with pytest.raises(RuntimeError, match="stop"):
        run(LearnConfig(epochs=0.5, batch_size=2, snapshots=0), callbacks=[bad])
    assert bad.calls == [("begin", 0), ("step", 0), ("close",)]


def test_clock_does_not_count_paused_time():
    clock = Clock(elapsed=10.0)
    assert 10.0 <= clock.elapsed() < 10.5
    with clock.paused():
        time.sleep(0.05)
    assert clock.elapsed() < 10.05

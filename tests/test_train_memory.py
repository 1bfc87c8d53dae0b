"""What the trainer holds: the Sinkhorn recomputed in the backward, host copies of the costs,
averages off the device, activation checkpointing, the gradients freed after the step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern
from permsparse.core.permuter import straight_through
from permsparse.core.sinkhorn import EntropySink, soft_entropy, soft_gradient
from permsparse.models import apply, calibrate
from permsparse.models.sites import find_sites
from permsparse.train.bank import PermutationBank
from permsparse.train.callbacks import Averages, Callback
from permsparse.train.hostcopy import HostMirror
from permsparse.train.loop import make_batches, train_end_to_end
from permsparse.train.recompute import no_cache_kwargs, recomputed_blocks

PATTERN = NMPattern.parse("2:4")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# -- the Sinkhorn, recomputed in the backward ---------------------------------------------------


@pytest.mark.parametrize("chunk_groups", [1, 2, 5])
def test_soft_gradient_is_the_straight_through_gradient_bit_for_bit(chunk_groups):
    gen = torch.Generator().manual_seed(0)
    cost = torch.randn(5, 12, 12, generator=gen, requires_grad=True)
    up = torch.randn(5, 12, 12, generator=gen)
    st = straight_through(cost, 0.4, 5)
    (st.matrices * up).sum().backward()
    want, cost.grad = cost.grad.clone(), None
    sink = EntropySink()
    p = soft_gradient(cost, 0.4, 5, sink, chunk_bytes=chunk_groups * 12 * 12 * 4)
    assert p.stride() == (0, 0, 0) and float(p.detach().abs().sum()) == 0.0  # a stand-in: no memory, no value
    assert sink.value is None  # nothing ran yet: the Sinkhorn waits for the backward
    (p * up).sum().backward()
    assert torch.equal(cost.grad, want)
    assert sink.value == pytest.approx(float(st.entropy.mean()), abs=1e-6)
    assert soft_entropy(cost, 0.4, 5).value == pytest.approx(sink.value, abs=1e-6)


def test_bank_keeps_nothing_of_the_sinkhorn_for_the_backward(tiny):
    t = tiny("llama")
    sites = find_sites(t.model)
    bank = PermutationBank(sites, 2, PATTERN, init="noise")
    cost_bytes = sum(p.numel() * p.element_size() for p in bank.parameters())
    saved, (out, ent) = _saved_bytes(lambda: bank(0.5, 5, entropy=True))
    # The costs themselves (and the tied sites' small index vectors): no soft or straight-through copies.
    assert saved < 1.01 * cost_bytes
    loss = sum((piece * torch.randn(piece.shape)).sum() for piece, _ in out.values())
    loss.backward()
    assert bank.entropy == pytest.approx(ent, abs=1e-6)  # the backward's own measurement
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bank.parameters())


# -- host copies and averages ---------------------------------------------------------------------


def test_host_mirror_copies_and_keeps_its_buffers():
    src = {"a": torch.randn(3, 4, 4), "b": torch.randn(2, 5, 5)}
    m = HostMirror(src)
    bufs = {k: v.data_ptr() for k, v in m.buffers.items()}
    m.copy_from(src)
    got = m.wait()
    assert all(torch.equal(got[k], src[k]) for k in src)
    src["a"].add_(1.0)  # a copy, not a view
    assert not torch.equal(m.buffers["a"], src["a"])
    m.copy_from(src)
    assert {k: v.data_ptr() for k, v in m.buffers.items()} == bufs  # the same buffers, refilled
    assert torch.equal(m.wait()["a"], src["a"]) and m.nbytes == (48 + 50) * 4


def _fake_state(params):
    bank = nn.Module()
    for k, v in params.items():
        bank.register_parameter(k, nn.Parameter(v.clone()))
    from types import SimpleNamespace

    return SimpleNamespace(bank=bank, progress=0.0, history=[])


def test_averages_on_the_host_thread_equal_the_plain_ones():
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(2, 3, 3, generator=gen), "b": torch.randn(1, 4, 4, generator=gen)}
    plain, hosted = _fake_state(params), _fake_state(params)
    cbs = [Averages((0.5, 0.9), tail=0.5), Averages((0.5, 0.9), tail=0.5, on_host=True)]
    for cb, st in zip(cbs, (plain, hosted)):
        cb.on_train_begin(st)
    assert cbs[0]._mirror is None and cbs[1]._mirror is not None  # the threaded path, on the host
    for i in range(7):
        step = torch.randn(2, 3, 3, generator=gen), torch.randn(1, 4, 4, generator=gen)
        for cb, st in zip(cbs, (plain, hosted)):
            with torch.no_grad():
                st.bank.a.copy_(step[0])
                st.bank.b.copy_(step[1])
            st.progress = i / 6
            cb.on_step_end(st, None)
    a, _ = cbs[0].state_dict()
    b, meta = cbs[1].state_dict()  # waits for the thread
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and meta["tail_n"] == 4
    cbs[1].close()


# -- the training loop -----------------------------------------------------------------------------


def _setup(tiny):
    t = tiny("llama")
    sites = find_sites(t.model)
    calib = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate.collect_stats(t.model, make_batches(calib, 2), [c for s in sites for c in s.consumers],
                                    progress=False)
    scores = {}
    for s in sites:
        scores.update(zip(s.consumers, apply.site_scores(t.model, s, "wanda", stats)))
    return t.model, sites, scores, calib


class _Spy(Callback):
    """Saved-tensor bytes of each step's forward, and whether gradients outlive the step."""

    def __init__(self) -> None:
        self.saved: list[int] = []
        self.grads_after_step: list[bool] = []
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self._seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def on_phase_begin(self, state, name):
        if name == "forward":
            self._seen = {}
            self._hooks.__enter__()

    def on_phase_end(self, state, name):
        if name == "forward":
            self._hooks.__exit__(None, None, None)
            self.saved.append(sum(self._seen.values()))

    def on_step_end(self, state, log):
        self.grads_after_step.append(any(p.grad is not None for p in state.bank.parameters()))


def test_activation_checkpointing_gives_the_same_run_for_less_saved_memory(tiny):
    model, sites, scores, calib = _setup(tiny)
    runs = {}
    for ckpt in (False, True):
        spy = _Spy()
        cfg = LearnConfig(batch_size=2, epochs=1, bf16=False, activation_checkpointing=ckpt)
        perms, hist = train_end_to_end(model, sites, scores, PATTERN, 2, calib, cfg, progress=False, callbacks=[spy])
        runs[ckpt] = (perms, hist, spy)
    (p0, h0, s0), (p1, h1, s1) = runs[False], runs[True]
    assert {n: p.indices.tolist() for n, p in p0.items()} == {n: p.indices.tolist() for n, p in p1.items()}
    assert [(h.loss, h.entropy, h.changed) for h in h0] == [(h.loss, h.entropy, h.changed) for h in h1]
    assert max(s1.saved) < 0.5 * min(s0.saved)
    assert not any(s0.grads_after_step + s1.grads_after_step)  # freed right after the optimizer step
    assert all(type(b).forward is b.forward.__func__ for b in model.model.layers)  # forwards restored


def test_recomputed_blocks_runs_each_block_twice_and_restores_it():
    calls = []

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            calls.append(1)
            return self.lin(x).relu()

    model = nn.Sequential(Block(), Block())
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    with recomputed_blocks(model, {"0": lambda: {"lin.weight": w * 2}, "1": lambda: {"lin.weight": w}}):
        y = model(x)
    assert "forward" not in model[0].__dict__ and len(calls) == 2
    y.sum().backward()
    assert len(calls) == 4 and w.grad is not None
    g = w.grad.clone()
    w.grad = None
    from torch.func import functional_call

    h = functional_call(model[0], {"lin.weight": w * 2}, (x,))
    functional_call(model[1], {"lin.weight": w}, (h,)).sum().backward()
    assert torch.allclose(w.grad, g)
    assert no_cache_kwargs(model) == {}


def test_checkpointing_is_not_part_of_the_run_key():
    from permsparse.train.checkpoint import run_key

    a = run_key(LearnConfig(), [], 4, PATTERN, 2, {})
    assert run_key(LearnConfig(activation_checkpointing=True), [], 4, PATTERN, 2, {}) == a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_keeps_averages_and_good_costs_on_the_host(tiny):
    import gc

    from permsparse.train import loop

    model, sites, scores, calib = _setup(tiny)
    model.cuda()
    seen = {}

    class Where(Callback):
        def on_step_end(self, state, log):
            avgs = [o for o in gc.get_objects() if isinstance(o, Averages)]
            runs = [o for o in gc.get_objects() if isinstance(o, loop._Run)]
            seen["averages"] = {v.device.type for a in avgs for e in a.ema.values() for v in e.values()}
            seen["good"] = {(b.device.type, b.is_pinned()) for r in runs for b in r.good.buffers.values()}
            seen["costs"] = {p.device.type for p in state.bank.parameters()}

    try:
        perms, hist = train_end_to_end(model, sites, {k: v.cuda() for k, v in scores.items()}, PATTERN, 2, calib,
                                       LearnConfig(batch_size=2, epochs=2, activation_checkpointing=True),
                                       progress=False, averaged=(avg := {}), callbacks=[Where()])
    finally:
        model.cpu()
    assert seen == {"averages": {"cpu"}, "good": {("cpu", True)}, "costs": {"cuda"}}
    assert set(avg) == {"avg0.8", "avg0.9", "tail0.5"} and len(hist) == 8
    assert all(sorted(p.indices.tolist()) == list(range(p.d_in)) for p in perms.values())

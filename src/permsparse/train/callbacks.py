"""What the training loop does beside the step itself, as callbacks.

The loop (:mod:`permsparse.train.loop`) calls, on every callback in order:

* ``on_train_begin(state)`` once, after the state is built (and restored, on a resume);
* ``on_phase_begin(state, name)`` / ``on_phase_end(state, name)`` around each part of a
  step (:data:`PHASES`), inside a ``torch.profiler.record_function("permsparse.<name>")``
  range that a profiler sees and that costs nothing without one;
* ``on_step_end(state, log)`` after each step (the optimizer has stepped, ``state.step``
  counts it, ``state.history`` ends with ``log``);
* ``on_train_end(state)`` when the run ends normally (all steps, or the time budget);
* ``close()`` always, last (errors included).

A callback that holds something a resumed run needs gives it in ``state_dict()`` as
``(tensors, json_meta)`` and takes it back in ``load_state_dict(tensors, meta)`` (called by
the checkpoint after ``on_train_begin``); the names are the callback's own keys of one
shared checkpoint file.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from permsparse.core.permutation import Permutation
from permsparse.train import distributed as dist
from permsparse.train.bank import plan_with
from permsparse.train.hostcopy import HostMirror
from permsparse.train.state import StepLog, TrainState

__all__ = ["Callback", "PHASES", "Averages", "Snapshots", "ProgressBar", "MetricsLog", "OnStep", "PhaseTimer",
           "StepBudget"]

#: The parts of a training step, in order: Sinkhorn + hard assignments, ``W_eff``, the
#: student's forward, the teacher's output (logits or hidden states), the loss, the backward.
PHASES = ("bank", "weights", "forward", "teacher", "loss", "backward")


class Callback:
    """Does nothing at every point; subclasses override what they need."""

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step (after a resume: its state restored)."""

    def on_phase_begin(self, state: TrainState, name: str) -> None:
        """Before a part of a step (one of PHASES)."""

    def on_phase_end(self, state: TrainState, name: str) -> None:
        """After a part of a step."""

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        """After each step, with its record."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step of a run that ended normally."""

    def close(self) -> None:
        """Always, also when the run fails: release files and bars."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Restore what :meth:`state_dict` saved (a resumed run)."""


class Averages(Callback):
    """Running averages of the costs: an exponential one per decay (per step) and the uniform
    mean over the steps from the share ``tail`` of the run on; their hard plans at the end go
    into ``out`` as ``avg<decay>`` and ``tail<share>``.

    The averages are only read at the end, so when the costs live on a GPU they are kept on
    the host (``on_host``; by default when the costs are not there already; at LLaMA-2-7B width
    three float32 copies of the costs, 15 GiB): each step copies the costs into one pinned buffer
    and a host thread updates the averages while the next step runs (the same float32
    ``lerp_``)."""

    def __init__(self, decays: Sequence[float], tail: float | None,
                 out: dict[str, dict[str, Permutation]] | None = None, on_host: bool | None = None) -> None:
        self.decays, self.tail, self.out, self.on_host = tuple(decays), tail, out, on_host
        self.ema: dict[float, dict[str, torch.Tensor]] = {}
        self.tail_mean: dict[str, torch.Tensor] = {}
        self.tail_n = 0
        self._mirror: HostMirror | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future | None = None

    def on_train_begin(self, state: TrainState) -> None:
        self._bank = state.bank
        params = dict(state.bank.named_parameters())
        on_device = any(p.device.type != "cpu" for p in params.values())
        host = on_device if self.on_host is None else self.on_host
        self._where = torch.device("cpu") if host or not params else next(iter(params.values())).device
        if host and (self.decays or self.tail is not None):  # (on the host itself: the same path, for tests)
            self._mirror = HostMirror(params)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="permsparse-averages")
        # The exponential averages start at the costs the run starts from.
        self.ema = {d: {k: self._keep(p) for k, p in params.items()} for d in self.decays}

    def _keep(self, p: torch.Tensor) -> torch.Tensor:
        """A copy of ``p`` where the averages live."""
        return p.detach().to(self._where, copy=True)

    @torch.no_grad()
    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        in_tail = self.tail is not None and state.progress >= self.tail
        if self._mirror is None:
            self._update(dict(state.bank.named_parameters()), in_tail)
            return
        self._join()
        self._mirror.copy_from(dict(state.bank.named_parameters()))
        self._mirror.guard()  # the next optimizer step waits until the costs are read
        self._job = self._pool.submit(lambda: self._update(self._mirror.wait(), in_tail))

    @torch.no_grad()
    def _update(self, costs: Mapping[str, torch.Tensor], in_tail: bool) -> None:
        for d, e in self.ema.items():
            for k, p in costs.items():
                e[k].lerp_(p.detach(), 1.0 - d)
        if in_tail:
            self.tail_n += 1
            for k, p in costs.items():  # the running mean of the tail's costs
                self.tail_mean[k] = (self._keep(p) if self.tail_n == 1
                                     else self.tail_mean[k].lerp_(p.detach(), 1.0 / self.tail_n))

    def _join(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            job.result()

    def on_train_end(self, state: TrainState) -> None:
        self._join()
        if self.out is None or not state.history:
            return
        self.out.update({f"avg{d:g}": plan_with(state.bank, e) for d, e in self.ema.items()})
        if self.tail_n:
            self.out[f"tail{self.tail:g}"] = plan_with(state.bank, self.tail_mean)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        self._join()
        tensors = {f"ema/{d}/{k}": v for d, e in self.ema.items() for k, v in e.items()}
        tensors.update({f"tail/{k}": v for k, v in self.tail_mean.items()})
        return tensors, {"tail_n": self.tail_n}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        params = dict(self._bank.named_parameters())
        self.ema = {d: {k: self._keep(tensors[f"ema/{d}/{k}"].to(v.dtype)) for k, v in e.items()}
                    for d, e in self.ema.items()}
        if self.tail is not None:
            self.tail_n = int(meta.get("tail_n", 0))
            self.tail_mean = ({k: self._keep(tensors[f"tail/{k}"].to(p.dtype)) for k, p in params.items()}
                              if self.tail_n else {})

    @property
    def nbytes(self) -> int:
        """Bytes the averages hold (on the host when ``on_host``)."""
        held = [v for e in self.ema.values() for v in e.values()] + list(self.tail_mean.values())
        return sum(v.numel() * v.element_size() for v in held)


class StepBudget(Callback):
    """A time budget turned into a step count, fixed once: after ``probe`` steps, the run's
    length becomes the steps that fit in ``budget`` seconds at the pace of the steps after
    the first (which pays one-off costs), less a ``margin``, and at most the run's own
    ``state.steps``. τ and the lr then follow steps against that count, and the count is
    kept in the checkpoint, so a resumed run continues the very schedule of the interrupted
    one (its own pace does not matter) and ends with the same permutations. The budget
    itself still ends a run that falls behind its estimate (see ``train_end_to_end``)."""

    def __init__(self, budget: float, probe: int = 4, margin: float = 0.1) -> None:
        if probe < 2:
            raise ValueError(f"probe must be >= 2 (the first step is not timed), got {probe}")
        self.budget, self.probe, self.margin = budget, probe, margin
        self.fixed: int | None = None  # the run's step count, once fixed
        self._t1 = 0.0  # training time when the first step ended

    def on_train_begin(self, state: TrainState) -> None:
        self._state = state

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        if self.fixed is not None:
            return
        if state.step == 1:
            self._t1 = dist.mean_float(state.clock.elapsed())
        if state.step < self.probe:
            return
        # The mean over ranks: every rank fixes the same count.
        now = dist.mean_float(state.clock.elapsed())
        pace = max((now - self._t1) / (state.step - 1), 1e-9)
        fit = state.step + int(max(self.budget - now, 0.0) * (1.0 - self.margin) / pace)
        self.fixed = max(state.step, min(state.steps, fit))
        if self.fixed < state.steps:
            logging.getLogger(__name__).info(
                "time budget of %.0fs: %d steps at %.2fs a step (of %d for the epochs asked)",
                self.budget, self.fixed, pace, state.steps)
        state.steps = self.fixed

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"budget_steps": self.fixed}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        self.fixed = meta.get("budget_steps")
        if self.fixed is not None:
            self._state.steps = int(self.fixed)


class Snapshots(Callback):
    """The hard plan a step ran with, at ``n`` evenly spaced marks of the run (1/(n+1),
    2/(n+1), ...), into ``out`` as ``{step: plan}``."""

    def __init__(self, n: int, out: dict[int, dict[str, Permutation]]) -> None:
        self.marks = [i / (n + 1) for i in range(1, n + 1)]
        self.out = out

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        # Once per mark passed.
        if len([m for m in self.marks if m <= state.progress]) > len(self.out):
            self.out[log.step] = state.plan

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        # A copy: the snapshot of the last step is the very plan the loop keeps as its last
        # plan (safetensors refuses tensors that share memory).
        tensors = {f"snap/{st}/{n}": p.indices.clone() for st, plan in self.out.items() for n, p in plan.items()}
        return tensors, {"snapshots": {str(st): {n: p.groups for n, p in plan.items()} for st, plan in self.out.items()}}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        for st, plan in meta.get("snapshots", {}).items():
            self.out[int(st)] = {n: Permutation(tensors[f"snap/{st}/{n}"], g) for n, g in plan.items()}


class ProgressBar(Callback):
    """A tqdm bar of the steps with the loss, τ, entropy and moved share (and, under a time
    budget, the time left: tqdm's own ETA counts steps, and the budget may end the run sooner)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def on_train_begin(self, state: TrainState) -> None:
        self.first, self.t_loop = state.step, time.perf_counter()
        self.bar = tqdm(total=state.steps, initial=state.step, desc="learn permutations",
                        disable=not self.enabled or not dist.is_main())

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        if self.bar.total != state.steps:  # a time budget fixed the run's length
            self.bar.total = state.steps
            self.bar.refresh()
        self.bar.update(1)
        post = dict(loss=f"{log.loss:.3f}", tau=f"{log.tau:.3g}", ent=f"{log.entropy:.2f}", moved=f"{log.changed:.1%}")
        budget = state.cfg.time_budget if state.cfg is not None else None
        if budget:
            left = max(budget - state.clock.elapsed(), 0.0)
            by_steps = (time.perf_counter() - self.t_loop) / (state.step - self.first) * (state.steps - state.step)
            post["left"] = f"{min(left, by_steps):.0f}s"
        self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog(Callback):
    """One JSON line per step (:meth:`StepLog.to_json`), appended to ``path`` (rank 0 only)."""

    def __init__(self, path: "str | Path") -> None:
        self.path = Path(path)
        self.file = None

    def on_train_begin(self, state: TrainState) -> None:
        if dist.is_main():
            self.file = open(self.path, "a")

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        if self.file:
            self.file.write(json.dumps(log.to_json()) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class OnStep(Callback):
    """A caller's ``fn(log, state)`` after every step; its time is not training time (the
    clock pauses: a caller's evaluation neither counts against the budget nor anneals τ)."""

    def __init__(self, fn: Callable[[StepLog, TrainState], None]) -> None:
        self.fn = fn

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        with state.clock.paused():
            self.fn(log, state)


class PhaseTimer(Callback):
    """Wall time of each part of every step (:data:`PHASES`), in ``times[name]`` (one entry
    per step). On CUDA it synchronises before and after each part, so the GPU work is charged
    to the part that queued it (which slows the step a little: a measuring tool)."""

    def __init__(self, device: "torch.device | str" = "cpu") -> None:
        self.device = torch.device(device)
        self.times: dict[str, list[float]] = {p: [] for p in PHASES}
        self._t0: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_phase_begin(self, state: TrainState, name: str) -> None:
        self._sync()
        self._t0[name] = time.perf_counter()

    def on_phase_end(self, state: TrainState, name: str) -> None:
        self._sync()
        self.times.setdefault(name, []).append(time.perf_counter() - self._t0.pop(name))

    def medians(self, skip_first: bool = True) -> dict[str, float]:
        """``{"<part>_s": median seconds}`` over the steps; the first step pays one-off costs
        (mask cache, allocator, kernel selection) and is skipped when there are more than two."""
        out = {}
        for part, ts in self.times.items():
            tail = ts[1:] if skip_first and len(ts) > 2 else ts
            out[f"{part}_s"] = round(statistics.median(tail), 4) if tail else float("nan")
        return out

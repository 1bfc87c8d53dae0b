"""What a training run holds while it runs: the step record, the clock and the state object.

:class:`TrainState` is the one object the loop and its callbacks share: what is trained
(the bank and what it is trained against) and where the run stands (step, progress,
temperature, history, the last plan, the batch order and generator, the clock).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.sites import Site
from permsparse.train.bank import PermutationBank, hard_params

__all__ = ["StepLog", "NonFiniteLossError", "Clock", "TrainState"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the bank holds the last good costs."""


@dataclass
class StepLog:
    step: int
    loss: float
    ce: float
    kl: float
    tau: float
    entropy: float
    changed: float  # share of channels whose hard position changed this step
    seconds: float
    lr: float = float("nan")  # the step's learning rate (NaN in logs written before it was recorded)

    def to_json(self) -> dict:
        return asdict(self)


class Clock:
    """Training time: wall time since the start, less the time spent :meth:`paused`
    (a caller's evaluation is not training time); ``elapsed`` carries a resumed run's time."""

    def __init__(self, elapsed: float = 0.0) -> None:
        self._start = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - t0


@dataclass
class TrainState:
    """What the loop and its callbacks share. The first five fields are what a run trains;
    the rest is where it stands (a step callback may read them, the loop writes them)."""

    bank: PermutationBank
    sites: Sequence[Site]
    weights: Mapping[str, torch.Tensor]
    scores: Mapping[str, torch.Tensor]
    pattern: NMPattern
    cfg: LearnConfig | None = None
    opt: torch.optim.Optimizer | None = None
    steps: int = 0  # of the whole run (under a time budget: fixed after its first steps)
    step: int = 0  # steps done (the next step's index)
    progress: float = 0.0  # share of the run at the current step: step / (steps - 1)
    tau: float = math.nan  # the current step's temperature
    history: list[StepLog] = field(default_factory=list)
    plan: dict[str, Permutation] | None = None  # the hard plan the last step ran with
    order: list[int] = field(default_factory=list)  # batch indices left in this epoch (popped from the end)
    generator: torch.Generator = field(default_factory=torch.Generator)  # draws each epoch's batch order
    clock: Clock = field(default_factory=Clock)

    def hard_params(self, perms: Mapping[str, Permutation] | None = None) -> dict[str, torch.Tensor]:
        """Pruned weights at the current (or given) hard permutations, for ``functional_call``."""
        return hard_params(self.sites, perms or self.bank.hard(), self.weights, self.scores, self.pattern)

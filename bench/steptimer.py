"""Where a training step's time goes: wall time of each part of the learned trainer's step.

Wraps, for the duration of a ``with`` block, the functions ``permsparse.train.learn`` calls in a
step: the permutation bank's forward (Sinkhorn + hard assignments), ``sparse_weights``
(``W_eff``), the student's forward (``functional_call``), ``task_loss`` (CE + KL) and
``Tensor.backward``. On CUDA each is synchronised, so the GPU work is charged where it was
queued. Shared by bench/gpu_block.py and bench/step.py.
"""

from __future__ import annotations

import statistics
import time

import torch

import permsparse.train.learn as learn_mod

PARTS = ("bank", "weights", "forward", "loss", "backward")


class StepTimers:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.times: dict[str, list[float]] = {p: [] for p in PARTS}
        self._orig = {
            "bank": learn_mod.PermutationBank.forward,
            "weights": learn_mod.sparse_weights,
            "forward": learn_mod.functional_call,
            "loss": learn_mod.task_loss,
            "backward": torch.Tensor.backward,
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _wrap(self, fn, part: str):
        into = self.times[part]

        def timed(*a, **k):
            self._sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self._sync()
            into.append(time.perf_counter() - t0)
            return out

        return timed

    def __enter__(self) -> "StepTimers":
        learn_mod.PermutationBank.forward = self._wrap(self._orig["bank"], "bank")
        learn_mod.sparse_weights = self._wrap(self._orig["weights"], "weights")
        learn_mod.functional_call = self._wrap(self._orig["forward"], "forward")
        learn_mod.task_loss = self._wrap(self._orig["loss"], "loss")
        torch.Tensor.backward = self._wrap(self._orig["backward"], "backward")
        return self

    def __exit__(self, *exc) -> None:
        learn_mod.PermutationBank.forward = self._orig["bank"]
        learn_mod.sparse_weights = self._orig["weights"]
        learn_mod.functional_call = self._orig["forward"]
        learn_mod.task_loss = self._orig["loss"]
        torch.Tensor.backward = self._orig["backward"]

    def medians(self, steps: int, skip_first: bool = True) -> dict[str, float]:
        """Median seconds per part over the first ``steps`` calls of each: the training
        steps (the student forward and the loss run again in the guard after training;
        the calibration pass calls the model directly). The first step pays one-off costs
        (mask cache, allocator) and is skipped when there are more than two."""
        out = {}
        for part, ts in self.times.items():
            ts = ts[:steps]
            tail = ts[1:] if skip_first and len(ts) > 2 else ts
            out[f"{part}_s"] = round(statistics.median(tail), 4) if tail else float("nan")
        return out

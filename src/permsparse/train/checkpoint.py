"""Resumable training: the whole state of a run in one safetensors file, written atomically.

:class:`Checkpointer` is the loop's last callback: every ``every`` steps (and after the
last) it writes the costs, the optimizer, the step, the batch order, the generator states,
the history, the last plan and what every other callback holds (their ``state_dict``);
:meth:`Checkpointer.restore` puts all of it back, so that the continued run computes
exactly what the uninterrupted one would have. A run key (a hash of everything that must
agree) refuses a checkpoint written by another run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.sites import Site
from permsparse.train import distributed as dist
from permsparse.train.callbacks import Callback
from permsparse.train.state import Clock, StepLog, TrainState

__all__ = ["save_checkpoint", "load_checkpoint", "run_key", "Checkpointer"]

log = logging.getLogger(__name__)

#: LearnConfig fields that do not change what a run computes (a resumed run may change them).
_RUN_ONLY = ("checkpoint_path", "checkpoint_every", "time_budget", "prune_budget", "activation_checkpointing")


def run_key(cfg: LearnConfig, sites: Sequence[Site], groups: int, pattern: NMPattern, n_batches: int,
            costs: Mapping[str, torch.Tensor]) -> str:
    """A hash of everything a checkpoint must agree with to be resumed."""
    desc = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY},
        "sites": [[s.name, list(s.consumers), s.d_in] for s in sites],
        "groups": groups,
        "pattern": str(pattern),
        "batches": n_batches,
        "costs": {k: list(v.shape) for k, v in costs.items()},
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: "str | Path", tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Write ``tensors`` and the JSON ``meta`` into one safetensors file, atomically
    (temporary sibling, fsync, rename): a reader sees the previous checkpoint or this one."""
    from safetensors.torch import save_file

    from permsparse.io.atomic import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"permsparse_state": json.dumps(meta)})
    return Path(path)


def load_checkpoint(path: "str | Path") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get("permsparse_state")
        if meta is None:
            raise ValueError(f"{path} is not a permsparse training checkpoint")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, json.loads(meta)


def _optimizer_tensors(opt: torch.optim.Optimizer, bank: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state split into tensors (by parameter name) and JSON scalars."""
    names = {id(p): n for n, p in bank.named_parameters()}
    tensors, scalars = {}, {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{n}/{k}"] = v
            else:
                scalars[f"{n}/{k}"] = v
    return tensors, scalars


def _restore_optimizer(opt: torch.optim.Optimizer, bank: nn.Module, tensors: Mapping[str, torch.Tensor],
                       scalars: Mapping) -> None:
    for n, p in bank.named_parameters():
        st = {}
        for key, v in tensors.items():
            if key.startswith(f"opt/{n}/"):
                st[key[len(f"opt/{n}/"):]] = v.to(p.device)
        for key, v in scalars.items():
            if key.startswith(f"{n}/"):
                st[key[len(f"{n}/"):]] = v
        if st:
            opt.state[p] = st


class Checkpointer(Callback):
    """Writes the run's state to ``path`` every ``every`` steps and after the last (rank 0
    only), with what each of ``holders`` (the callbacks before it) holds."""

    def __init__(self, path: "str | Path", every: int, key: str, holders: Sequence[Callback]) -> None:
        self.path, self.every, self.key, self.holders = Path(path), every, key, list(holders)
        self._loaded: tuple[dict[str, torch.Tensor], dict] | None = None

    def restore(self, state: TrainState) -> bool:
        """Put the loop's own state back from ``path`` when it exists (the callbacks' in
        :meth:`on_train_begin`, after their own start); False when there is nothing to resume."""
        if not self.path.exists():
            return False
        tensors, meta = load_checkpoint(self.path)
        if meta.get("key") != self.key:
            raise ValueError(
                f"checkpoint {self.path} was written by a different run (other model sites, pattern, groups, "
                f"calibration batches or trainer settings); remove it or drop --resume"
            )
        with torch.no_grad():
            for k, p in state.bank.named_parameters():
                p.copy_(tensors[f"param/{k}"].to(p.device, p.dtype))
        _restore_optimizer(state.opt, state.bank, tensors, meta["opt"])
        state.generator.set_state(torch.tensor(meta["gen"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        state.order = list(meta["order"])
        state.step = int(meta["step"])
        state.clock = Clock(float(meta.get("elapsed", 0.0)))
        state.history = [StepLog(**h) for h in meta["history"]]
        if meta.get("prev") is not None:
            state.plan = {n: Permutation(tensors[f"prev/{n}"], g) for n, g in meta["prev"].items()}
        self._loaded = (tensors, meta)
        log.info("resumed from %s at step %d of %d", self.path, state.step, state.steps)
        return True

    def on_train_begin(self, state: TrainState) -> None:
        if self._loaded is not None:
            for cb in self.holders:
                cb.load_state_dict(*self._loaded)
            self._loaded = None

    def on_step_end(self, state: TrainState, log: StepLog) -> None:
        if state.step % self.every == 0 or state.step == state.steps:
            self.save(state)

    def save(self, state: TrainState) -> None:
        if not dist.is_main():
            return
        tensors = {f"param/{k}": p.detach() for k, p in state.bank.named_parameters()}
        opt_t, opt_s = _optimizer_tensors(state.opt, state.bank)
        tensors.update(opt_t)
        if state.plan is not None:
            tensors.update({f"prev/{n}": p.indices for n, p in state.plan.items()})
        meta = {
            "key": self.key, "step": state.step, "steps": state.steps, "order": state.order, "opt": opt_s,
            "gen": state.generator.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
            "elapsed": state.clock.elapsed(), "history": [h.to_json() for h in state.history],
            "prev": {n: p.groups for n, p in state.plan.items()} if state.plan is not None else None,
        }
        for cb in self.holders:
            t, m = cb.state_dict()
            tensors.update(t)
            meta.update(m)
        save_checkpoint(self.path, tensors, meta)

"""The end-to-end trainer: learn every site's permutation from the model's loss, the model frozen.

Each step builds ``W_eff = (W P ⊙ M) Pᵀ`` for every pruned layer from the straight-through
permutations of all sites, runs the model with those weights (``torch.func.functional_call``;
the model's own parameters never change), and descends ``CE + α · KL(dense ‖ sparse)`` on
the costs only; a model without logits (an encoder) descends the distance of its last hidden
states to the dense model's instead (``LearnConfig.hidden_loss``). Everything else a run
does (averages of the costs, snapshots, the progress bar, the metrics file, checkpoints, a
caller's hook, timing) is a callback (:mod:`permsparse.train.callbacks`) around that step.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.profiler import record_function

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.core.sinkhorn import TemperatureSchedule
from permsparse.models.precision import bf16_on
from permsparse.models.sites import Site
from permsparse.train import distributed as dist
from permsparse.train.bank import make_bank, moved_share, sparse_weights, step_weights, weights_by_block
from permsparse.train.callbacks import Averages, Callback, MetricsLog, OnStep, ProgressBar, Snapshots, StepBudget
from permsparse.train.checkpoint import Checkpointer, run_key
from permsparse.train.hostcopy import HostMirror
from permsparse.train.loss import autocast, dense_target, has_logits, hidden_loss, model_inputs, task_loss
from permsparse.train.optim import anneal_lr, make_optimizer
from permsparse.train.recompute import no_cache_kwargs, recomputed_blocks
from permsparse.train.state import NonFiniteLossError, StepLog, TrainState

__all__ = ["train_end_to_end", "make_batches"]

log = logging.getLogger(__name__)


def make_batches(windows: "torch.Tensor | Sequence[Mapping]", batch_size: int) -> list[dict]:
    """Batches of ``batch_size`` token windows ``(n, T)``, or the given list of batch dicts."""
    if isinstance(windows, torch.Tensor):
        return [{"input_ids": windows[i : i + batch_size]} for i in range(0, windows.shape[0], batch_size)]
    return list(windows)


def train_end_to_end(
    model: nn.Module,
    sites: Sequence[Site],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    groups: int,
    calib: "torch.Tensor | Sequence[Mapping]",
    cfg: LearnConfig,
    start: Mapping[str, Permutation] | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
    on_step: "Callable[[StepLog, TrainState], None] | Callback | None" = None,
    resume: bool = False,
    snapshots: dict[int, dict[str, Permutation]] | None = None,
    averaged: dict[str, dict[str, Permutation]] | None = None,
    teachers: Sequence[torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    refit: "Callable[[Mapping[str, Permutation]], Mapping[str, torch.Tensor]] | None" = None,
) -> tuple[dict[str, Permutation], list[StepLog]]:
    """Learn the hard permutation of every site end to end; returns ``(perms, history)``.

    ``scores`` hold each consumer's score in original coordinates; ``start`` the warm
    start (heuristic) permutations when ``cfg.init == "heuristic"``. ``teachers``: the dense
    logits (hidden states, for a model without logits) of each calibration batch (see
    :class:`~permsparse.train.guard.TeacherCache`), used instead of a teacher forward at every step.

    ``snapshots``: a dict this fills with ``{step: hard plan of that step}`` at
    ``cfg.snapshots`` evenly spaced points of the run (for the guard to weigh);
    ``averaged``: a dict this fills with ``{"avg<decay>": ...}`` (the plan of the running
    average of the costs, per decay in ``cfg.average``) and ``{"tail<share>": ...}`` (of
    their uniform average from that share of the run on, ``cfg.tail_average``).
    ``on_step``: ``fn(step_log, state)`` after every step (its time is not training time),
    or a :class:`~permsparse.train.callbacks.Callback`; ``callbacks``: more of them, called
    in order after the library's own and before the checkpoint.

    ``cfg.checkpoint_path``: every ``cfg.checkpoint_every`` steps (and after the last) the
    whole state is written there atomically; ``resume=True`` continues from it when it
    exists, and the continued run computes exactly what the uninterrupted one would have.
    ``cfg.time_budget``: the run's step count is fixed once, from the pace of its first
    steps (:class:`~permsparse.train.callbacks.StepBudget`), and kept in the checkpoint, so
    that τ and the lr follow the same schedule after a resume.

    ``refit``: ``fn(plan) -> {consumer: W}``, the weights to permute once the kept weights are
    refitted under ``plan`` (see :func:`~permsparse.api.learn_permutations`); with
    ``cfg.refit_every`` the steps take them from the current plan every that many steps (and at a
    resumed run's first), so the loss is the refitted model's.

    Under ``torch.distributed`` each rank runs its shard of every global batch and the
    cost gradients are averaged over ranks (see :mod:`permsparse.train.distributed`); only
    rank 0 writes the metrics and the checkpoint.
    """
    if resume and not cfg.checkpoint_path:
        raise ValueError("resume needs a checkpoint path (LearnConfig.checkpoint_path / --checkpoint)")
    run, state = _start(model, sites, scores, pattern, groups, calib, cfg, start, teachers, refit)
    cbs = _callbacks(cfg, averaged, snapshots, progress, metrics_path, on_step, callbacks)
    if cfg.checkpoint_path:
        key = run_key(cfg, sites, groups, pattern, len(run.batches), dict(state.bank.named_parameters()))
        ckpt = Checkpointer(cfg.checkpoint_path, cfg.checkpoint_every, key, holders=list(cbs))
        if resume:
            ckpt.restore(state)
        cbs.append(ckpt)
    run.good = HostMirror(state.bank.state_dict())
    run.good.copy_from(state.bank.state_dict())
    try:
        for cb in cbs:
            cb.on_train_begin(state)
        while state.step < state.steps:
            if not _advance(state):
                break
            rec = _train_step(run, state, cbs)
            state.history.append(rec)
            state.step += 1
            for cb in cbs:
                cb.on_step_end(state, rec)
        for cb in cbs:
            cb.on_train_end(state)
    finally:
        for cb in cbs:
            cb.close()
    return state.bank.hard(), state.history


def _callbacks(cfg: LearnConfig, averaged, snapshots, progress: bool, metrics_path: Path | None, on_step,
               callbacks: Sequence[Callback]) -> list[Callback]:
    """The run's callbacks in the order they are called (the checkpoint comes after them)."""
    # First: it fixes the run's length under a time budget, which the others read.
    cbs: list[Callback] = [StepBudget(cfg.time_budget)] if cfg.time_budget else []
    cbs.append(Averages(cfg.average, cfg.tail_average, averaged))
    if snapshots is not None:
        cbs.append(Snapshots(cfg.snapshots, snapshots))
    cbs.append(ProgressBar(progress))
    if metrics_path:
        cbs.append(MetricsLog(metrics_path))
    if on_step is not None:
        cbs.append(on_step if isinstance(on_step, Callback) else OnStep(on_step))
    return cbs + list(callbacks)


@dataclass
class _Run:
    """What every step of one run reads: the model, its batches and teachers, the weights
    steps build ``W_eff`` from, the temperature schedule, the mask cache."""

    model: nn.Module
    device: torch.device
    batches: list[dict]
    teachers: Sequence[torch.Tensor] | None
    step_weights: Mapping[str, torch.Tensor]
    schedule: TemperatureSchedule
    masks: dict = field(default_factory=dict)
    good: HostMirror | None = None  # the bank's costs before the last good step (on the host)
    modules: frozenset[str] = frozenset()  # the model's module names (the blocks to checkpoint among them)
    call_kwargs: dict = field(default_factory=dict)  # for every forward: no KV cache
    refit: Callable | None = None  # plan -> refitted weights (``train_end_to_end``'s ``refit``)
    refitted_at: int | None = None  # the step whose plan the step weights were last refitted under

    def teacher(self, idx: int, batch: Mapping[str, torch.Tensor], needed: bool) -> torch.Tensor | None:
        """The dense model's logits (hidden states, for a model without logits) of batch ``idx``."""
        if not needed:
            return None
        if self.teachers is not None:
            return self.teachers[idx].to(self.device)
        with torch.no_grad():
            return dense_target(self.model(**model_inputs(batch), **self.call_kwargs))


def _start(model, sites, scores, pattern, groups, calib, cfg: LearnConfig, start, teachers,
           refit=None) -> tuple[_Run, TrainState]:
    """The run's constants and its state at step 0."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    weights = {c: model.get_submodule(c).weight.detach() for s in sites for c in s.consumers}
    bank = make_bank(sites, groups, pattern, start, cfg, scores).to(device)
    batches = make_batches(calib, cfg.batch_size)
    if teachers is not None and len(teachers) != len(batches):
        raise ValueError(f"{len(teachers)} teacher logits for {len(batches)} calibration batches")
    steps = max(1, int(round(cfg.epochs * len(batches))))
    schedule = TemperatureSchedule(cfg.tau_start, cfg.tau_end, steps, cfg.tau_schedule)
    run = _Run(model, device, batches, teachers, step_weights(weights, cfg), schedule,
               modules=frozenset(n for n, _ in model.named_modules()), call_kwargs=no_cache_kwargs(model),
               refit=refit if cfg.refit_every else None)
    state = TrainState(bank, sites, weights, scores, pattern, cfg=cfg, opt=make_optimizer(bank.parameters(), cfg),
                       steps=steps, generator=torch.Generator().manual_seed(cfg.seed))
    return run, state


def _advance(state: TrainState) -> bool:
    """Set the coming step's share of the run (by steps: under a time budget, against the
    count :class:`~permsparse.train.callbacks.StepBudget` fixed); False when the time budget
    is spent."""
    cfg = state.cfg
    state.progress = state.step / max(state.steps - 1, 1)
    if cfg.time_budget:
        elapsed = state.clock.elapsed()
        if dist.any_flag(elapsed >= cfg.time_budget):
            log.warning("time budget of %.0fs reached after %d of %d steps (tau %.3g, not yet its end)",
                        cfg.time_budget, state.step, state.steps, state.tau)
            return False
    return True


@contextmanager
def _phase(cbs: Sequence[Callback], state: TrainState, name: str) -> Iterator[None]:
    """One part of a step: a profiler range, and the callbacks told when it begins and ends."""
    with record_function(f"permsparse.{name}"):
        for cb in cbs:
            cb.on_phase_begin(state, name)
        yield
        for cb in cbs:
            cb.on_phase_end(state, name)


def _refit_weights(run: _Run, state: TrainState) -> None:
    """The step weights from the refit of the bank's current hard plan (see ``train_end_to_end``)."""
    refitted = run.refit(state.bank.hard())
    run.step_weights = step_weights({c: refitted[c].to(w.device, w.dtype) for c, w in state.weights.items()},
                                    state.cfg)
    run.refitted_at = state.step
    log.debug("step %d: the trainer's weights refitted under its current plan", state.step)


def _train_step(run: _Run, state: TrainState, cbs: Sequence[Callback]) -> StepLog:
    """One optimizer step on the next batch; the step's record."""
    t0 = time.perf_counter()
    cfg, bank = state.cfg, state.bank
    if run.refit is not None and (run.refitted_at is None or state.step % cfg.refit_every == 0):
        with record_function("permsparse.refit"):  # not a phase: only some steps refit
            _refit_weights(run, state)
    if not state.order:
        state.order = torch.randperm(len(run.batches), generator=state.generator).tolist()
    idx = state.order.pop()
    batch = {k: v.to(run.device) for k, v in dist.shard_batch(run.batches[idx]).items()}
    state.tau = tau = run.schedule.at(state.progress)
    anneal_lr(state.opt, cfg, state.progress)
    with _phase(cbs, state, "bank"):
        out, _ = bank(tau, cfg.sinkhorn_iters, entropy=False)  # the backward measures the entropy

    grad_dtype = torch.bfloat16 if bf16_on(cfg.bf16, run.device) else None

    def build(sites: Sequence[Site], prefix: str) -> dict[str, torch.Tensor]:
        return sparse_weights(out, sites, run.step_weights, state.scores, state.pattern, prefix_strip=prefix,
                              mask_cache=run.masks, grad_dtype=grad_dtype)

    with _phase(cbs, state, "weights"):
        # Activation checkpointing: each block builds its W_eff inside (in the forward phase).
        blocks = run.modules if cfg.activation_checkpointing else ()
        params, per_block = weights_by_block(out, state.sites, blocks, build)
    with autocast(cfg.bf16, run.device):
        with _phase(cbs, state, "forward"), recomputed_blocks(run.model, per_block):
            inputs = {**model_inputs(batch), **run.call_kwargs}
            y = functional_call(run.model, params, (), inputs, strict=False)
        with _phase(cbs, state, "teacher"):  # a model without logits always learns against the dense one
            teacher = run.teacher(idx, batch, cfg.alpha > 0 or not has_logits(y))
    with _phase(cbs, state, "loss"):
        if has_logits(y):
            loss, ce, kl = task_loss(y.logits, batch, teacher, cfg.alpha)
        else:
            loss, ce, kl = hidden_loss(dense_target(y), teacher, batch.get("attention_mask"), cfg.hidden_loss)
    # The global mean (equal shards) so that every rank takes the same decisions.
    vals = dist.all_reduce_mean_(torch.stack([loss.detach(), ce.detach(), kl.detach()]).double().cpu())
    loss_v, ce_v, kl_v = (float(v) for v in vals)
    if not math.isfinite(loss_v):
        bank.load_state_dict(run.good.wait())
        raise NonFiniteLossError(
            f"loss became {loss_v} at step {state.step} (tau={tau:.3g}); kept the costs of the last "
            f"good step. Try a lower learning rate (--lr) or a higher final temperature (--tau-end)."
        )
    run.good.copy_from(bank.state_dict())  # on a GPU: copied to the host during the backward
    state.opt.zero_grad(set_to_none=True)
    with _phase(cbs, state, "backward"):
        loss.backward()
    dist.all_reduce_grads_(bank.parameters())
    run.good.guard()
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)  # the gradients need not hold memory during the next forward
    cur = {n: p for n, (_, p) in out.items()}
    rec = StepLog(state.step, loss_v, ce_v, kl_v, tau, bank.entropy, moved_share(state.plan, cur),
                  time.perf_counter() - t0, state.opt.param_groups[0]["lr"])
    state.plan = cur
    return rec

"""One call from a dense model to a pruned one: ``permsparse.prune(model, tokenizer, config)``.

calibrate → score → permutation per site (none | heuristic | learned) → masks → ``W_eff``
written in place (original coordinates). The result carries the sites, the hard
permutations, per-site retained scores, the training history and which plan the guard
kept. :func:`plan_candidates` is the same run stopped before the masks: calibrate and
search once, then prune copies of the dense model with any candidate plan. Exporting,
evaluating and reporting are separate steps (``io``, ``evaluate``, ``report``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from permsparse.config import PruneConfig
from permsparse.core.pattern import parse_pattern
from permsparse.core.permutation import Permutation
from permsparse.core.reconstruct import restored_weights
from permsparse.models.apply import SiteReport, write_weights_
from permsparse.models.sites import Site, get_module
from permsparse.pipeline.blockwise import identity_plan, prune_blockwise
from permsparse.pipeline.calibration import (
    AUTO_MAX_GROUP,
    Calibration,
    calibrate,
    pattern_sites,
    resolve_groups,
    resolved,
    score_sites,
)
from permsparse.train import distributed as dist
from permsparse.train.state import StepLog
from permsparse.train.guard import (evaluate_params, evaluate_plan, holdout_split, lowest_loss, refit_finalists,
                                    refit_round, teacher_logits)
from permsparse.train.loop import make_batches, train_end_to_end

__all__ = ["PruneResult", "prune", "CandidatePlans", "plan_candidates", "Calibration", "calibrate", "score_sites",
           "learn_permutations", "resolve_groups", "AUTO_MAX_GROUP"]

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    sites: list[Site]
    perms: dict[str, Permutation]
    reports: list[SiteReport]
    history: list[StepLog] = field(default_factory=list)
    kept_plan: str = "none"
    guard: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    learned: dict[str, Permutation] = field(default_factory=dict)  # what training ended with, kept or not
    groups: int = 0  # the G used (``PruneConfig.groups`` resolved)
    config: PruneConfig | None = None  # what the run used (``groups`` resolved)

    def retained(self) -> dict[str, float]:
        """Mean retained score fraction over sites, plain N:M vs with the permutations."""
        ok = [r for r in self.reports if r.retained == r.retained]  # drop NaN (unstructured)
        if not ok:
            return {}
        return {
            "retained_plain": sum(r.retained_plain for r in ok) / len(ok),
            "retained": sum(r.retained for r in ok) / len(ok),
            "retained_ceiling": sum(r.retained_ceiling for r in ok) / len(ok),
        }

    def save_pretrained(
        self,
        out_dir: "str | Path",
        model: nn.Module,
        tokenizer=None,
        *,
        metrics: Mapping | None = None,
        config: Mapping | None = None,
        overwrite: bool = False,
        extra_files: Mapping | None = None,
    ) -> Path:
        """Write the pruned ``model`` (and ``tokenizer``) with this result's plan to ``out_dir``:
        a stock Hugging Face folder plus ``permsparse.json``, which records :attr:`config` (the
        schema ``permsparse prune --recipe`` reads) and, unless ``metrics`` is given, the kept
        plan, the guard's losses and the retained scores. :func:`permsparse.export` with what
        the result knows; :func:`permsparse.from_pretrained` loads it back.

        Raises:
            ValueError: a result without a config (not made by :func:`prune`), or a model
                that does not match the plan (see :func:`permsparse.export`).
            FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        """
        from permsparse.io.export import export

        if self.config is None:
            raise ValueError("this PruneResult carries no config (not made by prune()); use permsparse.export")
        if metrics is None:
            metrics = {"kept_plan": self.kept_plan, "guard": self.guard, **self.retained()}
        return export(model, out_dir, self.sites, self.perms, pattern=self.config.pattern, score=self.config.score,
                      groups=self.groups, tokenizer=tokenizer, metrics=metrics, overwrite=overwrite,
                      config=self.config.to_json() if config is None else config, extra_files=extra_files)


def prune(
    model: nn.Module,
    tokenizer=None,
    config: PruneConfig | None = None,
    calib: "torch.Tensor | Sequence[Mapping[str, torch.Tensor]] | None" = None,
    metrics_path: "str | Path | None" = None,
    on_step=None,
    resume: bool = False,
) -> PruneResult:
    """Prune ``model`` in place to ``config.pattern`` and return what was done.

    ``calib``: calibration windows ``(n, T)`` of token ids, or a list of batch dicts
    (e.g. ``pixel_values`` and ``labels`` for a classifier). Only magnitude pruning
    without learning needs none. ``tokenizer`` is accepted for API symmetry with
    transformers (it is not needed once ``calib`` is tokenized). ``metrics_path``: a
    JSONL file of per-step training records (the block-wise objective appends them at the
    end); ``on_step(step_log, bank)``: called after every end-to-end training step (its own
    time is not counted as training time). ``resume``: continue the end-to-end training from
    ``config.learn.checkpoint_path`` if it exists.

    ``config.learn.objective="auto"`` (the default) learns a causal language model, or a model
    without a head, of one stack of blocks block by block and every other model end to end (see
    :func:`~permsparse.pipeline.calibration.resolve_objective`); ``result.config`` holds
    the objective it chose.

    Under ``torch.distributed`` (see :mod:`permsparse.train.distributed`) every rank calls this
    with the same model and data: statistics and the end-to-end training are sharded over
    the ranks, which all end with the same pruned model. ``offload=True`` streams the
    model block by block (it implies the block-by-block path). ``spread_blocks=True``
    (block-wise) learns every block against the dense model's inputs and splits the
    blocks over the ranks (see :mod:`permsparse.pipeline.blockwise`).
    """
    cfg = config or PruneConfig()
    t0 = time.perf_counter()
    pattern = parse_pattern(cfg.pattern)
    needs_data = cfg.score != "magnitude" or cfg.permutation == "learned"
    if needs_data and (calib is None or len(calib) == 0):  # an empty set would prune by magnitude unsaid
        raise ValueError(f"score {cfg.score!r} with permutation {cfg.permutation!r} needs calibration data "
                         f"(got {'none' if calib is None else 'an empty set'})")
    batches = make_batches(calib, cfg.learn.batch_size) if calib is not None else []
    sites, cfg = pattern_sites(model, cfg, batches)
    permutation = cfg.permutation if pattern is not None else "none"
    if permutation == "learned" and cfg.learn.refit_every and not (cfg.learn.objective == "e2e" and cfg.refits):
        log.warning("refit_every is ignored: it needs the end-to-end objective (this run: %s) and reconstruction "
                    "(this run: %s)", cfg.learn.objective, "on" if cfg.refits else "off")
    model.requires_grad_(False)
    walk = None
    if (cfg.sequential or cfg.offload or cfg.spread_blocks
            or (permutation == "learned" and cfg.learn.objective == "blockwise")):
        walk = prune_blockwise(model, sites, pattern, cfg, permutation, batches)
        result = PruneResult(sites, walk.perms, walk.reports, walk.history, walk.kept_plan, walk.guard)
        if metrics_path and walk.history and dist.is_main():  # as the end-to-end loop appends them
            with open(metrics_path, "a") as f:
                f.writelines(json.dumps(h.to_json()) + "\n" for h in walk.history)
    else:
        plans = plan_candidates(model, cfg, batches, sites=sites, metrics_path=metrics_path, on_step=on_step,
                                resume=resume)
        result = plans.prune_(model)
    result.seconds = time.perf_counter() - t0
    result.groups = walk.groups if walk is not None else cfg.groups
    result.config = cfg
    log.info("pruned %d sites in %.1fs (kept plan: %s)", len(sites), result.seconds, result.kept_plan)
    return result


@dataclass
class CandidatePlans:
    """One calibration and search, and the plans it offers: ``none``, and with a pattern
    ``heuristic`` and (learned runs) ``learned``. Any of them prunes the calibrated model or
    a copy of it; ``kept`` is the one ``prune`` applies."""

    calibration: Calibration
    plans: dict[str, dict[str, Permutation]]
    kept: str
    history: list[StepLog] = field(default_factory=list)
    guard: dict[str, float] = field(default_factory=dict)
    learn_seconds: float = 0.0
    #: ``(plan, weights, reports)`` of a plan already pruned (the refitting guard's choice), reused
    applied: tuple | None = field(default=None, repr=False)

    @property
    def sites(self) -> list[Site]:
        return self.calibration.sites

    @property
    def cfg(self) -> PruneConfig:
        return self.calibration.cfg

    def prune_(self, model: nn.Module, plan: str | None = None) -> PruneResult:
        """Prune ``model`` in place with ``plan`` (default: the kept one)."""
        plan = plan or self.kept
        perms = self.plans[plan]
        if self.applied is not None and self.applied[0] == plan:
            write_weights_(model, self.applied[1])
            reports = self.applied[2]
        else:
            reports = self.calibration.apply_(model, perms)
        return PruneResult(self.sites, perms, reports, self.history, self.kept, self.guard,
                           learned=self.plans.get("learned", {}), groups=self.cfg.groups)

    def pruned(self, dense: nn.Module, plan: str | None = None) -> tuple[nn.Module, PruneResult]:
        """A copy of ``dense`` pruned with ``plan`` (default: the kept one), and what was done."""
        model = copy.deepcopy(dense)
        return model, self.prune_(model, plan)


def plan_candidates(
    model: nn.Module,
    cfg: PruneConfig,
    calib: "torch.Tensor | Sequence[Mapping[str, torch.Tensor]] | None" = None,
    *,
    sites: Sequence[Site] | None = None,
    calibration: Calibration | None = None,
    bf16_calibration: bool | None = None,
    metrics_path: "str | Path | None" = None,
    on_step=None,
    resume: bool = False,
) -> CandidatePlans:
    """Calibrate and search ``model`` once, as :func:`prune` does, and return the candidate
    plans without pruning it (``model`` is left dense).

    ``calibration``: reuse one made by :func:`calibrate` instead of calibrating again (only
    the trainer's settings of ``cfg`` may differ from its own). ``bf16_calibration``: the
    calibration pass under bfloat16 autocast; ``None`` = as :func:`prune`, i.e. when the
    run learns in bfloat16 (the pass's dense logits then serve as the trainer's teacher);
    ``False`` gives the float32 statistics of a ``prune`` without learning, so that the
    ``none`` and ``heuristic`` plans prune exactly as such a ``prune`` does.
    """
    pattern = parse_pattern(cfg.pattern)
    permutation = cfg.permutation if pattern is not None else "none"
    learn = permutation == "learned"
    if calibration is None:
        batches = make_batches(calib, cfg.learn.batch_size) if calib is not None else []
        if learn:
            # a holdout that leaves nothing to train on fails before the calibration
            holdout_split(len(batches), cfg.learn.guard_batches, cfg.learn.guard_holdout)
        bf16 = learn and cfg.learn.bf16 if bf16_calibration is None else bf16_calibration
        # The cached teacher is the trainer's only when the pass ran under the trainer's autocast.
        cache = learn and bf16 == cfg.learn.bf16 and cfg.learn.alpha > 0 and cfg.learn.teacher_cache_gb > 0
        calibration = calibrate(model, cfg, batches, sites=sites, heuristic=permutation != "none", bf16=bf16,
                                teacher_cache=cache)
    cfg = calibration.check_fits(cfg)
    plans: dict[str, dict[str, Permutation]] = {"none": {}}
    if permutation != "none":
        if not calibration.heuristic:
            raise ValueError(f"permutation {permutation!r} needs a calibration with the heuristic plan "
                             "(calibrate(..., heuristic=True))")
        plans["heuristic"] = calibration.heuristic
    if not learn:
        return CandidatePlans(calibration, plans, permutation)
    t0 = time.perf_counter()
    plans, history, guard, kept = learn_permutations(
        model, calibration.sites, calibration.scores, calibration.heuristic, cfg, calibration.batches,
        metrics_path, on_step, resume, teachers=calibration.teachers,
        refit=(lambda perms: calibration.weights(model, perms)[0]) if cfg.refits else None,
        hessians={c: st.xxt for c, st in calibration.stats.items()} if cfg.refits else None)
    applied = None
    # (A trainer that saw the refit had its guard refit every plan already.)
    if cfg.learn.guard_refit and cfg.updates_weights and not (cfg.refits and cfg.learn.refit_every):
        kept, applied = _guard_refitted(model, calibration, plans, guard, cfg)
    return CandidatePlans(calibration, plans, kept, history, guard, time.perf_counter() - t0, applied)


def _guard_inputs(model: nn.Module, cfg: PruneConfig, batches: Sequence[dict],
                  teachers: Sequence[torch.Tensor] | None) -> tuple[list[dict], list | None]:
    """The guard's batches (each rank its shard) and their dense targets (``None`` without distillation):
    the first ``guard_batches``, or with ``guard_holdout`` the last (see :func:`~permsparse.train.guard.holdout_split`)."""
    picked = holdout_split(len(batches), cfg.learn.guard_batches, cfg.learn.guard_holdout)[1]
    guard_batches = [dist.shard_batch(batches[i]) for i in picked]
    if cfg.learn.alpha <= 0:
        return guard_batches, None
    if teachers is not None:
        return guard_batches, [teachers[i] for i in picked]
    return guard_batches, teacher_logits(model, guard_batches, cfg.learn.bf16)


def _guard_refitted(model: nn.Module, calibration: Calibration, plans: Mapping[str, Mapping[str, Permutation]],
                    guard: dict[str, float], cfg: PruneConfig) -> tuple[str, tuple]:
    """The guard's last round where pruning refits the kept weights: the finalists (the learned
    plan, the heuristic, and no permutation where it beat the heuristic under the plain mask)
    pruned as the model will be, compared on the guard's batches. Their losses join ``guard`` as
    ``<plan>+refit``; returns the kept plan and ``(plan, weights, reports)`` of it, which the
    final prune reuses. Holds two plans' weights at a time."""
    finalists = refit_finalists(guard)
    batches, teachers = _guard_inputs(model, cfg, calibration.batches, calibration.teachers)

    def evaluate(name: str) -> tuple[float, tuple]:
        weights, reports = calibration.weights(model, plans[name])
        params = {f"{k}.weight": w for k, w in weights.items()}
        loss = dist.mean_float(evaluate_params(model, params, batches, cfg.learn.alpha, cfg.learn.bf16, teachers,
                                               cfg.learn.hidden_loss))
        return loss, (name, weights, reports)

    kept, applied = refit_round(guard, finalists, evaluate)  # ties keep the earlier, so the learned plan
    log.info("guard after the refit: %s; kept %s",
             ", ".join(f"{k} {guard[f'{k}+refit']:.4f}" for k in finalists), kept)
    return kept, applied


def _weights(model: nn.Module, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    return {c: get_module(model, c).weight.detach() for s in sites for c in s.consumers}


def _learned_plan_origin(plan: str, steps: int) -> str:
    """Words for which of the run's own plans ``learned@...`` is."""
    which = plan.split("@")[1]
    if which.startswith("avg"):
        return f"that of the averaged costs (decay {which[3:]})"
    if which.startswith("tail"):
        return f"that of the costs averaged over the run from {float(which[4:]):.0%} of it on"
    return f"the one of step {which} of {steps}"


def learn_permutations(
    model: nn.Module,
    sites: Sequence[Site],
    scores: Mapping[str, torch.Tensor],
    heuristic: Mapping[str, Permutation],
    cfg: PruneConfig,
    batches: Sequence[dict],
    metrics_path: "str | Path | None" = None,
    on_step=None,
    resume: bool = False,
    teachers: Sequence[torch.Tensor] | None = None,
    refit: "Callable[[Mapping[str, Permutation]], Mapping[str, torch.Tensor]] | None" = None,
    hessians: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, dict[str, Permutation]], list[StepLog], dict[str, float], str]:
    """Train end to end, then the guard: ``(candidates, history, guard_losses, kept_plan)``.

    ``candidates`` maps ``none`` / ``heuristic`` / ``learned`` to their permutations;
    ``kept_plan`` is the one with the lowest calibration loss (ties favour ``learned``).
    ``learned`` is the best of the run's own plans: the last one, one of the
    ``cfg.learn.snapshots`` taken during training, or the plan of a running average of
    the costs (``cfg.learn.average``, ``cfg.learn.tail_average``), whichever has the lowest
    calibration loss
    (``guard_losses`` holds the others as ``learned@<step>``, ``learned@avg<decay>`` and
    ``learned@tail<share>``). ``refit``: ``fn(plan) -> {consumer: W'}``, the weights pruning
    writes under a plan, and ``hessians`` each consumer's ``XᵀX``: with ``cfg.learn.refit_every``
    the trainer permutes ``W'`` completed by :func:`~permsparse.core.reconstruct.restored_weights`
    (see :func:`~permsparse.train.loop.train_end_to_end`), and the guard weighs every plan refitted.
    """
    cfg = resolved(cfg, sites)
    pattern = parse_pattern(cfg.pattern)
    snapshots: dict[int, dict[str, Permutation]] = {}
    averaged: dict[str, dict[str, Permutation]] = {}
    weights = _weights(model, sites)
    refitted = refit is not None and cfg.learn.refit_every > 0
    if refitted and hessians is None:
        raise ValueError("refit_every needs each layer's Hessian (hessians) beside refit")

    def restored(plan: Mapping[str, Permutation]) -> dict[str, torch.Tensor]:
        return {c: restored_weights(weights[c], w, hessians[c]) for c, w in refit(plan).items()}

    train = holdout_split(len(batches), cfg.learn.guard_batches, cfg.learn.guard_holdout)[0]
    learned, history = train_end_to_end(
        model, sites, scores, pattern, cfg.groups, [batches[i] for i in train], cfg.learn,
        start=heuristic, metrics_path=Path(metrics_path) if metrics_path else None, progress=cfg.progress,
        on_step=on_step, resume=resume, snapshots=snapshots, averaged=averaged,
        teachers=None if teachers is None else [teachers[i] for i in train],
        refit=restored if refitted else None,
    )
    candidates = {"none": identity_plan(sites, cfg.groups), "heuristic": dict(heuristic), "learned": learned}
    last = len(history) - 1
    candidates.update({f"learned@{st}": plan for st, plan in sorted(snapshots.items()) if st < last})
    candidates.update({f"learned@{k}": plan for k, plan in averaged.items()})
    guard_batches, teachers = _guard_inputs(model, cfg, batches, teachers)

    def loss_of(cand: Mapping[str, Permutation]) -> float:
        # A trainer that learned for the refitted model is judged by it: every plan refitted.
        if refitted:
            params = {f"{k}.weight": w for k, w in refit(cand).items()}
            loss = evaluate_params(model, params, guard_batches, cfg.learn.alpha, cfg.learn.bf16, teachers,
                                   cfg.learn.hidden_loss)
        else:
            loss = evaluate_plan(model, sites, cand, weights, scores, pattern, guard_batches, cfg.learn.alpha,
                                 cfg.learn.bf16, teachers, cfg.learn.hidden_loss)
        return dist.mean_float(loss)  # each rank its shard; equal shards, so the mean is the global loss

    guard = {name: loss_of(cand) for name, cand in candidates.items()}
    plan = lowest_loss(guard, prefer="learned")
    log.info("guard (calibration loss%s): %s; kept %s", ", every plan refitted" if refitted else "",
             ", ".join(f"{k} {v:.4f}" for k, v in guard.items()), plan)
    if plan.startswith("learned@"):
        # The learned result is the best of its own plans: an earlier one won the guard.
        candidates["learned"] = candidates[plan]
        log.info("the learned plan is %s (calibration loss %.4f against %.4f at the end)",
                 _learned_plan_origin(plan, last + 1), guard[plan], guard["learned"])
        plan = "learned"
    for k in [k for k in candidates if k.startswith("learned@")]:
        del candidates[k]
    return candidates, history, guard, plan

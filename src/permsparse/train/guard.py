"""The guard's measure of a plan: the calibration loss of the model pruned with it, and the
dense teacher outputs that loss distils from (computed once, or kept from calibration): the
logits, or for a model without logits (an encoder) the last hidden states."""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.sites import Site
from permsparse.train.bank import hard_params
from permsparse.train.loss import autocast, dense_target, has_logits, hidden_loss, model_inputs, task_loss

__all__ = ["evaluate_plan", "holdout_split", "evaluate_params", "lowest_loss", "refit_finalists", "refit_round", "teacher_logits",
           "TeacherCache"]

log = logging.getLogger(__name__)


class TeacherCache:
    """Collects the dense model's logits (hidden states, without logits: :func:`dense_target`)
    batch by batch (``collect_stats``'s ``on_output``), in float16 on the host, up to
    ``budget_gb``; past it, it drops them and keeps none (``logits`` is then ``None``) so that
    the trainer recomputes its teacher instead."""

    def __init__(self, budget_gb: float) -> None:
        self.budget = budget_gb * 2**30
        self.bytes = 0
        self._logits: list[torch.Tensor] | None = []

    def __call__(self, index: int, output) -> None:
        if self._logits is None:
            return
        if index != len(self._logits):
            raise ValueError(f"teacher cache: batch {index} arrived after {len(self._logits)} batches")
        t = dense_target(output).detach().to("cpu", torch.float16)
        self.bytes += t.numel() * t.element_size()
        if self.bytes > self.budget:
            log.info("teacher logits exceed %.1f GiB: the trainer recomputes them at every step",
                     self.budget / 2**30)
            self._logits = None
            return
        self._logits.append(t)

    @property
    def logits(self) -> list[torch.Tensor] | None:
        return self._logits


def teacher_logits(model: nn.Module, batches: Sequence[dict], bf16: bool) -> list[torch.Tensor | None]:
    """The dense model's logits (hidden states, without logits) for ``batches``, computed
    once and reused by every plan."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), autocast(bf16, device):
        for batch in batches:
            out.append(dense_target(model(**model_inputs({k: v.to(device) for k, v in batch.items()}))))
    return out


def evaluate_plan(
    model: nn.Module,
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    batches: Sequence[dict],
    alpha: float,
    bf16: bool,
    teachers: Sequence[torch.Tensor | None] | None = None,
    hidden: str = "cosine",
) -> float:
    """Calibration loss of the model pruned with hard ``perms`` (no gradient): the trainer's
    loss (``hidden``: its ``LearnConfig.hidden_loss``, for a model without logits)."""
    params = hard_params(sites, perms, weights, scores, pattern)
    return evaluate_params(model, params, batches, alpha, bf16, teachers, hidden)


def evaluate_params(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Sequence[dict],
    alpha: float,
    bf16: bool,
    teachers: Sequence[torch.Tensor | None] | None = None,
    hidden: str = "cosine",
) -> float:
    """Calibration loss of ``model`` with ``params`` (``{"<layer>.weight": W}``) in place of its
    own (no gradient): the trainer's loss, as :func:`evaluate_plan` measures a plan."""
    device = next(model.parameters()).device
    if teachers is None:
        teachers = teacher_logits(model, batches, bf16) if alpha > 0 else [None] * len(batches)
    total = 0.0
    with torch.no_grad():
        for batch, teacher in zip(batches, teachers):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(bf16, device):
                out = functional_call(model, dict(params), (), model_inputs(batch), strict=False)
                if teacher is None and not has_logits(out):  # α = 0: no teachers were made
                    teacher = dense_target(model(**model_inputs(batch)))
            if has_logits(out):
                loss, _, _ = task_loss(out.logits, batch, teacher, alpha)
            else:
                loss, _, _ = hidden_loss(dense_target(out), teacher, batch.get("attention_mask"), hidden)
            total += float(loss.detach())
    return total / max(len(batches), 1)


def lowest_loss(losses: Mapping[str, float], prefer: str | None = None) -> str:
    """The plan of lowest loss; on a tie ``prefer``, else the earlier. A non-finite loss (a plan
    whose pruned model overflowed) never wins; if no loss is finite this raises, so that no plan
    is kept blindly."""
    finite = {k: v for k, v in losses.items() if math.isfinite(v)}
    if not finite:
        raise FloatingPointError(f"every plan's guard loss is non-finite ({dict(losses)}): the pruned model "
                                 "overflows; try --no-bf16 or more calibration data")
    return min(finite, key=lambda k: (finite[k], k != prefer))


def refit_round(losses: dict[str, float], finalists: Sequence[str],
                evaluate: Callable[[str], tuple[float, object]]) -> tuple[str, object]:
    """The guard's refitting round: ``evaluate(plan) -> (loss, what pruning it made)`` for each
    finalist in turn, its loss recorded in ``losses`` as ``<plan>+refit``; returns the plan of
    lowest finite loss (ties keep the earlier) and what pruning it made. Only the best so far is
    held, so two plans' weights at most. No finite loss raises, as :func:`lowest_loss` does."""
    best: tuple[str, object] | None = None
    for name in finalists:
        loss, made = evaluate(name)
        losses[f"{name}+refit"] = loss
        if math.isfinite(loss) and (best is None or loss < losses[f"{best[0]}+refit"]):
            best = (name, made)
        del made
    if best is None:
        lowest_loss({k: losses[f"{k}+refit"] for k in finalists})  # raises: no finite loss
    return best


def refit_finalists(masked: Mapping[str, float]) -> list[str]:
    """The plans the guard's last round refits, from their losses under the plain mask: the
    learned plan and the heuristic, and no permutation only where it beat the heuristic (each
    refit costs as much as pruning the model once). In order of preference on a tie."""
    return ["learned", "heuristic"] + (["none"] if masked["none"] < masked["heuristic"] else [])


def holdout_split(n: int, guard_batches: int, holdout: bool) -> tuple[range, range]:
    """Indices of ``(the batches the trainer learns on, those the guard compares the plans on)``
    of ``n``: all and the first ``guard_batches``; with ``holdout`` the last ``guard_batches`` for
    the guard and the rest for training, so the guard judges on text the trainer did not see."""
    if not holdout:
        return range(n), range(min(guard_batches, n))
    if n <= guard_batches:
        raise ValueError(f"guard_holdout keeps {guard_batches} of the {n} calibration batches for the guard and "
                         f"leaves none to train on: give more calibration windows or fewer guard_batches")
    return range(n - guard_batches), range(n - guard_batches, n)

"""The guard's measure of a plan: the calibration loss of the model pruned with it, and the
dense teacher logits that loss distils from (computed once, or kept from calibration)."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.sites import Site
from permsparse.train.bank import hard_params
from permsparse.train.loss import autocast, model_inputs, task_loss

__all__ = ["evaluate_plan", "teacher_logits", "TeacherCache"]

log = logging.getLogger(__name__)


class TeacherCache:
    """Collects the dense model's logits batch by batch (``collect_stats``'s ``on_output``),
    in float16 on the host, up to ``budget_gb``; past it, it drops them and keeps none
    (``logits`` is then ``None``) so that the trainer recomputes its teacher instead."""

    def __init__(self, budget_gb: float) -> None:
        self.budget = budget_gb * 2**30
        self.bytes = 0
        self._logits: list[torch.Tensor] | None = []

    def __call__(self, index: int, output) -> None:
        if self._logits is None:
            return
        if index != len(self._logits):
            raise ValueError(f"teacher cache: batch {index} arrived after {len(self._logits)} batches")
        t = output.logits.detach().to("cpu", torch.float16)
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
    """The dense model's logits for ``batches`` (computed once, reused by every plan)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), autocast(bf16, device):
        for batch in batches:
            out.append(model(**model_inputs({k: v.to(device) for k, v in batch.items()})).logits)
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
) -> float:
    """Calibration loss of the model pruned with hard ``perms`` (no gradient)."""
    device = next(model.parameters()).device
    if teachers is None:
        teachers = teacher_logits(model, batches, bf16) if alpha > 0 else [None] * len(batches)
    total = 0.0
    params = hard_params(sites, perms, weights, scores, pattern)
    with torch.no_grad():
        for batch, teacher in zip(batches, teachers):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(bf16, device):
                logits = functional_call(model, params, (), model_inputs(batch), strict=False).logits
            loss, _, _ = task_loss(logits, batch, teacher, alpha)
            total += float(loss.detach())
    return total / max(len(batches), 1)

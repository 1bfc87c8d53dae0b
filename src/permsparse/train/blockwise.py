"""The block-wise objective: each block learns against its own dense output on cached inputs.

Each block's sites learn so that its sparse output matches the dense targets (normalised
MSE), then the block is pruned and feeds the next; memory does not grow with depth.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.core.sinkhorn import TemperatureSchedule
from permsparse.models.calibrate import block_output
from permsparse.models.sites import Site
from permsparse.train.bank import hard_params, make_bank, moved_share, sparse_weights, step_weights
from permsparse.train.loss import autocast
from permsparse.train.optim import anneal_lr, make_optimizer
from permsparse.train.state import NonFiniteLossError, StepLog

__all__ = ["train_block", "block_loss"]


def _block_weights(block: nn.Module, prefix: str, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    return {c: block.get_submodule(c[len(prefix) :]).weight.detach() for s in sites for c in s.consumers}


def _normalised_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (y - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def train_block(
    block: nn.Module,
    block_name: str,
    sites: Sequence[Site],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    groups: int,
    inputs: "Sequence[tuple[tuple, dict]]",
    targets: Sequence[torch.Tensor],
    cfg: LearnConfig,
    start: Mapping[str, Permutation] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Permutation], list[StepLog]]:
    """Learn this block's sites so that its sparse output matches the dense ``targets`` on
    cached ``inputs`` (normalised MSE); returns ``(perms, history)``."""
    device = next(block.parameters()).device
    prefix = f"{block_name}."
    bank = make_bank(sites, groups, pattern, start, cfg, scores).to(device)
    weights = step_weights(_block_weights(block, prefix, sites), cfg)
    opt = make_optimizer(bank.parameters(), cfg)
    schedule = TemperatureSchedule(cfg.tau_start, cfg.tau_end, cfg.steps_per_block, cfg.tau_schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepLog] = []
    prev = None
    masks: dict = {}
    for step in tqdm(range(cfg.steps_per_block), desc=f"learn {block_name}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        i = int(torch.randint(len(inputs), (1,), generator=gen))
        args, kwargs = inputs[i]
        tau = schedule(step)
        anneal_lr(opt, cfg, step / max(cfg.steps_per_block - 1, 1))
        out, ent = bank(tau, cfg.sinkhorn_iters)
        params = sparse_weights(out, sites, weights, scores, pattern, prefix_strip=prefix, mask_cache=masks,
                                grad_dtype=torch.bfloat16 if cfg.bf16 else None)
        with autocast(cfg.bf16, device):
            y = block_output(functional_call(block, params, args, kwargs, strict=False)).float()
        loss = _normalised_mse(y, targets[i].float())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{block_name}: block loss became {float(loss.detach())} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = {n: p for n, (_, p) in out.items()}
        history.append(StepLog(step, loss.item(), float("nan"), float("nan"), tau, ent, moved_share(prev, cur),
                               time.perf_counter() - t0, opt.param_groups[0]["lr"]))
        prev = cur
    return bank.hard(), history


def block_loss(
    block: nn.Module,
    block_name: str,
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    inputs: "Sequence[tuple[tuple, dict]]",
    targets: Sequence[torch.Tensor],
    bf16: bool,
    params: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Normalised MSE of the block pruned with hard ``perms`` against the dense targets;
    ``params``: the block's pruned weights (``{"<layer in block>.weight": W}``) instead of ``W ⊙ M``."""
    device = next(block.parameters()).device
    prefix = f"{block_name}."
    if params is None:
        params = hard_params(sites, perms, _block_weights(block, prefix, sites), scores, pattern, prefix_strip=prefix)
    with torch.no_grad():
        total = 0.0
        for (args, kwargs), target in zip(inputs, targets):
            with autocast(bf16, device):
                y = block_output(functional_call(block, params, args, kwargs, strict=False)).float()
            total += float(_normalised_mse(y, target.float()))
    return total / max(len(inputs), 1)

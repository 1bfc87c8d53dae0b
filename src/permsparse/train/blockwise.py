"""The block-wise objective: each block learns against its own dense output on cached inputs.

Each block's sites learn so that its sparse output matches the dense targets (each token's
squared error relative to its target, averaged), then the block is pruned and feeds the next;
memory does not grow with depth.
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
from permsparse.models.precision import bf16_on
from permsparse.models.sites import Site
from permsparse.train.bank import hard_params, make_bank, moved_share, sparse_weights, step_weights
from permsparse.train.loss import autocast
from permsparse.train.optim import anneal_lr, make_optimizer
from permsparse.train.state import NonFiniteLossError, StepLog

__all__ = ["train_block", "block_loss"]


def _block_weights(block: nn.Module, prefix: str, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    return {c: block.get_submodule(c[len(prefix) :]).weight.detach() for s in sites for c in s.consumers}


def _token_relative_mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each token's squared error over its target's energy, averaged over the tokens. The next
    block reads each token through an RMS norm, so a token's relative error is what reaches it;
    and a plain MSE would be the first token's alone (from SmolLM2's block 11 on, its massive
    activation holds 98 % of the outputs' energy, docs/results.md)."""
    err = (y - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _in_base(weights, scores, sites: Sequence[Site], base: Mapping[str, Permutation] | None, device):
    """Weights and scores in the ``base`` layout's columns, and per consumer the gather that brings
    ``W_eff`` back to the model's (``None`` without a base)."""
    if not base:
        return weights, scores, None
    fwd = {s.name: base[s.name].indices.to(device) for s in sites}
    back = {s.name: base[s.name].inverse().indices.to(device) for s in sites}
    site_of = {c: s.name for s in sites for c in s.consumers}
    weights = {c: w.index_select(1, fwd[site_of[c]]) for c, w in weights.items()}
    scores = {c: scores[c].index_select(1, fwd[n].to(scores[c].device)) for c, n in site_of.items()}
    return weights, scores, {c: back[n] for c, n in site_of.items()}


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
    seconds: float | None = None,
    base: Mapping[str, Permutation] | None = None,
) -> tuple[dict[str, Permutation], list[StepLog]]:
    """Learn this block's sites so that its sparse output matches the dense ``targets`` on
    cached ``inputs`` (per-token relative MSE); returns ``(perms, history)``.

    ``seconds``: this block's share of the time budget; after three steps the block's step
    count becomes the steps that fit at the pace of the second and third (the first pays
    one-off costs), at most ``cfg.steps_per_block`` and at least three, and τ and the lr
    anneal over that count.

    ``base``: per site, a layout (such as the heuristic of all channels in one group) that the
    block learns within ``groups`` groups of; ``start`` is then in its coordinates, and each
    returned plan is ``base`` then the learned one, so it may move channels across groups."""
    device = next(block.parameters()).device
    prefix = f"{block_name}."
    weights, scores, columns = _in_base(_block_weights(block, prefix, sites), scores, sites, base, device)
    bank = make_bank(sites, groups, pattern, start, cfg, scores).to(device)
    weights = step_weights(weights, cfg)
    opt = make_optimizer(bank.parameters(), cfg)
    steps = cfg.steps_per_block
    schedule = TemperatureSchedule(cfg.tau_start, cfg.tau_end, steps, cfg.tau_schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepLog] = []
    prev = None
    masks: dict = {}
    grad_dtype = torch.bfloat16 if bf16_on(cfg.bf16, device) else None  # as the autocast below
    bar = tqdm(total=steps, desc=f"learn {block_name}", disable=not progress, leave=False)
    step, start_clock = 0, time.perf_counter()
    while step < steps:
        t0 = time.perf_counter()
        i = int(torch.randint(len(inputs), (1,), generator=gen))
        args, kwargs = inputs[i]
        tau = schedule.at(step / max(steps - 1, 1))
        anneal_lr(opt, cfg, step / max(steps - 1, 1))
        out, ent = bank(tau, cfg.sinkhorn_iters)
        params = sparse_weights(out, sites, weights, scores, pattern, prefix_strip=prefix, mask_cache=masks,
                                grad_dtype=grad_dtype, columns=columns)
        with autocast(cfg.bf16, device):
            y = block_output(functional_call(block, params, args, kwargs, strict=False)).float()
        loss = _token_relative_mse(y, targets[i].float())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{block_name}: block loss became {float(loss.detach())} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = {n: p for n, (_, p) in out.items()}
        history.append(StepLog(step, loss.item(), float("nan"), float("nan"), tau, ent, moved_share(prev, cur),
                               time.perf_counter() - t0, opt.param_groups[0]["lr"]))
        prev = cur
        step += 1
        bar.update()
        if seconds is not None and step == _PROBE and steps > _PROBE:
            steps = _fit_steps(seconds, time.perf_counter() - start_clock, history, steps)
            bar.total = steps
    bar.close()
    learned = bank.hard()
    if base:
        learned = {n: base[n].compose(p) for n, p in learned.items()}
    return learned, history


_PROBE = 3  # steps before a block's budget fixes its step count (the first is not timed)


def _fit_steps(seconds: float, elapsed: float, history: Sequence[StepLog], steps: int) -> int:
    """The block's step count in ``seconds``: the steps done, and those that fit in what is
    left at the pace of the steps after the first; within ``[_PROBE, steps]``."""
    pace = max(sum(h.seconds for h in history[1:]) / max(len(history) - 1, 1), 1e-9)
    return max(len(history), min(steps, len(history) + int(max(seconds - elapsed, 0.0) / pace)))


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
            total += float(_token_relative_mse(y, target.float()))
    return total / max(len(inputs), 1)

"""Block by block: statistics, scores and the plan of one block at a time.

Learned permutations use the block-wise objective against each block's dense output.
Two feeds of a block's inputs:

* default (sequential): the outputs of the already-pruned blocks before it, so a block
  is fitted to the inputs it will receive in the pruned model; this forces one block
  after another, and under torch.distributed every rank does every block (replicated).
* ``spread_blocks``: the dense model's inputs (one dense walk through the blocks;
  statistics as in one-shot calibration). A block is then fitted to inputs that the
  pruned model will not quite give it (a possible loss of quality), but blocks are
  independent: each rank learns and prunes its contiguous share, then
  the permutations, reports and losses are all-gathered and each pruned block's weights
  broadcast from its owner, so every rank ends with the same model. A rank holds the
  inputs of one block at a time and stops its walk after its last block; one process
  gives the same result as any number of ranks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
from torch import nn

from permsparse.config import PruneConfig
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.apply import SiteReport, plan_weights, prune_site_, write_weights_
from permsparse.models.calibrate import BlockInputs, run_blocks
from permsparse.models.sites import Site, get_module
from permsparse.pipeline.calibration import resolve_groups, scores_and_heuristic
from permsparse.train import distributed as dist
from permsparse.train.state import StepLog
from permsparse.train.blockwise import block_loss, train_block
from permsparse.train.guard import lowest_loss, refit_finalists, refit_round

__all__ = ["BlockwiseOutcome", "prune_blockwise", "identity_plan", "training_share", "base_groups", "BASE_MAX_GROUP"]

log = logging.getLogger(__name__)


@dataclass
class BlockwiseOutcome:
    """What the walk chose, in forward order (``kept_plan``: the guard's choices, counted per block)."""

    perms: dict[str, Permutation] = field(default_factory=dict)
    reports: list[SiteReport] = field(default_factory=list)
    history: list[StepLog] = field(default_factory=list)
    guard: dict[str, float] = field(default_factory=dict)
    kept_plan: str = "none"
    groups: int = 1  # the groups every plan keeps (base layout then learned: the gcd of both)


def identity_plan(sites: Sequence[Site], groups: int) -> dict[str, Permutation]:
    """The plan that permutes nothing, in each site's group structure."""
    return {s.name: Permutation.identity(s.d_in, s.structure(groups)[0]) for s in sites}


def _learn_block(model: nn.Module, block: nn.Module, name: str, sites: list[Site], scores: dict, heur: dict,
                 pattern: NMPattern, cfg: PruneConfig, stats, inputs: BlockInputs, seconds: float | None
                 ) -> tuple[dict[str, Permutation], dict, tuple | None]:
    """Learn one block's plan (in ``seconds`` at most, see :func:`train_block`) and let the
    block-wise guard choose among none, heuristic and learned on the first
    ``block_guard_batches`` batches; where pruning refits the kept weights, its finalists
    (learned, heuristic) refitted decide, and the third value is ``(weights, reports)`` of
    the kept one."""
    calls = list(zip(inputs.args, inputs.kwargs))
    targets = list(inputs.outputs)  # the dense outputs: run_blocks keeps them from the statistics pass
    # Each guard round is a pass of the block over its batches: on all of them, the guard cost
    # twice the training (bench/results/defaults.md); a subset ranks the plans alike.
    g = cfg.learn.block_guard_batches or len(calls)
    fit = slice(g, None) if cfg.learn.guard_holdout and g < len(calls) else slice(None)  # held out: the guard's
    # With base_groups, ``heur`` (the heuristic at that many groups) is the layout learned within.
    base = heur if cfg.learn.base_groups else None
    start = heur if cfg.learn.init == "heuristic" and base is None else None
    learned, hist = train_block(block, name, sites, scores, pattern, cfg.groups, calls[fit], targets[fit],
                                cfg.learn, start=start, seconds=seconds, base=base)
    calls, targets = calls[:g], targets[:g]
    candidates = {"none": identity_plan(sites, cfg.groups), "heuristic": heur, "learned": learned}
    refit = cfg.learn.guard_refit and cfg.updates_weights
    # Refitting, the plain mask only decides whether no permutation is a finalist (it is where it
    # beats the heuristic): the learned plan's plain loss would decide nothing, so it is not run.
    losses = {k: block_loss(block, name, sites, c, scores, pattern, calls, targets, cfg.learn.bf16)
              for k, c in candidates.items() if not (refit and k == "learned")}
    applied = None
    if not refit:
        best = lowest_loss(losses, prefer="learned")
    else:

        def evaluate(k: str) -> tuple[float, tuple]:
            weights, reports = plan_weights(model, sites, pattern, cfg.score, stats, candidates[k], scores, cfg.refit_method)
            params = {f"{c[len(name) + 1:]}.weight": w for c, w in weights.items()}
            return block_loss(block, name, sites, candidates[k], scores, pattern, calls, targets, cfg.learn.bf16,
                              params=params), (weights, reports)

        best, applied = refit_round(losses, refit_finalists(losses), evaluate)  # ties keep the earlier: learned
    rec = {"history": [h.to_json() for h in hist], "guard": {f"{name}:{k}": v for k, v in losses.items()},
           "kept": best}
    return candidates[best], rec, applied


def _do_block(model: nn.Module, name: str, block: nn.Module, sites: list[Site], pattern: NMPattern | None,
              cfg: PruneConfig, permutation: str, stats, inputs: BlockInputs, seconds: float | None = None) -> dict:
    """Score, choose the plan of and prune one block (``seconds``: its share of the training
    budget); what it chose, as plain values (they cross ranks when the blocks are spread)."""
    plan_cfg = cfg  # a learned run's heuristic is its base layout where it has one
    if permutation == "learned" and cfg.learn.base_groups:
        plan_cfg = replace(cfg, groups=cfg.learn.base_groups)
    scores, heur = scores_and_heuristic(model, sites, pattern, plan_cfg, stats, permutation in ("heuristic", "learned"))
    chosen: dict[str, Permutation] = {}
    rec: dict = {"history": [], "guard": {}, "kept": None}
    applied = None
    if permutation == "heuristic":
        chosen = heur
    elif permutation == "learned":
        chosen, rec, applied = _learn_block(model, block, name, sites, scores, heur, pattern, cfg, stats, inputs,
                                             seconds)
    rec["perms"] = {n: [p.indices.tolist(), p.groups] for n, p in chosen.items()}
    if applied is not None:  # the guard's last round pruned the kept plan already
        write_weights_(model, applied[0])
        rec["reports"] = [asdict(r) for r in applied[1]]
        return rec
    rec["reports"] = [asdict(prune_site_(model, s, pattern, cfg.score, stats, chosen.get(s.name),
                                         [scores[c] for c in s.consumers], cfg.refit_method))
                      for s in sites]
    return rec


def _share_spread(model: nn.Module, chain: list[tuple[str, nn.Module]], owners: list[int],
                  by_block: dict[str, list[Site]], done: dict[str, dict]) -> None:
    """Every rank gets every block's record and pruned weights from the block's owner."""
    for part in dist.all_gather_object(done):
        done.update(part)
    with torch.no_grad():  # the pruned weights, in the same order on every rank
        for (name, _), owner in zip(chain, owners):
            for s in by_block[name]:
                for c in s.consumers:
                    dist.broadcast_(get_module(model, c).weight.data, owner)


#: The widest group of a learned run's base layout, in channels: the one-group heuristic of a
#: 4096 x 11008 layer took 406 s on 2 CPU cores (86 s at G = 4, 25 s at G = 16), and SmolLM2's
#: widest site (1536) keeps one group (docs/scaling.md).
BASE_MAX_GROUP = 1536


def base_groups(sites: Sequence[Site], pattern: NMPattern | None, wanted: int) -> int:
    """The base layout's groups: ``wanted``, or more where a site is wider than :data:`BASE_MAX_GROUP`
    (as ``groups="auto"`` picks them; ``wanted`` where no power of two fits)."""
    try:
        return max(wanted, resolve_groups(sites, pattern, BASE_MAX_GROUP, what="base_groups"))
    except ValueError:
        return wanted


def training_share(time_budget: float | None, prune_budget: float | None, left: int, trained: float,
                   elapsed: float, other: float | None) -> float | None:
    """The seconds the next block may train (``None``: no limit), of ``left`` blocks still to learn.

    ``time_budget`` (training seconds): what is left of it after ``trained``, shared evenly
    over the blocks left, so a block that ends under its share (``steps_per_block``) leaves the
    rest to the others. ``prune_budget`` (seconds of the whole walk): what is left of it after
    ``elapsed``, less ``other`` (a block's work besides training: statistics, guard, refit and
    feeding passes, averaged over the blocks done) for each block left, shared evenly, so a
    slower machine trains less and the walk still ends near the budget. Without an estimate of
    ``other`` (no block done yet) only ``time_budget`` limits."""
    shares = []
    if time_budget:
        shares.append(max(time_budget - trained, 0.0) / left)
    if prune_budget and other is not None:
        shares.append(max(prune_budget - elapsed - other * left, 0.0) / left)
    return min(shares) if shares else None


def _collect(order: list[str], done: dict[str, dict], permutation: str) -> BlockwiseOutcome:
    out = BlockwiseOutcome()
    kept: dict[str, int] = {"none": 0, "heuristic": 0, "learned": 0}
    for name in order:
        rec = done[name]
        out.perms.update({n: Permutation(torch.tensor(idx), groups) for n, (idx, groups) in rec["perms"].items()})
        out.reports += [SiteReport(**r) for r in rec["reports"]]
        out.history += [StepLog(**h) for h in rec["history"]]
        out.guard.update(rec["guard"])
        if rec["kept"] is not None:
            kept[rec["kept"]] += 1
    if permutation == "learned":
        out.kept_plan = ", ".join(f"{k} {v}/{len(order)}" for k, v in kept.items() if v)
        log.info("block-wise guard kept: %s", out.kept_plan)
    else:
        out.kept_plan = permutation
    return out


def prune_blockwise(model: nn.Module, sites: Sequence[Site], pattern: NMPattern | None, cfg: PruneConfig,
                    permutation: str, batches: Sequence[dict]) -> BlockwiseOutcome:
    """Prune ``model`` in place block by block (see the module's docstring for the two feeds)."""
    by_block: dict[str, list[Site]] = {}
    for s in sites:
        by_block.setdefault(s.block, []).append(s)
    order = [n for n, _ in model.named_modules() if n in by_block]
    chain = [(n, get_module(model, n)) for n in order]
    spread = cfg.spread_blocks
    owners = dist.block_owners(len(chain)) if spread else []
    owner_of = dict(zip(order, owners))
    if spread:
        mine = [n for n, r in zip(order, owners) if r == dist.rank()]
        log.info("spread blocks: rank %d/%d learns %d of %d blocks%s", dist.rank(), dist.world_size(), len(mine),
                 len(chain), f" ({mine[0]} .. {mine[-1]})" if mine else "")
    elif dist.world_size() > 1 and dist.is_main():
        log.info("block-wise under %d processes: every rank does every block (inputs from the pruned blocks); "
                 "spread_blocks (--spread-blocks) splits the blocks over the ranks", dist.world_size())
    groups = cfg.groups  # what every plan keeps: with a base layout, the gcd of its groups and the learned ones
    if permutation == "learned" and cfg.learn.base_groups:
        cfg = replace(cfg, learn=replace(cfg.learn, base_groups=base_groups(sites, pattern, cfg.learn.base_groups)))
        groups = math.gcd(cfg.groups, cfg.learn.base_groups)
    done: dict[str, dict] = {}
    left = len(mine) if spread else len(order)  # the blocks this rank still learns
    start, first = time.perf_counter(), None  # the walk's start; when its first block's plan began
    walk_budget = cfg.learn.prune_budget

    def on_block(name: str, block: nn.Module, stats, inputs: BlockInputs) -> None:
        nonlocal left, first, walk_budget
        now = time.perf_counter()
        first = now if first is None else first
        spent = sum(h["seconds"] for rec in done.values() for h in rec["history"])
        # A block's work besides training, averaged over the blocks done since the first one's plan began.
        other = max(now - first - spent, 0.0) / len(done) if done else None
        untrained = (first - start) + other * (len(done) + left) if other is not None else 0.0
        if walk_budget and len(done) == 1 and untrained > walk_budget:
            # A model too large for the budget (a 7B on any machine) would train 3 steps a block;
            # it keeps --time-budget instead.
            log.info("the block walk without training would take about %.0f s, over --prune-budget %.0f s: "
                     "the budget is dropped and --time-budget alone bounds the training", untrained, walk_budget)
            walk_budget = None
        seconds = training_share(cfg.learn.time_budget, walk_budget, left, spent, now - start, other)
        done[name] = _do_block(model, name, block, by_block[name], pattern, cfg, permutation, stats, inputs, seconds)
        left -= 1

    device = None
    if cfg.offload:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_blocks(model, chain, batches, lambda b: [c for s in by_block[b] for c in s.consumers], on_block,
               cfg.needs_hessian, cfg.progress and dist.is_main(), offload=cfg.offload, device=device,
               owned=(lambda b: owner_of[b] == dist.rank()) if spread else None, dense=spread,
               keep_outputs=permutation == "learned")  # the trainer's targets, from the statistics pass
    if spread:
        _share_spread(model, chain, owners, by_block, done)
    out = _collect(order, done, permutation)
    out.groups = groups
    return out

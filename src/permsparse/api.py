"""One call from a dense model to a pruned one: ``permsparse.prune(model, tokenizer, config)``.

calibrate → score → permutation per site (none | heuristic | learned) → masks → ``W_eff``
written in place (original coordinates). The result carries the sites, the hard
permutations, per-site retained scores, the training history and which plan the guard
kept. Exporting, evaluating and reporting are separate steps (``io``, ``evaluate``,
``report``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from permsparse.train import distributed as dist
from permsparse.models.apply import SiteReport, heuristic_permutation, prune_site_, site_scores
from permsparse.core.heuristics import HEURISTIC_POWER
from permsparse.core.pattern import parse_pattern
from permsparse.models.calibrate import BlockInputs, block_output, collect_stats, run_blocks
from permsparse.config import PruneConfig
from permsparse.train.blockwise import block_loss, train_block
from permsparse.train.guard import TeacherCache, evaluate_plan, teacher_logits
from permsparse.train.loop import make_batches, train_end_to_end
from permsparse.train.state import StepLog
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.core.scores import SCORES
from permsparse.models.sites import Site, find_sites, get_module

__all__ = ["PruneConfig", "PruneResult", "prune", "score_sites", "learn_permutations", "resolve_groups",
           "PERMUTATIONS", "AUTO_MAX_GROUP"]

log = logging.getLogger(__name__)

PERMUTATIONS = ("none", "heuristic", "learned")


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


def _identity_perms(sites: Sequence[Site], groups: int) -> dict[str, Permutation]:
    return {s.name: Permutation.identity(s.d_in, s.structure(groups)[0]) for s in sites}


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
    JSONL file of per-step training records; ``on_step(step_log, bank)``: called after
    every training step (its own time is not counted as training time). ``resume``:
    continue the end-to-end training from ``config.learn.checkpoint_path`` if it exists.

    Under ``torch.distributed`` (see :mod:`permsparse.train.distributed`) every rank calls this
    with the same model and data: statistics and the end-to-end training are sharded over
    the ranks, which all end with the same pruned model. ``offload=True`` streams the
    model block by block (it implies the block-by-block path). ``spread_blocks=True``
    (block-wise) learns every block against the dense model's inputs and splits the
    blocks over the ranks (see :func:`_prune_blockwise`).
    """
    cfg = config or PruneConfig()
    t0 = time.perf_counter()
    pattern = parse_pattern(cfg.pattern)
    needs_data = cfg.score != "magnitude" or cfg.permutation == "learned"
    if needs_data and calib is None:
        raise ValueError(f"score {cfg.score!r} with permutation {cfg.permutation!r} needs calibration data")
    batches = make_batches(calib, cfg.learn.batch_size) if calib is not None else []
    example = {k: v for k, v in batches[0].items() if k != "labels"} if batches else None
    sites = find_sites(model, sync=cfg.sync, attn_out=cfg.attn_out, example_inputs=example)
    cfg = resolved(cfg, sites)
    if pattern is not None:
        for s in sites:
            s.structure(cfg.groups, pattern)  # fail early, naming the site, before any work
    permutation = cfg.permutation if pattern is not None else "none"
    model.requires_grad_(False)
    if (cfg.sequential or cfg.offload or cfg.spread_blocks
            or (permutation == "learned" and cfg.learn.objective == "blockwise")):
        result = _prune_blockwise(model, sites, pattern, cfg, permutation, batches)
    else:
        result = _prune_one_shot(model, sites, pattern, cfg, permutation, batches, metrics_path, on_step, resume)
    result.seconds = time.perf_counter() - t0
    result.groups = cfg.groups
    log.info("pruned %d sites in %.1fs (kept plan: %s)", len(sites), result.seconds, result.kept_plan)
    return result


#: ``groups="auto"``: the largest permutation group, in channels, so that the per-step
#: solver cost stays bounded on wide models: one Sinkhorn + assignment per group and step
#: costs ~0.1 s at 1,024 channels and ~1.5 s at 2,048 (bench/results/core.md). 768 gives
#: SmolLM2 G=2 and a 7B model's 11,008-wide down_proj G=16. (In bench/results/sweep.md the
#: perplexity showed no reliable trend in G at 16 steps, so the default stays G=4.)
AUTO_MAX_GROUP = 768


def resolve_groups(sites: Sequence[Site], pattern: "NMPattern | None", max_group: int = AUTO_MAX_GROUP) -> int:
    """``groups="auto"``: the smallest power of two G whose groups hold at most ``max_group``
    channels at every site and divide into N:M blocks (head-tied sites keep one group per head)."""
    free = [s for s in sites if not s.head_tied]
    if not free:
        return 1
    m = pattern.m if pattern is not None else 1
    widest = max(s.d_in for s in free)
    g = 1
    while g <= widest:
        if all(s.d_in % (g * m) == 0 for s in free) and widest // g <= max_group:
            log.info("groups=auto: G=%d (widest site %d channels, groups of at most %d)", g, widest, widest // g)
            return g
        g *= 2
    raise ValueError(f"groups=auto: no power-of-two G divides every site width into groups of at most {max_group} "
                     f"channels that are multiples of M={m}; pass groups explicitly")


def resolved(cfg: PruneConfig, sites: Sequence[Site]) -> PruneConfig:
    """``cfg`` with ``groups="auto"`` replaced by the G it means for these ``sites``."""
    if cfg.groups != "auto":
        return cfg
    return replace(cfg, groups=resolve_groups(sites, parse_pattern(cfg.pattern)))


def _scores_and_heuristic(
    model: nn.Module, sites: Sequence[Site], pattern: NMPattern | None, cfg: PruneConfig, stats, want_heuristic: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Permutation]]:
    scores: dict[str, torch.Tensor] = {}
    heur: dict[str, Permutation] = {}
    for site in tqdm(sites, desc="scores", disable=not cfg.progress or len(sites) < 8, leave=False):
        sc = site_scores(model, site, cfg.score, stats)
        scores.update(zip(site.consumers, sc))
        if want_heuristic and pattern is not None:
            heur[site.name] = heuristic_permutation(site, sc, pattern, cfg.groups, cfg.heuristic, cfg.swap_seconds,
                                                   power=cfg.heuristic_power)
    return scores, heur


def score_sites(
    model: nn.Module, sites: Sequence[Site], cfg: PruneConfig, batches: Sequence[dict], heuristic: bool = True,
    on_output=None, bf16: bool = False,
) -> tuple[dict | None, dict[str, torch.Tensor], dict[str, Permutation]]:
    """One-shot calibration, each consumer's score and (optionally) each site's heuristic
    permutation: ``(stats, scores, heuristic_perms)``. ``on_output(i, output)`` sees the dense
    model's output on each (sharded) calibration batch. ``bf16``: the calibration pass under
    bfloat16 autocast (ignored for SparseGPT, whose Hessian wants float32 inputs)."""
    cfg = resolved(cfg, sites)
    pattern = parse_pattern(cfg.pattern)
    layers = [c for s in sites for c in s.consumers]
    hessian = cfg.score == "sparsegpt"
    stats = None
    if cfg.score != "magnitude":
        # Each rank its shard; the sums are then all-reduced (identity in one process).
        stats = collect_stats(model, [dist.shard_batch(b) for b in batches], layers, hessian,
                              cfg.progress and dist.is_main(), on_output=on_output, bf16=bf16 and not hessian)
        dist.all_reduce_stats_(stats)
    scores, heur = _scores_and_heuristic(model, sites, pattern, cfg, stats, heuristic)
    return stats, scores, heur


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
) -> tuple[dict[str, dict[str, Permutation]], list[StepLog], dict[str, float], str]:
    """Train end to end, then the guard: ``(candidates, history, guard_losses, kept_plan)``.

    ``candidates`` maps ``none`` / ``heuristic`` / ``learned`` to their permutations;
    ``kept_plan`` is the one with the lowest calibration loss (ties favour ``learned``).
    ``learned`` is the best of the run's own plans: the last one, one of the
    ``cfg.learn.snapshots`` taken during training, or the plan of a running average of
    the costs (``cfg.learn.average``, ``cfg.learn.tail_average``), whichever has the lowest
    calibration loss
    (``guard_losses`` holds the others as ``learned@<step>``, ``learned@avg<decay>`` and
    ``learned@tail<share>``).
    """
    cfg = resolved(cfg, sites)
    pattern = parse_pattern(cfg.pattern)
    snapshots: dict[int, dict[str, Permutation]] = {}
    averaged: dict[str, dict[str, Permutation]] = {}
    learned, history = train_end_to_end(
        model, sites, scores, pattern, cfg.groups, batches, cfg.learn,
        start=heuristic, metrics_path=Path(metrics_path) if metrics_path else None, progress=cfg.progress,
        on_step=on_step, resume=resume, snapshots=snapshots, averaged=averaged, teachers=teachers,
    )
    candidates = {"none": _identity_perms(sites, cfg.groups), "heuristic": dict(heuristic), "learned": learned}
    last = len(history) - 1
    candidates.update({f"learned@{st}": plan for st, plan in sorted(snapshots.items()) if st < last})
    candidates.update({f"learned@{k}": plan for k, plan in averaged.items()})
    guard_batches = [dist.shard_batch(b) for b in batches[: cfg.learn.guard_batches]]
    if cfg.learn.alpha <= 0:
        teachers = None
    elif teachers is not None:
        teachers = list(teachers[: cfg.learn.guard_batches])
    else:
        teachers = teacher_logits(model, guard_batches, cfg.learn.bf16)
    weights = _weights(model, sites)
    guard = {  # each rank its shard of the guard batches; equal shards, so the mean is the global loss
        name: dist.mean_float(evaluate_plan(model, sites, cand, weights, scores, pattern, guard_batches,
                                            cfg.learn.alpha, cfg.learn.bf16, teachers))
        for name, cand in candidates.items()
    }
    plan = min(guard, key=lambda k: (guard[k], k != "learned"))
    log.info("guard (calibration loss): %s; kept %s", ", ".join(f"{k} {v:.4f}" for k, v in guard.items()), plan)
    if plan.startswith("learned@"):
        # The learned result is the best of its own plans: an earlier one won the guard.
        candidates["learned"] = candidates[plan]
        which = plan.split("@")[1]
        if which.startswith("avg"):
            what = f"that of the averaged costs (decay {which[3:]})"
        elif which.startswith("tail"):
            what = f"that of the costs averaged over the run from {float(which[4:]):.0%} of it on"
        else:
            what = f"the one of step {which} of {last + 1}"
        log.info("the learned plan is %s (calibration loss %.4f against %.4f at the end)",
                 what, guard[plan], guard["learned"])
        plan = "learned"
    for k in [k for k in candidates if k.startswith("learned@")]:
        del candidates[k]
    return candidates, history, guard, plan


def _prune_one_shot(model, sites, pattern, cfg, permutation, batches, metrics_path, on_step=None,
                    resume=False) -> PruneResult:
    want_heur = permutation == "heuristic" or permutation == "learned"
    # The calibration pass runs the dense model over the very batches the trainer will use:
    # keep its logits as the teacher (LearnConfig.teacher_cache_gb).
    cache = (TeacherCache(cfg.learn.teacher_cache_gb) if permutation == "learned" and cfg.learn.alpha > 0
             and cfg.learn.teacher_cache_gb > 0 else None)
    # A learned run trains a bfloat16 student against these logits: computing them (and the
    # statistics) under the same autocast is consistent and 1.5x faster (SmolLM2, 2 cores,
    # 96 windows: ~35 s), and changes 0.02 % of the Wanda 2:4 mask entries.
    bf16 = permutation == "learned" and cfg.learn.bf16
    stats, scores, heur = score_sites(model, sites, cfg, batches, heuristic=want_heur, on_output=cache, bf16=bf16)
    history: list[StepLog] = []
    guard: dict[str, float] = {}
    plan = "none"
    perms: dict[str, Permutation] = {}
    if permutation == "heuristic":
        perms, plan = heur, "heuristic"
    elif permutation == "learned":
        candidates, history, guard, plan = learn_permutations(model, sites, scores, heur, cfg, batches,
                                                              metrics_path, on_step, resume,
                                                              teachers=cache.logits if cache else None)
        perms = candidates[plan]
    reports = [
        prune_site_(model, s, pattern, cfg.score, stats, perms.get(s.name), [scores[c] for c in s.consumers])
        for s in sites
    ]
    learned = candidates["learned"] if permutation == "learned" else {}
    return PruneResult(sites, perms, reports, history, plan, guard, learned=learned)


def _weights(model: nn.Module, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    return {c: get_module(model, c).weight.detach() for s in sites for c in s.consumers}


def _prune_blockwise(model, sites, pattern, cfg, permutation, batches) -> PruneResult:
    """Block by block; learned permutations use the block-wise objective against each
    block's dense output.

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
    by_block: dict[str, list[Site]] = {}
    for s in sites:
        by_block.setdefault(s.block, []).append(s)
    order = [n for n, _ in model.named_modules() if n in by_block]
    chain = [(n, get_module(model, n)) for n in order]
    done: dict[str, dict] = {}  # block -> what it chose, as plain values (they cross ranks when spread)
    hessian = cfg.score == "sparsegpt"
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

    def on_block(name: str, block: nn.Module, stats, inputs: BlockInputs) -> None:
        bsites = by_block[name]
        want_heur = permutation in ("heuristic", "learned")
        scores, heur = _scores_and_heuristic(model, bsites, pattern, cfg, stats, want_heur)
        chosen: dict[str, Permutation] = {}
        rec: dict = {"history": [], "guard": {}, "kept": None}
        if permutation == "heuristic":
            chosen = heur
        elif permutation == "learned":
            calls = list(zip(inputs.args, inputs.kwargs))
            targets = inputs.outputs  # the dense outputs, when run_blocks computed them already
            if targets is None:
                with torch.no_grad():
                    targets = [block_output(block(*a, **k)).detach() for a, k in calls]
            learned, hist = train_block(block, name, bsites, scores, pattern, cfg.groups, calls, targets, cfg.learn,
                                        start=heur if cfg.learn.init == "heuristic" else None)
            candidates = {"none": _identity_perms(bsites, cfg.groups), "heuristic": heur, "learned": learned}
            losses = {k: block_loss(block, name, bsites, c, scores, pattern, calls, targets, cfg.learn.bf16)
                      for k, c in candidates.items()}
            best = min(losses, key=lambda k: (losses[k], k != "learned"))
            rec.update(history=[h.to_json() for h in hist], guard={f"{name}:{k}": v for k, v in losses.items()},
                       kept=best)
            chosen = candidates[best]
        rec["perms"] = {n: [p.indices.tolist(), p.groups] for n, p in chosen.items()}
        rec["reports"] = [
            asdict(prune_site_(model, s, pattern, cfg.score, stats, chosen.get(s.name),
                               [scores[c] for c in s.consumers]))
            for s in bsites
        ]
        done[name] = rec

    device = None
    if cfg.offload:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_blocks(model, chain, batches, lambda b: [c for s in by_block[b] for c in s.consumers], on_block, hessian,
               cfg.progress and dist.is_main(), offload=cfg.offload, device=device,
               owned=(lambda b: owner_of[b] == dist.rank()) if spread else None, dense=spread)
    if spread:
        for part in dist.all_gather_object(done):
            done.update(part)
        with torch.no_grad():  # the pruned weights, from each block's owner, in the same order on every rank
            for (name, _), owner in zip(chain, owners):
                for s in by_block[name]:
                    for c in s.consumers:
                        dist.broadcast_(get_module(model, c).weight.data, owner)
    perms: dict[str, Permutation] = {}
    reports: list[SiteReport] = []
    history: list[StepLog] = []
    guard: dict[str, float] = {}
    kept: dict[str, int] = {"none": 0, "heuristic": 0, "learned": 0}
    for name in order:
        rec = done[name]
        perms.update({n: Permutation(torch.tensor(idx), groups) for n, (idx, groups) in rec["perms"].items()})
        reports += [SiteReport(**r) for r in rec["reports"]]
        history += [StepLog(**h) for h in rec["history"]]
        guard.update(rec["guard"])
        if rec["kept"] is not None:
            kept[rec["kept"]] += 1
    if permutation == "learned":
        plan = ", ".join(f"{k} {v}/{len(chain)}" for k, v in kept.items() if v)
        log.info("block-wise guard kept: %s", plan)
    else:
        plan = permutation
    return PruneResult(sites, perms, reports, history, plan, guard)

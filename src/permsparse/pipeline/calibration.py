"""Calibrate and search once: the sites, their statistics and scores, the heuristic plan.

A :class:`Calibration` holds everything a plan needs to be applied, so any number of
plans (none, the heuristic, learned ones) can prune copies of one dense model from one
calibration pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from permsparse.config import PruneConfig
from permsparse.core.pattern import NMPattern, parse_pattern
from permsparse.core.permutation import Permutation
from permsparse.models.apply import SiteReport, heuristic_permutation, plan_weights, prune_site_, site_scores
from permsparse.models.calibrate import collect_stats
from permsparse.models.precision import bf16_on
from permsparse.models.sites import Site, find_sites, nothing_to_prune, unhandled_layers
from permsparse.train import distributed as dist
from permsparse.train.guard import TeacherCache

__all__ = ["Calibration", "calibrate", "score_sites", "scores_and_heuristic", "pattern_sites", "resolve_groups",
           "resolved", "AUTO_MAX_GROUP"]

log = logging.getLogger(__name__)

#: ``groups="auto"``: the largest permutation group, in channels, so that the per-step solver
#: cost stays bounded on wide models (bench/results/core.md); 768 gives SmolLM2 G=2 and a 7B
#: model's 11,008-wide down_proj G=16.
AUTO_MAX_GROUP = 768


def resolve_groups(sites: Sequence[Site], pattern: "NMPattern | None", max_group: int = AUTO_MAX_GROUP,
                   what: str = "groups=auto") -> int:
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
            log.info("%s: G=%d (widest site %d channels, groups of at most %d)", what, g, widest, widest // g)
            return g
        g *= 2
    raise ValueError(f"{what}: no power-of-two G divides every site width into groups of at most {max_group} "
                     f"channels that are multiples of M={m}; pass groups explicitly")


def resolved(cfg: PruneConfig, sites: Sequence[Site], model: nn.Module | None = None) -> PruneConfig:
    """``cfg`` with ``groups="auto"`` replaced by the G it means for these ``sites`` and, given
    the ``model``, a learned run's ``objective="auto"`` by :func:`resolve_objective` and ``bf16``
    off where the model's device has no native bfloat16 (:func:`~permsparse.models.precision.bf16_on`)."""
    if cfg.groups == "auto":
        cfg = replace(cfg, groups=resolve_groups(sites, parse_pattern(cfg.pattern)))
    if model is not None and cfg.permutation == "learned" and cfg.learn.objective == "auto":
        cfg = replace(cfg, learn=replace(cfg.learn, objective=resolve_objective(model, sites, cfg)))
    if (model is not None and cfg.permutation == "learned" and cfg.learn.bf16
            and not bf16_on(True, next(model.parameters()).device)):
        cfg = replace(cfg, learn=replace(cfg.learn, bf16=False))  # what runs, as the run's record says
    return cfg


def resolve_objective(model: nn.Module, sites: Sequence[Site], cfg: PruneConfig) -> str:
    """What ``objective="auto"`` means for ``model``: ``blockwise`` where the walk goes block by
    block anyway (sequential, offload, spread blocks), and for a causal language model or a model
    without a head (a sentence embedder such as ``BertModel``: its output is the last block's)
    whose sites lie in one stack of blocks (measured best on SmolLM2, bench/results/defaults.md,
    and MiniLM, encoder_defaults.md); ``e2e`` where a run asks for what only it has (a checkpoint,
    activation checkpointing) and for the rest, whose evidence is end to end: classifiers (a
    task loss on labels) and vision-language models (two stacks, which one chain of block inputs
    cannot feed)."""
    if cfg.learn.objective != "auto":
        return cfg.learn.objective
    if cfg.sequential or cfg.offload or cfg.spread_blocks:
        return "blockwise"
    if cfg.learn.checkpoint_path or cfg.learn.activation_checkpointing:
        return "e2e"
    stacks = {s.block.rpartition(".")[0] for s in sites}
    can_generate = getattr(model, "can_generate", None)
    causal = bool(callable(can_generate) and can_generate())
    headless = getattr(model, "base_model", None) is model  # transformers: a model is its own base without a head
    return "blockwise" if (causal or headless) and len(stacks) == 1 else "e2e"


def pattern_sites(model: nn.Module, cfg: PruneConfig, batches: Sequence[dict]) -> tuple[list[Site], PruneConfig]:
    """``model``'s sites and ``cfg`` resolved for them; fails early, naming the site, where
    the groups do not divide into the pattern's blocks, and naming the layer types it could
    not handle where there is nothing to prune. The first batch (labels aside) is the
    generic fallback's traced input."""
    # A model with nothing the tool can prune (GPT-2's Conv1D) is refused before any work.
    why = nothing_to_prune(model)
    if why:
        raise ValueError(why)
    example = {k: v for k, v in batches[0].items() if k != "labels"} if batches else None
    sites = find_sites(model, sync=cfg.sync, attn_out=cfg.attn_out, example_inputs=example)
    if not sites:
        types = unhandled_layers(model)
        raise ValueError("found no layers to prune in this model (no linear layer reads an input that a traced "
                         "forward could follow)" + (f"; layer types it could not handle: "
                                                     f"{', '.join(f'{t} ({n})' for t, n in sorted(types.items()))}"
                                                     if types else ""))
    cfg = resolved(cfg, sites, model)
    pattern = parse_pattern(cfg.pattern)
    if pattern is not None:
        for s in sites:
            s.structure(cfg.groups, pattern)
    return sites, cfg


def scores_and_heuristic(
    model: nn.Module, sites: Sequence[Site], pattern: NMPattern | None, cfg: PruneConfig, stats, want_heuristic: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Permutation]]:
    """Each consumer's score and, when wanted (and there is a pattern), each site's heuristic permutation."""
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
    hessian = cfg.needs_hessian
    stats = None
    if cfg.score != "magnitude":
        # Each rank its shard; the sums are then all-reduced (identity in one process).
        stats = collect_stats(model, [dist.shard_batch(b) for b in batches], layers, hessian,
                              cfg.progress and dist.is_main(), on_output=on_output,
                              bf16=bf16 and cfg.score != "sparsegpt")
        dist.all_reduce_stats_(stats)
    scores, heur = scores_and_heuristic(model, sites, pattern, cfg, stats, heuristic)
    return stats, scores, heur


@dataclass
class Calibration:
    """One calibration pass over a dense model: what every plan of it prunes with.

    ``teachers``: the dense logits of the calibration batches, kept (float16, on the host)
    for a learned run's distillation when the pass ran under the trainer's autocast.
    """

    cfg: PruneConfig  # ``groups`` resolved
    sites: list[Site]
    stats: dict | None
    scores: dict[str, torch.Tensor]
    heuristic: dict[str, Permutation]
    batches: list[dict]
    teachers: list[torch.Tensor] | None = None
    seconds: float = 0.0

    def apply_(self, model: nn.Module, perms: Mapping[str, Permutation] | None = None) -> list[SiteReport]:
        """Prune ``model`` (the calibrated one or a copy) in place with ``perms`` (none: plain N:M)."""
        pattern = parse_pattern(self.cfg.pattern)
        perms = perms or {}
        return [prune_site_(model, s, pattern, self.cfg.score, self.stats, perms.get(s.name),
                            [self.scores[c] for c in s.consumers], self.cfg.refit_method) for s in self.sites]

    def weights(self, model: nn.Module, perms: Mapping[str, Permutation] | None = None
                ) -> tuple[dict[str, torch.Tensor], list[SiteReport]]:
        """What :meth:`apply_` would write (``{consumer: W}``) and report, without changing
        ``model``; :func:`~permsparse.models.apply.write_weights_` puts such weights in."""
        return plan_weights(model, self.sites, parse_pattern(self.cfg.pattern), self.cfg.score, self.stats,
                            perms or {}, self.scores, self.cfg.refit_method)

    def check_fits(self, cfg: PruneConfig) -> PruneConfig:
        """``cfg`` resolved for these sites; raises if it needs another calibration (only
        the trainer's settings other than the batch size may differ)."""
        cfg = resolved(cfg, self.sites)
        mine = replace(self.cfg, learn=cfg.learn, permutation=cfg.permutation, progress=cfg.progress)
        if mine != cfg or cfg.learn.batch_size != self.cfg.learn.batch_size:
            raise ValueError("this calibration was made for another configuration (sites, score, pattern, groups, "
                             "heuristic or batch size differ); calibrate again")
        return cfg


def calibrate(
    model: nn.Module,
    cfg: PruneConfig,
    batches: Sequence[dict],
    *,
    sites: Sequence[Site] | None = None,
    heuristic: bool = True,
    bf16: bool = False,
    teacher_cache: bool = False,
) -> Calibration:
    """Calibrate ``model`` on ``batches`` (see :func:`permsparse.train.loop.make_batches`)
    once: its sites (found unless given), statistics, scores and, with ``heuristic``, the
    heuristic plan. ``bf16``: the pass under bfloat16 autocast; ``teacher_cache``: keep the
    dense logits of the pass as a learned run's teacher (within ``cfg.learn.teacher_cache_gb``)."""
    t0 = time.perf_counter()
    batches = list(batches)
    model.requires_grad_(False)
    if sites is None:
        sites, cfg = pattern_sites(model, cfg, batches)
    cfg = resolved(cfg, sites)
    cache = TeacherCache(cfg.learn.teacher_cache_gb) if teacher_cache else None
    stats, scores, heur = score_sites(model, sites, cfg, batches, heuristic=heuristic, on_output=cache, bf16=bf16)
    return Calibration(cfg, list(sites), stats, scores, heur, batches, cache.logits if cache else None,
                       time.perf_counter() - t0)

"""The embedded demo: dense / Wanda / heuristic / learned perplexity side by side.

Runs on the embedded default (SmolLM2-135M-Instruct and Wikipedia text shipped in PyPI
wheels), so it needs no hub. Calibration, scores and the heuristic are computed once and
shared by the three pruned variants; the learned run trains within a time budget.
``quick`` finishes in a few minutes on 2 CPU cores; ``full`` uses the quality table's
settings.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from permsparse.models.apply import prune_site_
from permsparse.core.pattern import parse_pattern
from permsparse.train.loop import make_batches
from permsparse.config import LearnConfig
from permsparse.api import PruneResult, learn_permutations, resolved, score_sites
from permsparse.config import PruneConfig
from permsparse.models.sites import find_sites

__all__ = ["PRESETS", "SharedRun", "shared_run", "run_demo"]

log = logging.getLogger(__name__)

# n_calib windows of 512 tokens; eval_tokens from the end of the corpus; training seconds.
PRESETS: dict[str, dict] = {
    "quick": {"n_calib": 24, "eval_tokens": 8192, "learn": {"epochs": 2.0, "batch_size": 4, "time_budget": 150.0}},
    "full": {"n_calib": 96, "eval_tokens": 32768, "learn": {"epochs": 3.0, "batch_size": 4, "time_budget": 600.0}},
}


@dataclass
class SharedRun:
    """One calibration, heuristic search and learned run, from which every plan
    (``none``, ``heuristic``, ``learned``) prunes a copy of the dense model."""

    cfg: PruneConfig
    sites: list
    stats: dict | None
    scores: dict
    candidates: dict
    history: list
    guard: dict
    kept: str  # the plan the guard keeps: what ``prune(permutation="learned")`` returns
    shared_seconds: float  # calibration, scores, heuristic
    learn_seconds: float

    def pruned(self, dense: nn.Module, plan: str) -> tuple[nn.Module, PruneResult]:
        """A copy of ``dense`` pruned with ``plan``'s permutations, and what was done."""
        model = copy.deepcopy(dense)
        perms = self.candidates[plan]
        nm = parse_pattern(self.cfg.pattern)
        reports = [prune_site_(model, s, nm, self.cfg.score, self.stats, perms[s.name],
                               [self.scores[c] for c in s.consumers]) for s in self.sites]
        return model, PruneResult(self.sites, perms, reports, self.history, self.kept, self.guard,
                                  groups=self.cfg.groups)


def shared_run(dense: nn.Module, cfg: PruneConfig, batches: Sequence[dict]) -> SharedRun:
    """Calibrate ``dense`` once, search the heuristic and learn the permutations (``cfg``)."""
    t0 = time.perf_counter()
    sites = find_sites(dense)
    cfg = resolved(cfg, sites)  # groups="auto" -> the G it means for this model
    stats, scores, heur = score_sites(dense, sites, cfg, batches, heuristic=True)
    shared = time.perf_counter() - t0
    t1 = time.perf_counter()
    candidates, history, guard, kept = learn_permutations(dense, sites, scores, heur, cfg, batches)
    return SharedRun(cfg, sites, stats, scores, candidates, history, guard, kept, shared, time.perf_counter() - t1)


def run_demo(preset: str = "quick", out: "str | Path | None" = None, overwrite: bool = False,
             progress: bool = True, model_spec: str = "smollm2-135m", pattern: str = "2:4") -> list[dict]:
    """Prune the embedded model three ways and return one row per method."""
    from permsparse.data.text import load_text_windows
    from .evaluate import perplexity
    from permsparse.models.loading import load_model

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    dense, tokenizer = load_model(model_spec)
    windows = load_text_windows("wikipedia", tokenizer, 512, p["n_calib"], 0, eval_tokens=p["eval_tokens"])
    cfg = PruneConfig(pattern=pattern, score="wanda", permutation="learned", learn=LearnConfig(**p["learn"]),
                      progress=progress)
    rows = [{"method": "dense", "pattern": "-", "ppl": perplexity(dense, windows.eval, progress=progress),
             "seconds": 0.0, "note": ""}]

    run = shared_run(dense, cfg, make_batches(windows.calib, cfg.learn.batch_size))
    shared, learn_s, kept = run.shared_seconds, run.learn_seconds, run.kept

    model = result = None
    for method, plan, seconds, note in (
        ("wanda", "none", shared, "calibration"),
        ("wanda+heuristic", "heuristic", shared, "calibration + zig-zag"),
        ("wanda+learned", kept, shared + learn_s,
         f"+ {len(run.history)} steps in {learn_s:.0f}s; guard kept {kept}"),
    ):
        model, result = run.pruned(dense, plan)
        result.seconds = seconds
        rows.append({"method": method, "pattern": pattern, "ppl": perplexity(model, windows.eval, progress=progress),
                     "seconds": seconds, "note": note})
        log.info("%s: ppl %.2f", method, rows[-1]["ppl"])
    if out is not None and result is not None:
        from permsparse.io.export import export
        from .report import write_report

        export(model, out, run.sites, result.perms, pattern=pattern, score="wanda", groups=result.groups,
               tokenizer=tokenizer, metrics={"demo": rows}, overwrite=overwrite, config=cfg.to_json())
        write_report(out, f"permsparse demo ({preset})", rows, cfg.to_json(), result.reports, run.history,
                     run.guard, kept)
    return rows

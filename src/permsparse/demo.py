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
from pathlib import Path

from .apply import parse_pattern, prune_site_
from .learn import LearnConfig, make_batches
from .pipeline import PruneConfig, PruneResult, learn_permutations, score_sites
from .sites import find_sites

__all__ = ["PRESETS", "run_demo"]

log = logging.getLogger(__name__)

# n_calib windows of 512 tokens; eval_tokens from the end of the corpus; training seconds.
PRESETS: dict[str, dict] = {
    "quick": {"n_calib": 24, "eval_tokens": 8192, "learn": {"epochs": 2.0, "batch_size": 4, "time_budget": 150.0}},
    "full": {"n_calib": 96, "eval_tokens": 32768, "learn": {"epochs": 3.0, "batch_size": 4, "time_budget": 600.0}},
}


def run_demo(preset: str = "quick", out: "str | Path | None" = None, overwrite: bool = False,
             progress: bool = True, model_spec: str = "smollm2-135m", pattern: str = "2:4") -> list[dict]:
    """Prune the embedded model three ways and return one row per method."""
    from .data import load_text_windows
    from .evaluate import perplexity
    from .loading import load_model

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    dense, tokenizer = load_model(model_spec)
    windows = load_text_windows("wikipedia", tokenizer, 512, p["n_calib"], 0, eval_tokens=p["eval_tokens"])
    cfg = PruneConfig(pattern=pattern, score="wanda", permutation="learned", learn=LearnConfig(**p["learn"]),
                      progress=progress)
    nm = parse_pattern(pattern)
    rows = [{"method": "dense", "pattern": "-", "ppl": perplexity(dense, windows.eval, progress=progress),
             "seconds": 0.0, "note": ""}]

    t0 = time.perf_counter()
    batches = make_batches(windows.calib, cfg.learn.batch_size)
    sites = find_sites(dense)
    stats, scores, heur = score_sites(dense, sites, cfg, batches, heuristic=True)
    shared = time.perf_counter() - t0
    t1 = time.perf_counter()
    candidates, history, guard, kept = learn_permutations(dense, sites, scores, heur, cfg, batches)
    learn_s = time.perf_counter() - t1

    model = result = None
    for method, plan, seconds, note in (
        ("wanda", "none", shared, "calibration"),
        ("wanda+heuristic", "heuristic", shared, "calibration + zig-zag"),
        ("wanda+learned", kept, shared + learn_s,
         f"+ {len(history)} steps in {learn_s:.0f}s; guard kept {kept}"),
    ):
        model = copy.deepcopy(dense)
        perms = candidates[plan]
        reports = [prune_site_(model, s, nm, "wanda", stats, perms[s.name], [scores[c] for c in s.consumers])
                   for s in sites]
        rows.append({"method": method, "pattern": pattern, "ppl": perplexity(model, windows.eval, progress=progress),
                     "seconds": seconds, "note": note})
        result = PruneResult(sites, perms, reports, history, kept, guard, seconds)
        log.info("%s: ppl %.2f", method, rows[-1]["ppl"])
    if out is not None and result is not None:
        from .io import export
        from .report import write_report

        export(model, out, sites, result.perms, pattern=pattern, score="wanda", groups=cfg.groups,
               tokenizer=tokenizer, metrics={"demo": rows}, overwrite=overwrite, config=cfg.to_json())
        write_report(out, f"permsparse demo ({preset})", rows, cfg.to_json(), result.reports, history, guard, kept)
    return rows

"""The embedded demo: dense / Wanda / heuristic / learned perplexity side by side.

Runs on the embedded default (SmolLM2-135M-Instruct and Wikipedia text shipped in PyPI
wheels), so it needs no hub. Calibration, scores and the heuristic are computed once and
shared by the three pruned variants (one-shot), so the learned run trains end to end
(``objective="e2e"``; ``permsparse prune`` learns SmolLM2 block by block) within a time budget.
``quick`` finishes in a few minutes on 2 CPU cores; ``full`` uses the quality table's
settings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from permsparse.api import plan_candidates
from permsparse.config import LearnConfig, PruneConfig
from permsparse.data.text import load_text_windows
from permsparse.evaluate import perplexity
from permsparse.io.export import export
from permsparse.models.loading import load_model
from permsparse.report import write_report
from permsparse.train.loop import make_batches

__all__ = ["PRESETS", "run_demo"]

log = logging.getLogger(__name__)

# n_calib windows of 512 tokens; eval_tokens from the end of the corpus; training seconds.
PRESETS: dict[str, dict] = {
    # 24 windows: the guard judges on the last 2 batches, held out of training (an in-sample guard kept a
    # learned plan that lost on held-out text: docs/results.md, "A guard on held-out batches").
    "quick": {"n_calib": 24, "eval_tokens": 8192, "learn": {"objective": "e2e", "epochs": 2.0, "batch_size": 4,
                                                                "time_budget": 150.0, "guard_holdout": True}},
    "full": {"n_calib": 96, "eval_tokens": 32768, "learn": {"objective": "e2e", "epochs": 3.0, "batch_size": 4,
                                                                 "time_budget": 600.0}},
}


def run_demo(preset: str = "quick", out: "str | Path | None" = None, overwrite: bool = False,
             progress: bool = True, model_spec: str = "smollm2-135m", pattern: str = "2:4") -> list[dict]:
    """Prune the embedded model three ways and return one row per method."""
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

    # float32 statistics: the wanda and heuristic rows are exactly what prune() gives without learning.
    run = plan_candidates(dense, cfg, make_batches(windows.calib, cfg.learn.batch_size), bf16_calibration=False)
    shared, learn_s, kept = run.calibration.seconds, run.learn_seconds, run.kept

    model = result = None
    for method, plan, seconds, note in (
        ("wanda", "none", shared, "calibration"),
        ("wanda+heuristic", "heuristic", shared, "calibration + zig-zag"),
        ("wanda+learned", kept, shared + learn_s,
         f"+ {len(run.history)} steps in {learn_s:.0f}s; guard kept {kept}"),
    ):
        model, result = run.pruned(dense, plan)
        result.seconds = seconds
        note += "; kept weights refitted" if cfg.refits else ""  # reconstruction, the default
        rows.append({"method": method, "pattern": pattern, "ppl": perplexity(model, windows.eval, progress=progress),
                     "seconds": seconds, "note": note})
        log.info("%s: ppl %.2f", method, rows[-1]["ppl"])
    if out is not None and result is not None:
        export(model, out, run.sites, result.perms, pattern=pattern, score="wanda", groups=result.groups,
               tokenizer=tokenizer, metrics={"demo": rows}, overwrite=overwrite, config=cfg.to_json())
        write_report(out, f"permsparse demo ({preset})", rows, cfg.to_json(), result.reports, run.history,
                     run.guard, kept)
    return rows

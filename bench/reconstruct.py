"""Reconstruction after the mask: the same plans with and without refitting the kept weights.

    python bench/reconstruct.py                     # about 16 minutes on 2 idle CPU cores
    python bench/reconstruct.py --pattern 4:8
    python bench/reconstruct.py --plan runs/s0 [runs/s1 ...]   # plans of earlier runs, 3 min each

``--plan``: the learned plans of ``permsparse prune smollm2-135m --seed S --out runs/sS`` runs
(the default command), each replayed on the dense model with the run's own calibration (its
seed's windows, the bf16 pass of a learned run) with and without the refit: the same plan and
masks, so the difference is the reconstruction's alone. Rows go to ``reconstruct_plans.{json,md}``.

SmolLM2-135M-Instruct with the library's defaults, as ``permsparse prune smollm2-135m`` runs
them (Wanda, G = 4, one permutation per layer, 128 calibration windows of 512 tokens, a 600 s
training budget). One calibration and one learned run; each of its plans (none, heuristic, the
learned plan the guard kept) then prunes a copy of the dense model twice: with the plain mask
``W ⊙ M`` and refitted with that mask fixed, by each ``--refit`` method (``lstsq``, the default:
the exact masked least squares; ``obs``: SparseGPT's one-pass OBS update). Held-out perplexity on the last 32,768 tokens. Rows are added to
``bench/results/reconstruct.json`` (keyed by pattern and plan) and ``reconstruct.md`` is
rewritten from all of them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from permsparse.api import plan_candidates  # noqa: E402
from permsparse.config import DataConfig, LearnConfig, PruneConfig  # noqa: E402
from permsparse.core.reconstruct import REFIT_METHODS  # noqa: E402
from permsparse.data.text import load_text_windows  # noqa: E402
from permsparse.evaluate import perplexity  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.models.loading import load_model  # noqa: E402
from permsparse.train.loop import make_batches  # noqa: E402
from permsparse.report import markdown_table  # noqa: E402

COLUMNS = ["pattern", "seed", "plan", "ppl_masked", "ppl_obs", "ppl_lstsq", "guard_kept", "steps", "learn_seconds",
           "refit_seconds_obs", "refit_seconds_lstsq"]
PLAN_COLUMNS = ["pattern", "sites", "seed", "plan", "ppl_masked", "ppl_obs", "ppl_lstsq", "ppl_run",
                "refit_seconds_obs", "refit_seconds_lstsq"]


def masked_and_refitted(calibration, dense, perms: dict, eval_windows) -> dict:
    """Perplexity of a copy of ``dense`` pruned with ``perms`` by ``calibration``: with the plain
    mask (``ppl_masked``) and refitted by each method (``ppl_obs``, ``ppl_lstsq``; the calibration
    must hold the Hessians). The same masks each time, so the differences are the refit's alone."""
    out = {}
    for method in (None, *REFIT_METHODS):
        calibration.cfg = dataclasses.replace(calibration.cfg, reconstruct=method is not None,
                                              refit=method or calibration.cfg.refit)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        calibration.apply_(model, perms)
        if method is not None:
            out[f"refit_seconds_{method}"] = round(time.perf_counter() - t0, 1)
        out[f"ppl_{method or 'masked'}"] = round(perplexity(model, eval_windows, progress=False), 2)
    return out


def _migrate(rows: list[dict]) -> list[dict]:
    """Rows measured when OBS was the only refit call it ``ppl_reconstructed``: the same quantity."""
    for r in rows:
        if "ppl_reconstructed" in r:
            r["ppl_obs"] = r.pop("ppl_reconstructed")
        if "refit_seconds" in r:
            r["refit_seconds_obs"] = r.pop("refit_seconds")
    return rows


def measure(pattern: str, seed: int) -> list[dict]:
    torch.manual_seed(0)
    dense, tok = load_model("smollm2-135m")
    data = DataConfig()
    windows = load_text_windows(data.calib, tok, data.window, data.n_calib, seed, eval_tokens=data.eval_tokens)
    cfg = PruneConfig(pattern=pattern, learn=LearnConfig(seed=seed), progress=False)  # the library's defaults
    t0 = time.perf_counter()
    plans = plan_candidates(dense, cfg, windows.calib)
    learn_seconds = time.perf_counter() - t0
    rows = []
    for plan in ("none", "heuristic", "learned"):
        row = {"pattern": pattern, "seed": seed, "plan": plan, "guard_kept": plans.kept, "steps": len(plans.history),
               "learn_seconds": round(learn_seconds)}
        row.update(masked_and_refitted(plans.calibration, dense, plans.plans[plan], windows.eval))
        print(row, flush=True)
        rows.append(row)
    return rows


def replay(plan_dirs: list[str]) -> list[dict]:
    """Each saved run's plan applied to the dense model, with the plain mask and with the refit."""
    from permsparse.io.plan import read_plan
    from permsparse.pipeline.calibration import calibrate

    dense, tok = load_model("smollm2-135m")
    rows = []
    for d in plan_dirs:
        meta, sites, perms = read_plan(d)
        cfg = PruneConfig.from_json(meta["config"])
        data = DataConfig(**{k: v for k, v in meta["config"].get("data", {}).items() if k in ("n_calib", "window",
                                                                                                "eval_tokens")})
        windows = load_text_windows("wikipedia", tok, data.window, data.n_calib, cfg.learn.seed,
                                    eval_tokens=data.eval_tokens)
        # As the run calibrated: a learned run's pass is under bf16 autocast (api.plan_candidates).
        calibration = calibrate(dense, dataclasses.replace(cfg, reconstruct=True), make_batches(windows.calib,
                                cfg.learn.batch_size), sites=sites, heuristic=False,
                                bf16=cfg.permutation == "learned" and cfg.learn.bf16)
        row = {"pattern": cfg.pattern, "seed": cfg.learn.seed, "plan": meta["metrics"].get("kept_plan"),
               "sites": "synchronised" if cfg.sync else "independent", "ppl_run": round(meta["metrics"]["ppl"], 2)}
        row.update(masked_and_refitted(calibration, dense, perms, windows.eval))
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", nargs="+", help="run folders (permsparse.json) whose plans to replay")
    ap.add_argument("--out", default=str(HERE / "results"))
    opts = ap.parse_args()
    out = Path(opts.out)
    if opts.plan:
        path = out / "reconstruct_plans.json"
        old = _migrate(json.loads(path.read_text())["rows"]) if path.exists() else []
        new = replay(opts.plan)
        def key(r: dict) -> tuple:  # one run's plan; a re-run of a seed is another row
            return tuple(r.get(k) for k in ("pattern", "sites", "seed", "ppl_run"))

        replayed = {key(n) for n in new}
        rows = [r for r in old if key(r) not in replayed] + new
        meta = {"command": "python bench/reconstruct.py --plan " + " ".join(opts.plan),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
        atomic_write_json(path, {"rows": rows, "meta": meta})
        atomic_write_text(out / "reconstruct_plans.md", (
            "# Reconstruction on the default command's plans\n\n"
            f"Command: `{meta['command']}` (the folders: `permsparse prune smollm2-135m --seed S --out DIR`)\n\n"
            "Each run's plan (the permutations the guard kept) applied to the dense SmolLM2 again, calibrated as "
            "the run was (its seed's 128 windows, the bf16 pass), with the plain mask (`ppl_masked`) and with the "
            "kept weights refitted: `ppl_obs` by SparseGPT's one-pass OBS update (`--refit obs`), `ppl_lstsq` by "
            "the exact masked least squares (`--refit lstsq`, the default now; rows without it were measured "
            "before it existed); `ppl_run`: what the run itself reported. Held-out perplexity on the embedded "
            f"Wikipedia's last 32,768 tokens. Machine: {meta['machine']}. {meta['date']}.\n\n"
            + markdown_table(rows, PLAN_COLUMNS)))
        return
    path = out / "reconstruct.json"
    old = _migrate(json.loads(path.read_text())["rows"]) if path.exists() else []
    rows = measure(opts.pattern, opts.seed)
    rows = [r for r in old if (r["pattern"], r.get("seed", 0)) != (opts.pattern, opts.seed)] + rows
    meta = {"command": "python bench/reconstruct.py", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(path, {"rows": rows, "meta": meta})
    atomic_write_text(out / "reconstruct.md", (
        "# Reconstruction after the mask\n\n"
        f"Command: `{meta['command']} [--pattern 4:8]`\n\n"
        "SmolLM2-135M-Instruct with the library's defaults (Wanda, G = 4, one permutation per layer, o_proj "
        "gathered, 128 x 512 calibration tokens, the learned trainer with a 600 s budget). Each plan of one calibration and one learned run prunes the dense "
        "model with the plain mask (`ppl_masked`) and with the kept weights refitted with that mask fixed: by "
        "SparseGPT's OBS update (`ppl_obs`, `--refit obs`) and by the exact masked least squares (`ppl_lstsq`, "
        "`--refit lstsq`, the default; empty in rows measured before it existed). Held-out perplexity on the last 32,768 "
        "tokens of the embedded Wikipedia. `steps`: training steps the budget allowed (fewer on a busy "
        f"machine). Machine: {meta['machine']}, torch {meta['torch']}. {meta['date']}.\n\n"
        + markdown_table(rows, COLUMNS)))


if __name__ == "__main__":
    main()

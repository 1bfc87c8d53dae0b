"""Reconstruction after the mask: the same plans with and without refitting the kept weights.

    python bench/reconstruct.py                     # about 16 minutes on 2 idle CPU cores
    python bench/reconstruct.py --pattern 4:8

SmolLM2-135M-Instruct with the library's defaults, as ``permsparse prune smollm2-135m`` runs
them (Wanda, G = 4, one permutation per layer, 128 calibration windows of 512 tokens, a 600 s
training budget). One calibration and one learned run; each of its plans (none, heuristic, the
learned plan the guard kept) then prunes a copy of the dense model twice: with the plain mask
``W ⊙ M`` and with ``reconstruct=True`` (the default: SparseGPT's OBS update with that mask
fixed, in the permuted layout). Held-out perplexity on the last 32,768 tokens. Rows are added to
``bench/results/reconstruct.json`` (keyed by pattern and plan) and ``reconstruct.md`` is
rewritten from all of them.
"""

from __future__ import annotations

import argparse
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
from permsparse.data.text import load_text_windows  # noqa: E402
from permsparse.evaluate import perplexity  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.models.loading import load_model  # noqa: E402
from permsparse.report import markdown_table  # noqa: E402

COLUMNS = ["pattern", "seed", "plan", "ppl_masked", "ppl_reconstructed", "guard_kept", "steps", "learn_seconds",
           "refit_seconds"]


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
        for recon in (False, True):
            plans.calibration.cfg = dataclasses.replace(plans.calibration.cfg, reconstruct=recon)
            t1 = time.perf_counter()
            model, _ = plans.pruned(dense, plan)
            if recon:
                row["refit_seconds"] = round(time.perf_counter() - t1, 1)
            row["ppl_reconstructed" if recon else "ppl_masked"] = round(perplexity(model, windows.eval,
                                                                                   progress=False), 2)
            del model
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results"))
    opts = ap.parse_args()
    out = Path(opts.out)
    path = out / "reconstruct.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
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
        "model with the plain mask (`ppl_masked`) and with the kept weights refitted by SparseGPT's OBS update "
        "with that mask fixed (`ppl_reconstructed`, `--reconstruct`). Held-out perplexity on the last 32,768 "
        "tokens of the embedded Wikipedia. `steps`: training steps the budget allowed (fewer on a busy "
        f"machine). Machine: {meta['machine']}, torch {meta['torch']}. {meta['date']}.\n\n"
        + markdown_table(rows, COLUMNS)))


if __name__ == "__main__":
    main()

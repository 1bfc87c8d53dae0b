"""The heuristic's search objective on the embedded default: kept Σ score against Σ score².

    python bench/heuristic.py        # about 6 minutes on 2 CPU cores

SmolLM2-135M-Instruct, Wanda 2:4 from 32 calibration windows of 512 tokens, G = 4; for
synchronised sites and for one permutation per layer, the zig-zag + assignment heuristic
with ``power`` 1 (the plain kept score of RIA / Apex) and 2 (the default: the output error
energy ``w²‖x‖²``). Held-out perplexity on the first 16 evaluation windows (8,192 tokens).
Writes ``bench/results/heuristic.json`` (``rows``) and ``heuristic.md``.
"""

from __future__ import annotations

import argparse
import platform
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from settings import BEFORE_0_2  # noqa: E402

from permsparse.models.apply import heuristic_permutation, prune_site_  # noqa: E402
from permsparse.core.pattern import parse_pattern  # noqa: E402
from permsparse.data.text import load_text_windows  # noqa: E402
from permsparse.evaluate import perplexity  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.train.loop import make_batches  # noqa: E402
from permsparse.models.loading import load_model  # noqa: E402
from permsparse.api import score_sites  # noqa: E402
from permsparse.config import PruneConfig  # noqa: E402
from permsparse.report import markdown_table  # noqa: E402
from permsparse.models.sites import find_sites, get_module  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results"))
    opts = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.requires_grad_(False)
    windows = load_text_windows("wikipedia", tok, 512, 32, 0, eval_tokens=32768)
    ev = windows.eval[: opts.eval_windows]
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    pattern = parse_pattern("2:4")
    rows = []
    for sync in (True, False):
        sites = find_sites(model, sync=sync)
        stats, scores, _ = score_sites(model, sites, PruneConfig(groups=opts.groups, progress=False,
                                                                            **{**BEFORE_0_2, "sync": sync}),
                                       make_batches(windows.calib, 4), heuristic=False)
        for power in (None, 1.0, 2.0):  # None: no permutation
            t0 = time.perf_counter()
            perms = {} if power is None else {
                s.name: heuristic_permutation(s, [scores[c] for c in s.consumers], pattern, opts.groups, power=power)
                for s in sites}
            seconds = time.perf_counter() - t0
            reports = [prune_site_(model, s, pattern, "wanda", stats, perms.get(s.name),
                                   [scores[c] for c in s.consumers]) for s in sites]
            ppl = perplexity(model, ev, progress=False)
            with torch.no_grad():
                for n, w in dense.items():
                    get_module(model, n).weight.copy_(w)
            row = {"sites": "synchronised" if sync else "independent",
                   "power": "none" if power is None else power, "ppl": round(ppl, 2),
                   "retained": round(sum(r.retained for r in reports) / len(reports), 4),
                   "heuristic_seconds": round(seconds, 1)}
            print(row, flush=True)
            rows.append(row)
    out = Path(opts.out)
    meta = {"command": "python bench/heuristic.py " + " ".join(sys.argv[1:]), "groups": opts.groups,
            "eval_tokens": int(ev.numel()), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(out / "heuristic.json", {"rows": rows, "meta": meta})
    atomic_write_text(out / "heuristic.md", (
        "# The heuristic's objective: kept Σ score^power\n\n"
        f"Command: `{meta['command']}`\n\n"
        f"SmolLM2-135M-Instruct, Wanda 2:4 from 32 x 512 calibration tokens, G = {opts.groups}; held-out "
        f"perplexity on {meta['eval_tokens']} tokens; `retained` is the kept share of Σ score (power 1's "
        f"objective). Machine: {meta['machine']}. {meta['date']}.\n\n"
        + markdown_table(rows, ["sites", "power", "ppl", "retained", "heuristic_seconds"])))


if __name__ == "__main__":
    main()

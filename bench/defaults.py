"""The default command, measured as a user runs it: ``permsparse prune smollm2-135m``.

    python bench/defaults.py                       # the 2:4 table (about 1 h 40 min on 2 idle CPU cores)
    python bench/defaults.py --rows learned-sync   # re-run some rows, keep the others
    python bench/defaults.py --pattern 4:8 --rows wanda,heuristic,learned --seeds 0
    python bench/defaults.py --rows sparsegpt,heuristic-sparsegpt   # SparseGPT's mask (about 15 min)
    python bench/defaults.py --domain python-docs --rows wanda,unstructured50,heuristic,learned --seeds 0

Every row is one ``permsparse prune`` command in its own process, with the library's defaults
plus the flags the row names (``command`` in the table), on SmolLM2-135M-Instruct and the
embedded Wikipedia (the CLI's evaluation: the last 32,768 tokens in 512-token windows,
calibration windows drawn before them). The learned rows run once per seed (``--seed``: the
calibration sample, the batches and the cost noise). The reference rows set the gap:
gap_closed = (ppl Wanda − ppl row) / (ppl Wanda − ppl Wanda unstructured 50 %), both without
reconstruction. Writes ``bench/results/defaults.json`` (``rows``) and ``defaults.md`` (``--name``: another file name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.report import markdown_table  # noqa: E402

MODEL = "smollm2-135m"
#: row -> the flags it adds to ``permsparse prune MODEL --pattern P``; learned rows repeat per seed.
ROWS = {
    "wanda": ["--permutation", "none", "--no-reconstruct"],
    "unstructured50": ["--permutation", "none", "--no-reconstruct"],  # pattern replaced
    "wanda-reconstructed": ["--permutation", "none"],
    "heuristic-masked": ["--permutation", "heuristic", "--no-reconstruct"],
    "heuristic": ["--permutation", "heuristic"],
    # SparseGPT's one-pass OBS update as the refit, the default before the exact least squares.
    "heuristic-obs": ["--permutation", "heuristic", "--refit", "obs"],
    # The default objective (auto) is the block-wise one for SmolLM2: block by block on the pruned
    # blocks' outputs, each block's statistics, masks, refit and plan from the inputs the pruned
    # model gives it, each block's guard choosing among none, the one-group heuristic and the plan
    # learned within 4 groups of its layout (--base-groups 1).
    "learned": [],
    # The default before --base-groups: learned within 4 groups from the 4-group heuristic.
    "learned-base0": ["--base-groups", "0"],
    # The end-to-end objective (CE + KL on the model's output), the default before auto.
    "learned-e2e": ["--objective", "e2e"],
    "learned-obs": ["--objective", "e2e", "--refit", "obs"],
    "learned-sync": ["--objective", "e2e", "--sync"],
    "learned-masked": ["--no-reconstruct"],
    "heuristic-sequential": ["--permutation", "heuristic", "--sequential"],
    # One permutation of all the channels (G = 1), which the refit favours (docs/results.md).
    "heuristic-sequential-g1": ["--permutation", "heuristic", "--sequential", "--groups", "1"],
    # Each block's guard on batches the block did not train on.
    "learned-guard-holdout": ["--guard-holdout"],
    # Is the budget what stops the trainer? 64 steps in every block, no time budget (about 28 min).
    "learned-64steps": ["--steps-per-block", "64", "--time-budget", "0", "--prune-budget", "0"],
    # The block-wise guard on every calibration batch, as before --block-guard-batches (8).
    "learned-blockwise-allguard": ["--objective", "blockwise", "--block-guard-batches", "0"],
    # SparseGPT's mask (chosen by OBS inside each N:M block of the permuted layout) instead of Wanda's.
    "sparsegpt": ["--permutation", "none", "--score", "sparsegpt"],
    "heuristic-sparsegpt": ["--permutation", "heuristic", "--score", "sparsegpt"],
    "learned-sparsegpt": ["--score", "sparsegpt"],
}
LEARNED = ("learned", "learned-base0", "learned-guard-holdout", "learned-64steps", "learned-e2e", "learned-obs",
           "learned-sync", "learned-masked", "learned-blockwise-allguard", "learned-sparsegpt")
#: rows run once per seed (a seed draws the calibration sample even without learning)
SEEDED = LEARNED + ("heuristic-sparsegpt", "heuristic-sequential", "heuristic-sequential-g1")
COLUMNS = ["domain", "pattern", "row", "seed", "ppl", "gap_closed", "prune_seconds", "train_steps", "kept_plan",
           "learned_over_heuristic", "peak_rss_mb", "command"]


def python_docs(path: Path) -> Path:
    """A second text domain that every CPython ships: the language reference's topics
    (``pydoc_data``, about 110k SmolLM2 tokens of technical English with code)."""
    import pydoc_data.topics as topics

    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), encoding="utf-8")
    return path


def machine() -> str:
    """The cores and whether they compute bfloat16 natively: the learned rows train in bfloat16
    where they do and in float32 where they do not, which changes their speed and their numbers."""
    from permsparse.models.precision import native_bf16

    bf16 = "native bfloat16" if native_bf16("cpu") else "no native bfloat16 (float32)"
    return f"{platform.machine()}, {os.cpu_count()} cores, {bf16}"


def run_row(row: str, pattern: str, seed: int, domain: str = "wikipedia") -> dict:
    flags = ["--pattern", "unstructured50" if row == "unstructured50" else pattern, *ROWS[row]]
    if row in SEEDED:
        flags += ["--seed", str(seed)]
    with tempfile.TemporaryDirectory() as tmp:
        if domain == "python-docs":
            flags += ["--calib", str(python_docs(Path(tmp) / "python-docs.txt"))]
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "permsparse.cli", "prune", MODEL, *flags, "--out", str(out), "-q"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
        plan = json.loads((out / "permsparse.json").read_text())
        steps = (out / "steps.jsonl").read_text().splitlines() if (out / "steps.jsonl").exists() else []
    m = plan["metrics"]
    rec = {"domain": domain, "pattern": pattern, "row": row, "seed": seed if row in SEEDED else None, "ppl": m["ppl"],
           "ppl_dense": m["ppl_dense"], "prune_seconds": m["prune_seconds"], "kept_plan": m["kept_plan"],
           "train_steps": len(steps), "learned_over_heuristic": learned_over_heuristic(m.get("guard") or {}),
           "peak_rss_mb": m["peak_rss_mb"], "wall_seconds": time.perf_counter() - t0,
           "command": " ".join(["permsparse prune", MODEL, *flags]).replace(tmp + "/", "")}
    print(json.dumps(rec), flush=True)
    return rec


def learned_over_heuristic(guard: dict) -> float | None:
    """Median over the blocks of the learned plan's refitted loss over the heuristic's, minus 1
    (negative: the learned plan refits better), from a block-wise run's guard record
    (``<block>:learned+refit``); None where the guard refitted no learned plan."""
    ratios = [v / guard[k.replace(":learned+", ":heuristic+")] - 1 for k, v in guard.items()
              if k.endswith(":learned+refit") and guard.get(k.replace(":learned+", ":heuristic+"))]
    return round(statistics.median(ratios), 4) if ratios else None


def add_gap(rows: list[dict]) -> None:
    for r in rows:
        same = [w for w in rows if w.get("domain", "wikipedia") == r.get("domain", "wikipedia")]
        ceiling = next((w["ppl"] for w in same if w["row"] == "unstructured50"), None)
        wanda = next((w["ppl"] for w in same if w["row"] == "wanda" and w["pattern"] == r["pattern"]), None)
        ok = r["row"] not in ("wanda", "unstructured50") and wanda and ceiling and wanda > ceiling
        r["gap_closed"] = round((wanda - r["ppl"]) / (wanda - ceiling), 4) if ok else None


def summary(rows: list[dict]) -> str:
    """Mean and spread over seeds of each learned row, and the issue's targets read on them."""
    lines = ["\n## Rows over seeds\n"]
    for domain, pattern in sorted({(r["domain"], r["pattern"]) for r in rows}):
        mine = [r for r in rows if (r["domain"], r["pattern"]) == (domain, pattern)]
        heur = next((r for r in mine if r["row"] == "heuristic"), None)
        kept = sorted({r["row"] for r in mine if r["row"] not in ROWS and r.get("seed") is not None})
        for name in SEEDED + tuple(kept):
            runs = [r for r in mine if r["row"] == name and r["gap_closed"] is not None]
            if not runs:
                continue
            ppl = [r["ppl"] for r in runs]
            gap = statistics.mean(r["gap_closed"] for r in runs)
            spread = f" ± {statistics.stdev(ppl):.1f}" if len(ppl) > 1 else ""
            minutes = max(r["prune_seconds"] for r in runs) / 60
            lines.append(f"- {domain}, {pattern}, {name}: `{runs[0]['command']}`: {len(runs)} run(s), ppl {statistics.mean(ppl):.1f}"
                         f"{spread} ({', '.join(f'{p:.1f}' for p in ppl)}), gap closed {100 * gap:.1f} % on "
                         f"average, slowest prune {minutes:.1f} min"
                         + (f"; heuristic {heur['ppl']:.1f} ({100 * heur['gap_closed']:.1f} %)" if heur else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the learned rows")
    ap.add_argument("--domain", default="wikipedia", choices=("wikipedia", "python-docs"),
                    help="the text: the embedded Wikipedia or the Python language reference (a second domain)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="defaults",
                    help="the table's file name: OUT/NAME.json and OUT/NAME.md "
                         "(another machine's table beside this one)")
    opts = ap.parse_args()
    names = [r.strip() for r in opts.rows.split(",") if r.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in opts.seeds.split(",")]
    out = Path(opts.out)
    path = out / f"{opts.name}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows = saved.get("rows", [])
    meta = {"command": "python bench/defaults.py " + " ".join(sys.argv[1:]),
            "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if saved.get("meta", {}).get("note"):  # what the kept rows need said stays said
        meta["note"] = saved["meta"]["note"]
    for name in names:
        for seed in (seeds if name in SEEDED else [None]):
            new = run_row(name, opts.pattern, seed if seed is not None else 0, opts.domain)
            rows = [r for r in rows if _key(r) != _key(new)]
            rows.append(new)
            add_gap(rows)
            rows.sort(key=lambda r: (r["domain"] != "wikipedia", r["domain"], r["pattern"], _order(r["row"]),
                                     r.get("seed") or 0))
            # Written after every row: a stopped run keeps what it measured.
            atomic_write_json(path, {"rows": rows, "meta": meta})
            atomic_write_text(out / f"{opts.name}.md", render(rows, meta))


def _order(row: str) -> int:
    """A row's place in the table: as in ``ROWS``; a kept row of an earlier library (not in
    ``ROWS``: no flag of today's reproduces it, the note says what it was) after them."""
    return list(ROWS).index(row) if row in ROWS else len(ROWS)


def _key(r: dict) -> tuple:
    return r["domain"], r["pattern"], r["row"], r.get("seed")


def render(rows: list[dict], meta: dict) -> str:
    return ("# The default command\n\n"
            f"Command: `{meta['command']}` (rows from earlier invocations are kept)\n\n"
            "Each row is `permsparse prune smollm2-135m --pattern P` with the flags in `command`, run as a user "
            "runs it: SmolLM2-135M-Instruct, the embedded Wikipedia (`domain` python-docs: the Python "
            "language reference that CPython ships, `--calib FILE`), the CLI's held-out perplexity (the text's "
            "last 32,768 tokens). The defaults: Wanda, G = 4, one permutation per layer, o_proj gathered, 128 "
            "calibration windows of 512 tokens, the auto objective (for SmolLM2 the block-wise one: block by "
            "block on the pruned blocks' outputs, 24 steps per block at most, each block's guard on 8 "
            "batches; end to end: 3 epochs at most), a 600 s training budget (block-wise, since 2026-12-03, "
            "also an 840 s budget for the whole walk), reconstruction after the mask. "
            "gap_closed is measured against the Wanda and unstructured 50 % rows "
            "(both without reconstruction). learned_over_heuristic (block-wise rows since 2026-12-07): the "
            "median over the blocks of the learned plan's refitted guard loss over the heuristic's, minus 1 "
            "(negative: learning refits better). prune_seconds: calibration, training, guard and "
            f"reconstruction (the evaluations excluded). Machine: {meta['machine']}. {meta['date']}.\n\n"
            + (f"{meta['note']}\n\n" if meta.get("note") else "")
            + markdown_table(rows, COLUMNS) + summary(rows))


if __name__ == "__main__":
    main()

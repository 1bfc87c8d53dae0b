"""Quality table on the embedded default: perplexity, prune time and peak memory per method.

    python bench/quality.py            # the full table (about 1 h on 2 CPU cores)
    python bench/quality.py --quick    # a smoke run: fewer windows, 2:4 only
    python bench/quality.py --update --methods wanda+heuristic,wanda+learned   # re-run some rows, keep the rest

Every row runs in a fresh subprocess (so ``peak_rss_mb`` is that method's own peak) on
SmolLM2-135M-Instruct and the embedded Wikipedia split (evaluation = the last 32,768
tokens in 512-token windows; calibration windows drawn before them). Writes
``bench/results/quality.json`` (``rows`` of flat records), ``quality.md`` and
``quality_curve.png`` (perplexity of the learned run's hard permutations against training
minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from settings import BEFORE_0_2  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

METHODS = {
    # method: (score, permutation, pattern override)
    "magnitude": ("magnitude", "none", None),
    "wanda": ("wanda", "none", None),
    "wanda+heuristic": ("wanda", "heuristic", None),
    "wanda+learned": ("wanda", "learned", None),
    "sparsegpt": ("sparsegpt", "none", None),
    "wanda-unstructured50": ("wanda", "none", "unstructured50"),
}


def worker(args: argparse.Namespace) -> None:
    """One row, in its own process."""
    import torch

    from permsparse.data.text import load_text_windows
    from permsparse.evaluate import perplexity
    from permsparse.config import LearnConfig
    from permsparse.models.loading import load_model
    from permsparse.api import prune
    from permsparse.config import PruneConfig

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    n_calib = args.learned_n_calib if args.method == "wanda+learned" else args.n_calib
    windows = load_text_windows("wikipedia", tok, 512, n_calib, 0, eval_tokens=args.eval_tokens)
    row: dict = {"method": args.method, "pattern": args.pattern, "n_calib": n_calib,
                 "eval_windows": int(windows.eval.shape[0])}
    if args.method == "dense":
        row.update(ppl=perplexity(model, windows.eval, progress=False), prune_seconds=0.0)
    else:
        score, permutation, pattern = METHODS[args.method]
        extra = {"lr_end": args.lr_end} if args.lr_end is not None else {}  # else the library's default
        learn = LearnConfig(epochs=args.epochs, batch_size=args.batch_size, time_budget=args.train_seconds,
                            tau_schedule=args.tau_schedule, objective="e2e", **extra)
        cfg = PruneConfig(pattern=pattern or args.pattern, score=score, permutation=permutation,
                          groups=args.groups, learn=learn, progress=False, heuristic_power=args.heuristic_power,
                          **{**BEFORE_0_2, "sync": not args.independent})
        curve: list[dict] = []
        on_step = None
        if permutation == "learned" and args.curve_every:
            on_step = _curve_recorder(model, windows.eval[: args.curve_windows], curve, args.curve_every)
        t0 = time.perf_counter()
        result = prune(model, tok, cfg, windows.calib, on_step=on_step)
        seconds = time.perf_counter() - t0 - sum(c.get("eval_seconds", 0.0) for c in curve)
        if permutation != "none":
            row.update(sites="independent" if args.independent else "synchronised",
                       heuristic_power=args.heuristic_power)
        if permutation == "learned":
            row.update(tau_schedule=args.tau_schedule, snapshots=learn.snapshots, batch_size=args.batch_size,
                       average=",".join(f"{d:g}" for d in learn.average) or 0.0, train_seconds=args.train_seconds,
                       teacher_cache_gb=learn.teacher_cache_gb, lr_end=learn.lr_end,
                       tail_average=learn.tail_average)  # None: no tail average (rows from before it too)
        if args.tag:
            row["tag"] = args.tag
        row.update(ppl=perplexity(model, windows.eval, progress=False), prune_seconds=seconds,
                   kept_plan=result.kept_plan, train_steps=len(result.history))
        row.update(result.retained())
        if result.guard:
            row.update({f"guard_{k}": v for k, v in result.guard.items()})
        if curve:
            row["curve"] = curve
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    Path(args.json_out).write_text(json.dumps(row))


def _curve_recorder(model, eval_windows, curve: list, every: float):
    """Every ``every`` seconds of training, the perplexity of the current hard permutations
    on a few evaluation windows (its own time is excluded from the training time)."""
    state = {"train": 0.0, "next": 0.0}

    def on_step(rec, train_state) -> None:
        state["train"] += rec.seconds
        if state["train"] < state["next"]:
            return
        state["next"] = state["train"] + every
        t0 = time.perf_counter()
        ppl = params_ppl(model, train_state.hard_params(), eval_windows)
        curve.append({"train_minutes": state["train"] / 60.0, "step": rec.step, "ppl": ppl,
                      "eval_seconds": time.perf_counter() - t0})

    return on_step


def params_ppl(model, params: dict, eval_windows, bf16: bool = False) -> float:
    """Perplexity of ``model`` run with ``params`` (``functional_call``) on ``eval_windows``
    (bench/guard.py scores candidate plans with it too)."""
    from permsparse.evaluate import perplexity

    return perplexity(model, eval_windows, batch_size=4, progress=False, params=params, bf16=bf16)


def run_row(method: str, pattern: str, opts: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{method}_{pattern.replace(':', '-')}.json"
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--pattern", pattern, "--json-out", str(out),
           "--n-calib", str(opts.n_calib), "--learned-n-calib", str(opts.learned_n_calib), "--eval-tokens", str(opts.eval_tokens), "--groups", str(opts.groups),
           "--epochs", str(opts.epochs), "--batch-size", str(opts.batch_size),
           "--curve-every", str(opts.curve_every), "--curve-windows", str(opts.curve_windows),
           "--heuristic-power", str(opts.heuristic_power), "--tau-schedule", opts.tau_schedule]
    cmd += ["--independent"] if opts.independent else []
    if opts.train_seconds:
        cmd += ["--train-seconds", str(opts.train_seconds)]
    if opts.lr_end is not None:
        cmd += ["--lr-end", str(opts.lr_end)]
    if opts.tag:
        cmd += ["--tag", opts.tag]
    t0 = time.perf_counter()
    print(f"[quality] {method} {pattern} ...", flush=True)
    subprocess.run(cmd, check=True)
    row = json.loads(out.read_text())
    row["wall_seconds"] = time.perf_counter() - t0
    print(f"[quality] {method} {pattern}: ppl {row['ppl']:.2f} ({row['wall_seconds']:.0f}s)", flush=True)
    return row


#: What tells rows apart (curve points carry the same fields, to find their row).
KEY_FIELDS = ("method", "pattern", "sites", "tau_schedule", "batch_size", "average", "train_seconds",
              "teacher_cache_gb", "lr_end", "tail_average", "n_calib", "tag")


def _key(row: dict) -> tuple:
    """A row's identity: method, pattern, for permuted rows the sites setting, and for learned
    rows the trainer's variant (rows from before a column: the setting they ran with)."""
    learned = row["method"] == "wanda+learned"
    return (row["method"], row["pattern"], row.get("sites"), _schedule(row),
            row.get("batch_size", 4 if learned else None), row.get("average", 0.0 if learned else None),
            row.get("train_seconds", 600.0 if learned else None), row.get("teacher_cache_gb", 0.0 if learned else None),
            row.get("lr_end"), row.get("tail_average"),
            row.get("n_calib", 96 if learned else 32), row.get("tag"))


def _curve_point(c: dict) -> dict:
    return {k: v for k, v in c.items() if k not in KEY_FIELDS}


def _schedule(row: dict) -> str | None:
    """The learned rows' τ schedule (rows from before the column: exponential)."""
    return row.get("tau_schedule") or ("exponential" if row["method"] == "wanda+learned" else None)


def add_gap_closed(rows: list[dict]) -> None:
    """gap closed = (ppl Wanda − ppl method) / (ppl Wanda − ppl ceiling), per pattern."""
    ceiling = next((r["ppl"] for r in rows if r["method"] == "wanda-unstructured50"), None)
    for r in rows:
        wanda = next((w["ppl"] for w in rows if w["method"] == "wanda" and w["pattern"] == r["pattern"]), None)
        if r["method"] in ("dense", "wanda-unstructured50") or wanda is None or ceiling is None or wanda <= ceiling:
            r["gap_closed"] = None
        else:
            r["gap_closed"] = (wanda - r["ppl"]) / (wanda - ceiling)


def write_outputs(rows: list[dict], meta: dict) -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    from permsparse.io.atomic import atomic_write_json, atomic_write_text
    from permsparse.report import markdown_table

    RESULTS.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    curves = [dict(zip(KEY_FIELDS, _key(r)), **_curve_point(c)) for r in rows for c in r.get("curve", [])]
    atomic_write_json(RESULTS / "quality.json", {"rows": flat, "curve": curves, "meta": meta})
    cols = ["method", "pattern", "sites", "heuristic_power", "tau_schedule", "batch_size", "average", "teacher_cache_gb", "lr_end", "tail_average", "n_calib", "tag",
            "ppl", "gap_closed", "prune_seconds", "peak_rss_mb",
            "kept_plan", "train_steps", "retained_plain", "retained"]
    md = [f"# Quality on the embedded default\n\nCommand: `{meta['command']}`\n\n"
          f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), embedded Wikipedia: evaluation = the last "
          f"{meta['eval_tokens']} tokens in 512-token windows, calibration = {meta['n_calib']} windows of 512 drawn "
          f"before them ({meta['learned_n_calib']} for the learned rows, trained for at most {meta['epochs']} epochs "
          f"or {meta['train_seconds']:.0f} s, batch 4 x 512 unless `batch_size` says otherwise). Permuted rows: G = {meta['groups']}; `sites` says whether "
          f"layers reading the same input share one permutation (synchronised, DESIGN.md) or each layer has its own "
          f"(independent); the heuristic (also the learned rows' warm start) keeps the most Σ score^`heuristic_power`. gap_closed = (ppl wanda − ppl method) / (ppl wanda − ppl wanda "
          f"unstructured 50%). Machine: {meta['machine']}. {meta['date']}.\n\n",
          markdown_table(flat, cols), _targets(flat)]
    if curves:
        md.append("\n## Learned run: perplexity against training minutes\n\n")
        md.append(markdown_table(curves, ["pattern", "sites", "tau_schedule", "batch_size", "average", "train_minutes",
                                          "step", "ppl"]))
        md.append("\n(perplexity here on the first %d evaluation windows; the table above uses all)\n\n"
                  "![curve](quality_curve.png)\n" % meta["curve_windows"])
        _plot_curve(curves, rows, RESULTS / "quality_curve.png")
    atomic_write_text(RESULTS / "quality.md", "".join(md))


def _targets(rows: list[dict]) -> str:
    """The issue's targets, checked against the rows (one set of lines per sites setting)."""
    lines = ["\n## Targets\n"]
    for learned in [r for r in rows if r["method"] == "wanda+learned" and r["pattern"] == "2:4"]:
        sites = learned.get("sites", "synchronised")
        heur = next((r for r in rows if r["method"] == "wanda+heuristic" and r["pattern"] == "2:4"
                     and r.get("sites", "synchronised") == sites), None)
        tag = (f" ({sites} sites, τ {_schedule(learned)}, batch {_key(learned)[4]}, average {_key(learned)[5]}, "
               f"{_key(learned)[6]:.0f} s of training)")
        if learned.get("gap_closed") is not None:
            ok = learned["gap_closed"] >= 0.75
            lines.append(f"- learned closes >= 75% of the Wanda -> ceiling gap at 2:4{tag}: "
                         f"{100 * learned['gap_closed']:.1f}% (ppl {learned['ppl']:.1f}) — **{'met' if ok else 'not met'}**")
        if heur:
            ok = learned["ppl"] < heur["ppl"]
            lines.append(f"- learned beats the heuristic in the same run{tag}: {learned['ppl']:.1f} vs "
                         f"{heur['ppl']:.1f} — **{'met' if ok else 'not met'}**")
        ok = learned["prune_seconds"] <= 900
        lines.append(f"- the full learned prune (calibration included) within 15 min on 2 CPU cores{tag}: "
                     f"{learned['prune_seconds'] / 60:.1f} min — **{'met' if ok else 'not met'}**")
    # Repeated runs of one setting (the tag tells them apart; it names the library commit
    # where that differs): a single run is a draw, the mean is what the target is read on.
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] == "wanda+learned" and r["pattern"] == "2:4" and r.get("gap_closed") is not None:
            groups.setdefault(_key(r)[:-1], []).append(r)
    repeated = [g for g in groups.values() if len(g) > 1]
    if repeated:
        lines.append("\n### Repeated runs of one setting\n")
    for g in repeated:
        k = dict(zip(KEY_FIELDS, _key(g[0])))
        mean_gap = sum(r["gap_closed"] for r in g) / len(g)
        lines.append(f"- {k['sites']} sites, average {k['average']}, lr_end {k['lr_end']}, tail_average "
                     f"{k['tail_average']}, {k['n_calib']} windows: "
                     f"{len(g)} runs, ppl {', '.join(format(r['ppl'], '.1f') for r in g)} (mean "
                     f"{sum(r['ppl'] for r in g) / len(g):.1f}), gap closed mean {100 * mean_gap:.1f}% — "
                     f"**{'met' if mean_gap >= 0.75 else 'not met'} on average**")
    return "\n".join(lines) + "\n"


def _plot_curve(curves: list[dict], rows: list[dict], path: Path) -> None:
    from permsparse.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    def key(c: dict) -> tuple:
        return (c["pattern"], c.get("sites") or "synchronised", c.get("tau_schedule") or "exponential",
                c.get("batch_size") or 4, str(c.get("average") or 0), c.get("train_seconds") or 600.0)

    for k in sorted({key(c) for c in curves}):
        cs = [c for c in curves if key(c) == k]
        extra = ((f", batch {k[3]}" if k[3] != 4 else "") + (f", average {k[4]}" if k[4] != "0" else "")
                 + (f", {k[5]:.0f} s" if k[5] != 600 else ""))
        ax.plot([c["train_minutes"] for c in cs], [c["ppl"] for c in cs], "o-",
                label=f"learned {k[0]}, {k[1]}, τ {k[2]}{extra}")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("perplexity (eval subset)")
    ax.set_title("SmolLM2-135M, Wanda score: learned permutations over training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2:4 only, small budgets")
    ap.add_argument("--patterns", default="2:4,4:8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-calib", type=int, default=32, help="calibration windows of the one-shot rows")
    ap.add_argument("--learned-n-calib", type=int, default=96, help="calibration windows of the learned rows")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--independent", action="store_true",
                    help="permuted rows: one permutation per layer instead of one per site (the CLI's --independent)")
    ap.add_argument("--heuristic-power", type=float, default=2.0, help="the heuristic keeps the most Σ score^p [2]")
    ap.add_argument("--tau-schedule", default="linear", help="learned rows: τ schedule [linear, the library default]")
    ap.add_argument("--update", action="store_true",
                    help="run only --methods x --patterns and replace those rows in bench/results/quality.json "
                    "(the other rows, e.g. dense and the baselines, are kept)")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-seconds", type=float, default=600.0,
                    help="training time budget of the learned rows (the whole run must stay within 15 min)")
    ap.add_argument("--lr-end", type=float, default=None,
                    help="learned rows: the lr falls linearly to this [none: the library default]")
    ap.add_argument("--tag", default=None, help="a label kept with the rows, so that a repeat run is a row of its own")
    ap.add_argument("--curve-every", type=float, default=90.0, help="seconds of training between curve points")
    ap.add_argument("--curve-windows", type=int, default=16)
    # worker mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true",
                    help="only re-render quality.md and the plot from bench/results/quality.json")
    opts = ap.parse_args()
    if opts.worker:
        worker(opts)
        return
    if opts.render:
        saved = json.loads((RESULTS / "quality.json").read_text())
        rows = [dict(r) for r in saved["rows"]]
        for c in saved.get("curve", []):
            row = next(r for r in rows if _key(r) == _key(c))
            row.setdefault("curve", []).append(_curve_point(c))
        meta = {"learned_n_calib": next((r["n_calib"] for r in rows if r["method"] == "wanda+learned"), None),
                "epochs": opts.epochs, "train_seconds": opts.train_seconds, **saved["meta"]}
        write_outputs(rows, meta)
        return
    if opts.quick:
        opts.patterns, opts.n_calib, opts.learned_n_calib, opts.eval_tokens = "2:4", 8, 8, 4096
        opts.curve_every, opts.train_seconds = 0, 60
        opts.methods = "wanda,wanda+heuristic,wanda+learned,wanda-unstructured50"
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if not opts.update:
            rows.append(run_row("dense", "-", opts, Path(tmp)))
        for pattern in opts.patterns.split(","):
            for method in opts.methods.split(","):
                if METHODS[method][2] is not None and pattern != opts.patterns.split(",")[0]:
                    continue  # the unstructured ceiling does not depend on the N:M pattern
                rows.append(run_row(method, METHODS[method][2] or pattern, opts, Path(tmp)))
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    if opts.update:
        saved = json.loads((RESULTS / "quality.json").read_text())
        new = {_key(r) for r in rows}
        for r in rows:
            r["command"] = command
        kept = [dict(r) for r in saved["rows"] if _key(r) not in new]
        for c in saved.get("curve", []):
            row = next((r for r in kept if _key(r) == _key(c)), None)
            if row is not None:
                row.setdefault("curve", []).append(_curve_point(c))
        order = [(r["method"], r["pattern"]) for r in saved["rows"]]
        # Next to the row of the same method and pattern (new variants after the old ones).
        rows = sorted(kept + rows, key=lambda r: (order.index((r["method"], r["pattern"]))
                                                   if (r["method"], r["pattern"]) in order else len(order),
                                                   r in rows))
        command = saved["meta"]["command"] + "; then " + command
    add_gap_closed(rows)
    meta = {"command": command, "n_calib": opts.n_calib,
            "eval_tokens": opts.eval_tokens, "groups": opts.groups, "curve_windows": opts.curve_windows,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "learned_n_calib": opts.learned_n_calib, "epochs": opts.epochs, "train_seconds": opts.train_seconds,
            "date": time.strftime("%Y-%m-%d"), "total_minutes": (time.time() - t0) / 60}
    if not opts.quick:
        write_outputs(rows, meta)
    else:
        print(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Core benchmark: permutation efficacy of heuristics vs. learned permutations, and the cost
of one Sinkhorn projection and one hard assignment as the group size grows.

    python bench/core.py                      # full run, writes bench/results/core.{json,md}
    python bench/core.py --quick --out /tmp/b # smoke test with tiny budgets

Efficacy rows: 256 x 256 weights, score ``|W|``; (a) ``gaussian``: iid Gaussian, (b)
``lognormal_cols``: Gaussian times log-normal column scales ``exp(randn(256))``. Efficacy is
``(kept with π - kept plain N:M) / (kept unstructured - kept plain N:M)`` (0 = no gain,
1 = the unstructured ceiling); ``retained`` is the fraction of the total score kept.
Methods: ``plain`` (identity), ``zigzag`` (RIA-style zig-zag + 1 round of linear assignment),
``swap`` (greedy swaps from the identity, time budget), ``zigzag+swap`` (swaps from the
zig-zag), ``learned`` (:func:`fit_to_score` from noise, soft Sinkhorn), ``learned+warm``
(:func:`fit_to_score` warm-started from zigzag+swap). ``seconds`` of a warm-started method
includes the time of its warm start.

Timing rows: one Sinkhorn forward (20 iterations, G=1, float32) and one hard assignment
(:func:`hard_assignment`, i.e. scipy's linear_sum_assignment) of a ``k x k`` Gaussian cost.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from permsparse.core.heuristics import swap_search, zigzag_permutation
from permsparse.core.metrics import efficacy, retained, unstructured_kept
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.experimental.layer_learner import fit_to_score
from permsparse.core.sinkhorn import hard_assignment, sinkhorn

MATRICES = ("gaussian", "lognormal_cols")
PATTERNS = ("2:4", "4:8")
GROUPS = (1, 4)
METHODS = ("plain", "zigzag", "swap", "zigzag+swap", "learned-linear", "learned", "learned+warm")
TIMING_KS = (64, 128, 256, 512, 1024, 2048, 4096)

# Targets from the issue, on (b) lognormal_cols with 2:4. The reference implementation
# reached 54% with RIA's zig-zag and 66% with 20k greedy swaps.
TARGET_HEURISTIC = 0.55
TARGET_LEARNED = 0.66


def make_matrix(kind: str, size: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(size, size, generator=g)
    if kind == "lognormal_cols":
        w = w * torch.exp(torch.randn(size, generator=g))
    elif kind != "gaussian":
        raise ValueError(f"unknown matrix kind {kind!r}")
    return w


def _row(matrix: str, pattern: str, groups: int, method: str, score: torch.Tensor, perm: Permutation, seconds: float) -> dict:
    return {
        "matrix": matrix,
        "pattern": pattern,
        "groups": groups,
        "method": method,
        "efficacy": efficacy(score, pattern, perm),
        "retained": retained(score, pattern, perm),
        "seconds": seconds,
    }


def efficacy_rows(args: argparse.Namespace, log) -> list[dict]:
    rows = []
    for matrix in MATRICES:
        score = make_matrix(matrix, args.size, seed=args.seed).abs()  # (b) = (a) x column scales
        total = float(score.sum(dtype=torch.float64))
        for pattern in PATTERNS:
            ceiling = unstructured_kept(score, pattern) / total
            for groups in GROUPS:
                found: dict[str, tuple[Permutation, float]] = {}

                def run(method: str, fn, base: float = 0.0) -> None:
                    t0 = time.perf_counter()
                    perm = fn()
                    seconds = base + time.perf_counter() - t0
                    extra = {}
                    if isinstance(perm, tuple):  # fit_to_score: (best permutation, retained per step)
                        perm, history = perm
                        best_step = max(range(len(history)), key=history.__getitem__)
                        extra = {
                            "steps": len(history),
                            "best_step": best_step,
                            "best_step_retained": history[best_step],
                            "final_step_retained": history[-1],
                        }
                    found[method] = (perm, seconds)
                    row = _row(matrix, pattern, groups, method, score, perm, seconds)
                    row["retained_ceiling"] = ceiling
                    row.update(extra)
                    rows.append(row)
                    log(
                        f"{matrix:15s} {pattern} G={groups} {method:13s} "
                        f"efficacy {row['efficacy']:.3f} retained {row['retained']:.4f} ({seconds:.1f}s)"
                    )

                d_in = score.shape[1]
                run("plain", lambda: Permutation.identity(d_in, groups))
                run("zigzag", lambda: zigzag_permutation(score, pattern, groups, refine_rounds=1))
                run("swap", lambda: swap_search(score, pattern, groups, time_budget=args.swap_budget, seed=args.seed))
                zz, zz_s = found["zigzag"]
                run(
                    "zigzag+swap",
                    lambda: swap_search(score, pattern, groups, start=zz, time_budget=args.swap_budget, seed=args.seed),
                    base=zz_s,
                )
                learn = dict(steps=args.learn_steps, lr=args.learn_lr, seed=args.seed)
                run(  # the plain S P ⊙ M linearisation, for comparison
                    "learned-linear",
                    lambda: fit_to_score(score, pattern, groups, init="noise", surrogate="linear",
                                         **{**learn, "steps": args.linear_steps, "lr": args.linear_lr}),
                )
                run("learned", lambda: fit_to_score(score, pattern, groups, init="noise", **learn))
                zs, zs_s = found["zigzag+swap"]
                run(
                    "learned+warm",
                    lambda: fit_to_score(score, pattern, groups, init="permutation", warm_start=zs, **learn),
                    base=zs_s,
                )
    return rows


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing_rows(args: argparse.Namespace, log) -> list[dict]:
    rows = []
    for k in args.timing_ks:
        cost = torch.randn(1, k, k, generator=torch.Generator().manual_seed(args.seed + k))
        repeats = 5 if k <= 512 else (3 if k <= 1024 else 1)
        sinkhorn(cost[:, :8, :8], 0.1, 20)  # warm up kernels
        with torch.no_grad():
            t_sink = _time(lambda: sinkhorn(cost, 0.1, 20), repeats)
        t_assign = _time(lambda: hard_assignment(cost), repeats)
        rows.append(
            {
                "matrix": "timing",
                "k": k,
                "groups": 1,
                "sinkhorn_iters": 20,
                "repeats": repeats,
                "sinkhorn_seconds": t_sink,
                "assignment_seconds": t_assign,
            }
        )
        log(f"timing k={k:5d}: sinkhorn {t_sink:.4f}s, assignment {t_assign:.4f}s (median of {repeats})")
    return rows


# -- reporting -----------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def targets(rows: list[dict]) -> list[dict]:
    """Target checks on (b) lognormal_cols, 2:4, per group count."""
    out = []
    for groups in GROUPS:
        sel = {r["method"]: r["efficacy"] for r in rows if r.get("matrix") == "lognormal_cols" and r["pattern"] == "2:4" and r["groups"] == groups}
        if not sel:
            continue
        heur = max(("zigzag", "swap", "zigzag+swap"), key=lambda m: sel.get(m, -1.0))
        out.append(
            {
                "groups": groups,
                "best_heuristic": heur,
                "best_heuristic_efficacy": sel.get(heur),
                "heuristic_target": TARGET_HEURISTIC,
                "heuristic_met": sel.get(heur, -1.0) >= TARGET_HEURISTIC,
                "learned_efficacy": sel.get("learned"),
                "learned_met": sel.get("learned", -1.0) >= TARGET_LEARNED,
                "learned_warm_efficacy": sel.get("learned+warm"),
                "learned_warm_met": sel.get("learned+warm", -1.0) >= TARGET_LEARNED,
                "learned_target": TARGET_LEARNED,
            }
        )
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(rows: list[dict], meta: dict) -> str:
    eff = [r for r in rows if r["matrix"] != "timing"]
    tim = [r for r in rows if r["matrix"] == "timing"]
    lines = [
        "# Core benchmark: permutation efficacy and solver cost",
        "",
        f"Generated by `python bench/core.py` on {meta['date']} — torch {meta['torch']}, "
        f"{meta['cpu']} ({meta['cpu_count']} cores, torch threads {meta['torch_threads']}), "
        f"load average at start {meta['load_start']}, at end {meta['load_end']}; total {meta['total_seconds']:.0f} s.",
        "",
        f"Weights {meta['size']} x {meta['size']}, score `|W|`: (a) `gaussian` iid N(0,1); (b) `lognormal_cols` "
        "N(0,1) times column scales `exp(N(0,1))`. Efficacy = (kept with π − kept plain N:M) / "
        "(kept unstructured − kept plain N:M); retained = kept / total score; ceiling = retained by "
        "per-row unstructured pruning at the same sparsity.",
        f"Budgets: swap search {meta['swap_budget']} s per run; `learned` = `fit_to_score` with the insertion-gain "
        f"surrogate (`permsparse.core.heuristics.insertion_gain`), {meta['learn_steps']} steps, Adam lr "
        f"{meta.get('learn_lr', 0.005)}; `learned-linear` = the plain `S P ⊙ M` linearisation, "
        f"{meta.get('linear_steps', 200)} steps, lr {meta.get('linear_lr', 0.05)} (its best settings); both τ 1 → 0.01 "
        "exponential, 20 Sinkhorn iterations, soft P, returning the best hard permutation seen. Warm-started rows "
        "include their warm start's time.",
        "",
        "## Targets — (b) `lognormal_cols`, 2:4",
        "",
        f"Targets: best heuristic ≥ {_pct(TARGET_HEURISTIC)}, learned ≥ {_pct(TARGET_LEARNED)} "
        "(reference implementation: 54% with RIA's zig-zag, 66% with 20k greedy swaps).",
        "",
        "| groups | best heuristic | efficacy | ≥ 55%? | learned (noise) | ≥ 66%? | learned+warm | ≥ 66%? |",
        "| ---: | --- | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for t in meta["targets"]:
        lines.append(
            f"| {t['groups']} | {t['best_heuristic']} | {_pct(t['best_heuristic_efficacy'])} | {_yes(t['heuristic_met'])} "
            f"| {_pct(t['learned_efficacy'])} | {_yes(t['learned_met'])} "
            f"| {_pct(t['learned_warm_efficacy'])} | {_yes(t['learned_warm_met'])} |"
        )
    lines += ["", *meta.get("notes", []), "", "## Efficacy", ""]
    lines += [
        "| matrix | pattern | groups | method | efficacy | retained | ceiling | seconds |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in eff:
        lines.append(
            f"| {r['matrix']} | {r['pattern']} | {r['groups']} | {r['method']} | {_pct(r['efficacy'])} "
            f"| {100 * r['retained']:.2f}% | {100 * r['retained_ceiling']:.2f}% | {r['seconds']:.2f} |"
        )
    learned = [r for r in eff if "best_step" in r]
    if learned:
        lines += [
            "",
            "### `fit_to_score` runs: when the best hard permutation appeared",
            "",
            "`best step` is the step whose hard permutation retained the most during training; "
            "`returned` is the permutation `fit_to_score` returns (that one, or the warm start when it "
            "is better); `final step` is the last step's hard permutation.",
            "",
            "| matrix | pattern | groups | method | best step | steps | retained (best step) | retained (final step) | retained (returned) |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in learned:
            lines.append(
                f"| {r['matrix']} | {r['pattern']} | {r['groups']} | {r['method']} | {r['best_step']} | {r['steps']} "
                f"| {100 * r['best_step_retained']:.2f}% | {100 * r['final_step_retained']:.2f}% | {100 * r['retained']:.2f}% |"
            )
    lines += [
        "",
        "## Solver cost per group (G = 1)",
        "",
        "One Sinkhorn forward (20 log-domain iterations, float32, no autograd) and one hard assignment "
        "(`hard_assignment`: scipy `linear_sum_assignment`, float64) on a k x k Gaussian cost; median "
        "of `repeats` runs.",
        "",
        "| k | sinkhorn s | assignment s | repeats |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in tim:
        lines.append(f"| {r['k']} | {r['sinkhorn_seconds']:.4f} | {r['assignment_seconds']:.4f} | {r['repeats']} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--swap-budget", type=float, default=10.0, help="seconds per swap search")
    ap.add_argument("--learn-steps", type=int, default=800, help="fit_to_score steps (insertion surrogate)")
    ap.add_argument("--learn-lr", type=float, default=0.005)
    ap.add_argument("--linear-steps", type=int, default=200, help="steps of the linear-surrogate row")
    ap.add_argument("--linear-lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: these are small tensors, and on a shared machine extra "
        "threads stall each other)",
    )
    ap.add_argument("--timing-ks", type=int, nargs="*", default=list(TIMING_KS))
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.swap_budget, args.learn_steps, args.linear_steps, args.timing_ks = 0.2, 5, 5, [64, 128]
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_start": _load(),
        "size": args.size,
        "swap_budget": args.swap_budget,
        "learn_steps": args.learn_steps,
        "learn_lr": args.learn_lr,
        "linear_steps": args.linear_steps,
        "linear_lr": args.linear_lr,
        "seed": args.seed,
        "quick": args.quick,
    }
    t0 = time.perf_counter()
    rows = efficacy_rows(args, log) + timing_rows(args, log)
    meta["total_seconds"] = time.perf_counter() - t0
    meta["load_end"] = _load()
    meta["targets"] = targets(rows)
    meta["notes"] = _notes(rows, meta["targets"])
    _atomic_write(args.out / "core.json", json.dumps({"rows": rows, "meta": meta}, indent=1) + "\n")
    _atomic_write(args.out / "core.md", markdown(rows, meta))
    log(f"wrote {args.out / 'core.json'} and {args.out / 'core.md'} in {meta['total_seconds']:.0f}s")
    return 0


def _notes(rows: list[dict], tgt: list[dict]) -> list[str]:
    """Plain statements derived from the numbers (no hand-written claims)."""
    notes = []
    for t in tgt:
        g = t["groups"]
        h, le, lw = t["best_heuristic_efficacy"], t["learned_efficacy"], t["learned_warm_efficacy"]
        sel = {r["method"]: r for r in rows if r.get("matrix") == "lognormal_cols" and r["pattern"] == "2:4" and r["groups"] == g}
        warm = sel.get("zigzag+swap", {}).get("efficacy")
        parts = [f"- G={g}: best heuristic `{t['best_heuristic']}` {_pct(h)} (target {_pct(TARGET_HEURISTIC)}: {_yes(t['heuristic_met'])});"]
        parts.append(f"learned from noise {_pct(le)} (target {_pct(TARGET_LEARNED)}: {_yes(t['learned_met'])}),")
        if le is not None and h is not None:
            parts.append("below" if le < h else "at or above")
            parts.append("the best heuristic;")
        if lw is not None and warm is not None:
            gain = lw - warm
            parts.append(
                f"learned+warm {_pct(lw)} vs its zigzag+swap start {_pct(warm)} "
                f"({'+' if gain >= 0 else ''}{100 * gain:.1f} points; it returns the best permutation seen, "
                "the warm start included, so it never falls below it)."
            )
        notes.append(" ".join(parts))
    return notes


if __name__ == "__main__":
    raise SystemExit(main())

"""The hard assignments of a training run at LLaMA-2-7B width: the options, measured on its costs.

Records the costs of a real training run (a random LLaMA at LLaMA-2-7B width, 1 block, bf16,
learned 2:4, G = 4, synchronised sites, identity-biased start, Wanda, batches of 1 x 256
tokens, the default schedule over ``--steps`` steps), then solves the assignments of chosen
steps' costs every way (k = 1024: q/k/v and gate/up, 8 groups; k = 2752: down_proj, 4 groups):

* ``before``: the library at 29434d8: every cost moved to float64 on the host, the column
  minimum test, scipy on the raw costs of the groups that fail it;
* ``now``: :func:`permsparse.core.assignment.solve_assignments`: the row minimum test where the
  cost lives, scipy on the row- and column-reduced costs of the groups that fail it;
* ``free rows``: the share of channels whose cheapest position another channel also takes
  (how far the costs are from the test's certificate);
* ``auction`` (``--auction``): a batched Jacobi auction with ε-scaling (exact on integer-scaled
  costs, GPU-friendly): its iteration count on one group of each size, the number of batched rounds a GPU would run.

    python bench/assignment.py                          # record (~25 min on 2 cores) and measure
    python bench/assignment.py --costs /tmp/traj        # measure costs recorded before

Single-threaded timings (the library spreads the groups over host threads on top of this).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from settings import NO_BUDGET  # noqa: E402

from permsparse.core.assignment import lsa_rows, solve_assignments  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402


def record(out: Path, steps: int, window: int) -> None:
    """The costs after every step of a 7B-width, 1-block training run, one safetensors file each."""
    import transformers
    from safetensors.torch import save_file

    from permsparse.config import LearnConfig
    from permsparse.core.pattern import NMPattern
    from permsparse.models import apply, calibrate
    from permsparse.models.sites import find_sites
    from permsparse.train.loop import make_batches, train_end_to_end

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                   initializer_range=0.02)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    calib = torch.randint(3, 32000, (steps, window), generator=torch.Generator().manual_seed(0))
    sites = find_sites(model)
    stats = calibrate.collect_stats(model, make_batches(calib[:2], 1), [c for s in sites for c in s.consumers],
                                    progress=False)
    scores = {}
    for s in sites:
        scores.update(zip(s.consumers, apply.site_scores(model, s, "wanda", stats)))
    out.mkdir(parents=True, exist_ok=True)

    def on_step(rec, state):
        save_file({k: v.detach().contiguous() for k, v in state.bank.costs.items()}, str(out / f"step{rec.step:03d}.safetensors"))
        print(f"step {rec.step}: moved {rec.changed:.1%}, {rec.seconds:.0f} s", flush=True)

    learn = LearnConfig(**NO_BUDGET, batch_size=1, epochs=1.0, init="identity", snapshots=0, average=(), tail_average=None)
    train_end_to_end(model, sites, scores, NMPattern.parse("2:4"), 4, calib, learn, progress=False, on_step=on_step)


def before(cost: torch.Tensor) -> torch.Tensor:
    """The library's hard assignment at 29434d8 (one thread)."""
    c = cost.detach().to("cpu", torch.float64)
    best = c.argmin(dim=1)
    distinct = torch.sort(best, dim=1).values.diff(dim=1).ne(0).all(dim=1)
    out = best.numpy().copy()
    arr = c.numpy()
    for g in (~distinct).nonzero().flatten().tolist():
        rows, cols = linear_sum_assignment(arr[g])
        out[g, cols] = rows
    return torch.from_numpy(out)


def free_rows(cost: torch.Tensor) -> float:
    """Mean share of channels whose cheapest position is also another channel's."""
    best = cost.numpy().argmin(axis=2)
    return float(np.mean([1 - np.unique(b).size / b.size for b in best]))


def auction(cost: torch.Tensor, theta: float = 5.0, eps_final: float = 1e-9, max_iter: int = 200000) -> tuple:
    """Batched Jacobi forward auction with ε-scaling on ``-cost`` (float64): ``(row4col, iterations)``.
    Optimal to within ``k · eps_final`` (exact for costs on a grid coarser than that)."""
    g, k, _ = cost.shape
    a = -cost.double()
    eps = ((a.amax(dim=(1, 2)) - a.amin(dim=(1, 2))) / 4).clamp_min(eps_final)
    price = torch.zeros(g, k, dtype=torch.float64)
    iters = 0
    while True:
        owner = torch.full((g, k), -1, dtype=torch.long)  # position -> channel
        obj = torch.full((g, k), -1, dtype=torch.long)  # channel -> position
        while bool((obj < 0).any()):
            iters += 1
            if iters > max_iter:
                raise RuntimeError("the auction did not converge")
            gi, i = (obj < 0).nonzero(as_tuple=True)
            top = (a[gi, i] - price[gi]).topk(2, dim=1)
            j = top.indices[:, 0]
            bid = price[gi, j] + (top.values[:, 0] - top.values[:, 1]) + eps[gi]
            flat = gi * k + j
            best = torch.full((g * k,), -float("inf"), dtype=torch.float64).scatter_reduce(0, flat, bid, "amax")
            win = bid >= best[flat]
            who = torch.full((g * k,), -1, dtype=torch.long).scatter_reduce(0, flat[win], i[win], "amax")
            won = (who >= 0).nonzero().squeeze(1)
            wg, wj, wi = won // k, won % k, who[won]
            prev = owner[wg, wj]
            had = prev >= 0
            obj[wg[had], prev[had]] = -1
            owner[wg, wj] = wi
            obj[wg, wi] = wj
            price[wg, wj] = best[won]
        if bool((eps <= eps_final).all()):
            return owner, iters
        eps = (eps / theta).clamp_min(eps_final)


def _time(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def measure(costs_dir: Path, steps: list[int], auction_step: int | None) -> list[dict]:
    from safetensors.torch import load_file

    rows = []
    for st in steps:
        costs = load_file(str(costs_dir / f"step{st:03d}.safetensors"))
        for key in ("1024", "2752"):
            c = costs[key]
            t_before, ref = _time(before, c)
            stats: dict = {}
            t_now, got = _time(solve_assignments, c, None, stats)
            scipy_raw = [lsa_rows(c[g].double().numpy()) for g in range(c.shape[0])]
            same = bool(all((got[g].numpy() == scipy_raw[g]).all() for g in range(c.shape[0])))
            rows.append({"kind": "step", "step": st, "k": int(key), "groups": c.shape[0],
                         "free_rows": round(free_rows(c), 4), "certified_now": stats.get("direct", 0),
                         "before_s": round(t_before, 3), "now_s": round(t_now, 3),
                         "same_as_before": bool(torch.equal(ref, got)), "same_as_scipy": same})
            print(rows[-1], flush=True)
        if auction_step == st:
            for key in ("1024", "2752"):
                c = costs[key][:1]
                t, (own, iters) = _time(auction, c)
                ok = bool(all((own[g].numpy() == lsa_rows(c[g].double().numpy())).all() for g in range(1)))
                rows.append({"kind": "auction", "step": st, "k": int(key), "groups": 1, "iterations": iters,
                             "cpu_s": round(t, 1), "same_as_scipy": ok})
                print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Hard assignments at LLaMA-2-7B width: the options on a training run's costs",
        "",
        f"Generated by `python bench/assignment.py{meta.get('argv', '')}` ({meta['host']}, torch {meta['torch']}, "
        f"{meta['created']}).",
        "",
        f"Costs after the steps of a {meta['steps']}-step run (random LLaMA at 7B width, 1 block, bf16, 2:4, G = 4, "
        "synchronised sites, identity-biased start, Wanda, 1 x 256 tokens per step, default schedule). Seconds "
        "to solve one step's groups of that size on one thread; `free rows`: the share of channels whose cheapest "
        "position another channel also takes (0 = the row-minimum test certifies the group, no solver). "
        "`before`: the library at 29434d8 (all costs to float64 on the host, column-minimum test, scipy on the raw "
        "costs); `now`: the row-minimum test where the costs live and scipy on the row- and column-reduced costs. "
        "`same`: identical permutations (to `before` and to scipy on the raw costs).",
        "",
        "| step | k | groups | free rows | certified now | before s | now s | speed-up | same |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r["kind"] == "step":
            lines.append(f"| {r['step']} | {r['k']} | {r['groups']} | {r['free_rows']:.1%} | {r['certified_now']} | "
                         f"{r['before_s']:.2f} | {r['now_s']:.2f} | {r['before_s'] / max(r['now_s'], 1e-9):.2f}x | "
                         f"{'yes' if r['same_as_before'] and r['same_as_scipy'] else 'NO'} |")
    steps = [r for r in rows if r["kind"] == "step"]
    if steps:
        b = sum(r["before_s"] for r in steps)
        n = sum(r["now_s"] for r in steps)
        lines += ["", f"All measured steps: before {b:.1f} s, now {n:.1f} s ({b / n:.2f}x); median free rows "
                  f"{statistics.median(r['free_rows'] for r in steps):.1%}."]
    auc = [r for r in rows if r["kind"] == "auction"]
    if auc:
        lines += ["", "## Batched auction (GPU-friendly, exact on integer-scaled costs)", "",
                  "| step | k | groups | iterations | CPU s | same as scipy |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {r['step']} | {r['k']} | {r['groups']} | {r['iterations']} | {r['cpu_s']} | "
                  f"{'yes' if r['same_as_scipy'] else 'no'} |" for r in auc]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--costs", type=Path, default=None, help="recorded costs (default: record them into --record)")
    ap.add_argument("--record", type=Path, default=Path("/tmp/permsparse-assignment-costs"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--measure", default="0,6,12,18,23", help="steps whose costs are solved")
    ap.add_argument("--auction", type=int, default=12, help="step whose first group of each size the auction solves (-1: none)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from assignment.json")
    args = ap.parse_args(argv)
    if args.render:
        got = json.loads((args.out / "assignment.json").read_text())
        atomic_write_text(args.out / "assignment.md", markdown(got["rows"], got["meta"]))
        return 0
    torch.set_num_threads(1)
    costs = args.costs
    if costs is None:
        record(args.record, args.steps, args.window)
        costs = args.record
    rows = measure(costs, [int(s) for s in args.measure.split(",")], args.auction if args.auction >= 0 else None)
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "steps": args.steps,
            "argv": "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "assignment.json", {"rows": rows, "meta": meta})
    atomic_write_text(args.out / "assignment.md", markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

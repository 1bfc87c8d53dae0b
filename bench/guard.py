"""Does the guard pick the right plan? Candidate plans of one learned run, three ways.

    python bench/guard.py        # about 22 minutes on 2 CPU cores

SmolLM2-135M-Instruct, Wanda 2:4, G = 4, one permutation per layer, the default trainer
for ``--train-seconds`` (600) on 96 calibration windows of 512 tokens (as the quality
bench's learned row). During the second half of the run, every ``--every`` steps, it keeps
the hard plan of the costs and that of their running average (decay 0.8), and the plans
at the end. Each candidate is then measured by

* ``guard_train``: the guard's loss (CE + KL) on the first 2 training batches, what the
  pipeline's guard used to rank plans by;
* ``guard_heldout``: the same loss on 2 batches of calibration windows drawn beside the
  training ones but never trained on;
* ``ppl``: perplexity on the 32,768 held-out evaluation tokens (bfloat16 forward).

Writes ``bench/results/guard.json`` (``rows``, one per candidate, with the rank
correlation of each guard with ``ppl`` in ``meta``) and ``guard.md`` (``--name``: other names).

    python bench/guard.py --every 0 --decays 0.8,0.9,0.95 --tails 0.5,0.75 --name guard_averages

compares, at the end of one run, the plans of the costs averaged exponentially (decays per
step) and uniformly over the tail of the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from settings import BEFORE_0_2  # noqa: E402

from permsparse.core.pattern import parse_pattern  # noqa: E402
from permsparse.data.text import load_text_windows  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.config import LearnConfig  # noqa: E402
from permsparse.train.bank import hard_params, plan_with  # noqa: E402
from permsparse.train.guard import TeacherCache, evaluate_plan, teacher_logits  # noqa: E402
from permsparse.train.loop import make_batches, train_end_to_end  # noqa: E402
from permsparse.models.loading import load_model  # noqa: E402
from permsparse.api import score_sites  # noqa: E402
from permsparse.config import PruneConfig  # noqa: E402
from permsparse.report import markdown_table  # noqa: E402
from permsparse.models.sites import find_sites, get_module  # noqa: E402
from quality import params_ppl  # noqa: E402  (bench/, the script's own directory)

N_TRAIN, N_HELD = 96, 8


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seconds", type=float, default=600.0)
    ap.add_argument("--every", type=int, default=6, help="steps between candidates in the second half (0: none)")
    ap.add_argument("--decays", type=lambda v: [float(x) for x in v.split(",")], default=[0.8],
                    help="exponential averages of the costs whose plans at the end are candidates (0.8: the trainer's)")
    ap.add_argument("--tails", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                    help="uniform averages of the costs from these shares of the training time on")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="guard", help="results file name: <out>/<name>.json and .md")
    opts = ap.parse_args()
    opts.decays = sorted(set(opts.decays) | {0.8})  # 0.8: the trainer's own average, and the mid-run candidates'
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.requires_grad_(False)
    windows = load_text_windows("wikipedia", tok, 512, N_TRAIN + N_HELD, 0, eval_tokens=32768)
    train, held = windows.calib[:N_TRAIN], windows.calib[N_TRAIN:]
    # The trainer keeps the exponential averages itself (their plans at the end come back in
    # `averaged`); the bench adds the mid-run candidates and the tails of several shares.
    learn = LearnConfig(epochs=3.0, time_budget=opts.train_seconds, average=tuple(opts.decays))
    cfg = PruneConfig(pattern="2:4", score="wanda", permutation="learned", groups=4, learn=learn, progress=False,
                      heuristic_power=2.0, **{**BEFORE_0_2, "sync": False})
    pattern = parse_pattern("2:4")
    sites = find_sites(model, sync=False)
    batches = make_batches(train, 4)
    cache = TeacherCache(learn.teacher_cache_gb)
    stats, scores, heur = score_sites(model, sites, cfg, batches, heuristic=True, on_output=cache, bf16=True)
    weights = {c: get_module(model, c).weight.detach() for s in sites for c in s.consumers}

    plans: dict[str, dict] = {"heuristic": heur}
    # The 0.8 average for the mid-run candidates, and uniform averages over the tail of the run
    # (from a share of the training time on: Polyak-Ruppert averaging with a burn-in).
    ema: dict[str, torch.Tensor] = {}
    tails: dict[float, dict[str, torch.Tensor]] = {f: {} for f in opts.tails}
    tail_n = {f: 0 for f in opts.tails}
    seen = {"train": 0.0, "bank": None}

    def on_step(rec, state) -> None:
        params = {k: p.detach() for k, p in state.bank.named_parameters()}
        seen["train"] += rec.seconds
        seen["bank"] = state.bank
        with torch.no_grad():
            for k, p in params.items():
                ema[k] = p.clone() if k not in ema else ema[k].lerp_(p, 0.2)
            for f, acc in tails.items():
                if seen["train"] >= f * opts.train_seconds:
                    tail_n[f] += 1
                    for k, p in params.items():
                        acc[k] = p.clone() if k not in acc else acc[k].lerp_(p, 1.0 / tail_n[f])
        if opts.every and rec.step >= 24 and (rec.step - 24) % opts.every == 0:
            plans[f"raw@{rec.step}"] = state.bank.hard()
            plans[f"avg@{rec.step}"] = plan_with(state.bank, ema)

    averaged: dict = {}
    t0 = time.perf_counter()
    last, history = train_end_to_end(model, sites, scores, pattern, 4, train, learn, start=heur, progress=False,
                                     on_step=on_step, averaged=averaged, teachers=cache.logits)
    train_seconds = time.perf_counter() - t0
    end = len(history) - 1
    plans[f"raw@{end}(end)"] = last
    plans[f"avg@{end}(end)"] = averaged["avg0.8"]
    for d in opts.decays:
        if d != 0.8:
            plans[f"ema{d:g}@{end}(end)"] = averaged[f"avg{d:g}"]
    for f, acc in tails.items():
        plans[f"tail{f:g}@{end}(end) ({tail_n[f]} steps)"] = plan_with(seen["bank"], acc)
    print(f"[guard] {len(history)} steps, {len(plans)} candidates", flush=True)

    guard_train = batches[:2]
    held_batches = make_batches(held, 4)
    held_teachers = teacher_logits(model, held_batches, True)
    rows = []
    for name, plan in plans.items():
        row = {"plan": name,
               "guard_train": evaluate_plan(model, sites, plan, weights, scores, pattern, guard_train, 1.0, True,
                                            cache.logits[:2]),
               "guard_heldout": evaluate_plan(model, sites, plan, weights, scores, pattern, held_batches, 1.0, True,
                                              held_teachers),
               "ppl": params_ppl(model, hard_params(sites, plan, weights, scores, pattern), windows.eval, bf16=True)}
        print("[guard]", row, flush=True)
        rows.append(row)
    learned = [r for r in rows if r["plan"] != "heuristic"]
    ppl = [r["ppl"] for r in learned]
    meta = {"command": "python bench/guard.py " + " ".join(sys.argv[1:]), "steps": len(history),
            "train_seconds": round(train_seconds, 1),
            "spearman_guard_train_ppl": spearman([r["guard_train"] for r in learned], ppl),
            "spearman_guard_heldout_ppl": spearman([r["guard_heldout"] for r in learned], ppl),
            "pick_train": min(learned, key=lambda r: r["guard_train"])["plan"],
            "pick_heldout": min(learned, key=lambda r: r["guard_heldout"])["plan"],
            "best_ppl": min(learned, key=lambda r: r["ppl"])["plan"],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    out = Path(opts.out)
    atomic_write_json(out / f"{opts.name}.json", {"rows": rows, "meta": meta})
    atomic_write_text(out / f"{opts.name}.md", (
        "# Does the guard pick the right plan?\n\n"
        f"Command: `{meta['command']}`\n\n"
        f"SmolLM2-135M-Instruct, Wanda 2:4, G = 4, one permutation per layer, the default trainer for "
        f"{opts.train_seconds:.0f} s ({meta['steps']} steps) on {N_TRAIN} windows of 512 tokens. Candidates: "
        f"the hard plan of the costs (`raw`) and of their running average (decay 0.8, `avg`) every {opts.every} "
        f"steps from step 24 (when `--every` > 0), and at the end; `emaD`: the plan of the costs' exponential "
        f"average with decay D per step, `tailF`: of their uniform average from the share F of the training time "
        f"on. `guard_train`: CE + KL on the first 2 training batches; "
        f"`guard_heldout`: on 2 batches ({N_HELD} windows) of calibration text never trained on; `ppl`: the "
        f"32,768 evaluation tokens (bfloat16 forward). Machine: {meta['machine']}. {meta['date']}.\n\n"
        + markdown_table(rows, ["plan", "guard_train", "guard_heldout", "ppl"])
        + f"\nSpearman rank correlation with ppl over the learned candidates: guard_train "
          f"{meta['spearman_guard_train_ppl']:.2f}, guard_heldout {meta['spearman_guard_heldout_ppl']:.2f}. "
          f"Picked by guard_train: `{meta['pick_train']}`; by guard_heldout: `{meta['pick_heldout']}`; "
          f"lowest ppl: `{meta['best_ppl']}`.\n"))


if __name__ == "__main__":
    main()

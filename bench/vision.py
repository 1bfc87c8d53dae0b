"""Quality table of the vision row: the digits ViT pruned 2:4 and 4:8, over seeds.

    python bench/vision.py                  # the table (about 10 minutes on 2 CPU cores)
    python bench/vision.py --split val      # the same on the validation split (for tuning)

The model is the embedded default ``digits-vit`` (trained and cached on first use, see
``permsparse.data.digits_vit``); calibration images are drawn from the digits' train split with each
seed, which also seeds the trainer. Per pattern and seed: one calibration pass, one
heuristic search and one learned run (``permsparse.api.plan_candidates``, the search of
``permsparse prune --permutation learned``, here from float32 statistics), shared by the
three pruned variants: Wanda, Wanda + heuristic, Wanda + learned as the guard keeps it.
Top-1 and NLL on the held-out test
split (never used for any choice; ``--split val`` reports the validation split instead).

Writes ``bench/results/vision.json`` (``rows``: one flat record per pattern and method with
the mean, sample std, min and max over seeds; ``runs``: one per seed) and ``vision.md``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from settings import BEFORE_0_2, NO_BUDGET  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

METHODS = (("wanda", "none"), ("wanda+heuristic", "heuristic"), ("wanda+learned", None))  # None: the guard's plan

log = logging.getLogger("bench.vision")


def _nll(model, images) -> float:
    with torch.inference_mode():
        return float(F.cross_entropy(model(pixel_values=images.pixel_values).logits, images.labels))


def run_seed(model, processor, pattern: str, seed: int, split: str, progress: bool) -> list[dict]:
    """The three pruned variants of one pattern and seed (one calibration, one learned run)."""
    from permsparse.api import plan_candidates
    from permsparse.config import LearnConfig, PruneConfig
    from permsparse.data.digits_vit import DIGITS_PRUNE
    from permsparse.data.images import load_image_data
    from permsparse.evaluate import top1_accuracy

    tuned = dict(DIGITS_PRUNE)
    n_calib, batch_size, groups = (int(tuned.pop(k)) for k in ("n_calib", "batch_size", "groups"))
    data = load_image_data(f"digits:{split}", processor, model.config.image_size, n_calib, seed, progress=False)
    cfg = PruneConfig(pattern=pattern, score="wanda", permutation="learned", groups=groups, progress=progress,
                      learn=LearnConfig(batch_size=batch_size, seed=seed, **{**NO_BUDGET, **tuned}), **BEFORE_0_2)
    # float32 statistics: the wanda and heuristic rows are exactly what prune() gives without learning.
    run = plan_candidates(model, cfg, data.calib.batches(batch_size), bf16_calibration=False)

    def top1(plan: str) -> float:
        pruned, _ = run.pruned(model, plan)
        return top1_accuracy(pruned, data.eval.pixel_values, data.eval.labels, progress=False)

    rows = []
    for method, plan in METHODS:
        pruned, _ = run.pruned(model, plan or run.kept)
        row = {"pattern": pattern, "method": method, "seed": seed, "split": split,
               "top1": top1_accuracy(pruned, data.eval.pixel_values, data.eval.labels, progress=False),
               "nll": _nll(pruned, data.eval), "n_calib": len(data.calib),
               "prune_seconds": run.calibration.seconds + (run.learn_seconds if plan is None else 0.0)}
        if plan is None:  # also the learned permutations themselves, whatever the guard kept
            row.update(kept_plan=run.kept, train_steps=len(run.history), top1_learned_unguarded=top1("learned"),
                       **{f"guard_{k}": v for k, v in run.guard.items()})
        rows.append(row)
        log.info("%s %s seed %d: top-1 %.4f", pattern, method, seed, row["top1"])
    return rows


def summarise(runs: list[dict], dense: dict) -> list[dict]:
    """One flat record per pattern and method: mean, sample std, min, max over seeds."""
    rows = [dense]
    for pattern in dict.fromkeys(r["pattern"] for r in runs):
        for method, _ in METHODS:
            sel = [r for r in runs if r["pattern"] == pattern and r["method"] == method]
            top1 = [r["top1"] for r in sel]
            nll = [r["nll"] for r in sel]
            row = {"pattern": pattern, "method": method, "seeds": len(sel),
                   "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                   "top1_min": min(top1), "top1_max": max(top1),
                   "nll_mean": statistics.fmean(nll), "nll_std": statistics.stdev(nll) if len(nll) > 1 else 0.0,
                   "prune_seconds_mean": statistics.fmean(r["prune_seconds"] for r in sel)}
            if method == "wanda+learned":
                row["kept_plans"] = ",".join(r["kept_plan"] for r in sel)
            rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Per pattern: does learned beat Wanda and the heuristic by more than the seed spread?

    Margin = learned mean - baseline mean; spread = the larger sample std of the two."""
    out = []
    for pattern in dict.fromkeys(r["pattern"] for r in rows if r["method"] != "dense"):
        by = {r["method"]: r for r in rows if r.get("pattern") == pattern}
        learned = by["wanda+learned"]
        for base in ("wanda", "wanda+heuristic"):
            margin = learned["top1_mean"] - by[base]["top1_mean"]
            spread = max(learned["top1_std"], by[base]["top1_std"])
            out.append({"pattern": pattern, "vs": base, "margin": margin, "spread": spread, "met": margin > spread})
    return out


def render(result: dict) -> str:
    from permsparse.report import markdown_table

    cols = ["pattern", "method", "seeds", "top1_mean", "top1_std", "top1_min", "top1_max", "nll_mean", "kept_plans"]
    fmt = lambda r: {**r, **{k: f"{100 * r[k]:.2f}" for k in ("top1_mean", "top1_std", "top1_min", "top1_max")  # noqa: E731
                             if k in r}}
    m = result["meta"]
    lines = [
        "# Vision: the digits ViT pruned 2:4 and 4:8\n\n",
        f"`{m['command']}` on {m['machine']}, {m['seconds']:.0f} s. Model: `digits-vit` (ViT, hidden "
        f"{m['model']['hidden_size']}, {m['model']['num_hidden_layers']} layers, {m['model']['image_size']}x"
        f"{m['model']['image_size']} input, dense test top-1 {100 * m['model_top1']['test']:.2f} %). "
        f"Top-1 (%) and NLL on the held-out **{m['split']}** split ({m['n_eval']} images), over seeds "
        f"{m['seeds']} (calibration draw and trainer); std is the sample std. Learned settings: `{m['learn']}`.\n\n",
        markdown_table([fmt(r) for r in result["rows"]], cols, floatfmt=".4f"),
        "\nTarget: learned beats Wanda and the heuristic by more than the seed spread "
        "(margin = difference of means, spread = larger std of the two):\n\n",
        markdown_table([{**t, "margin": f"{100 * t['margin']:+.2f}", "spread": f"{100 * t['spread']:.2f}"}
                        for t in result["targets"]]),
        "\nPer seed (`top1_learned_unguarded`: the learned permutations whatever the guard kept):\n\n",
        markdown_table([{k: (f"{100 * v:.2f}" if k.startswith("top1") else v) for k, v in r.items()
                         if k in ("pattern", "method", "seed", "top1", "nll", "kept_plan", "top1_learned_unguarded")}
                        for r in result["runs"]], floatfmt=".4f"),
    ]
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--split", default="test", choices=["test", "val"], help="where top-1 is measured [test]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads [1: the machine is shared]")
    ap.add_argument("--out", default=str(RESULTS / "vision.json"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from permsparse.evaluate import top1_accuracy
    from permsparse.data.images import load_digits_set
    from permsparse.io.atomic import atomic_write_json, atomic_write_text
    from permsparse.models.loading import load_model
    from permsparse.data.digits_vit import DIGITS_PRUNE, digits_vit_path, train_record

    t0 = time.perf_counter()
    path = digits_vit_path(progress=args.progress)
    model, processor = load_model(path, task="image-classification")
    ev = load_digits_set(args.split, processor, model.config.image_size)
    dense = {"pattern": "-", "method": "dense", "seeds": len(args.seeds),
             "top1_mean": top1_accuracy(model, ev.pixel_values, ev.labels, progress=False), "top1_std": 0.0,
             "nll_mean": _nll(model, ev)}
    dense["top1_min"] = dense["top1_max"] = dense["top1_mean"]
    runs = [r for pattern in args.patterns for seed in args.seeds
            for r in run_seed(model, processor, pattern, seed, args.split, args.progress)]
    rows = summarise(runs, dense)
    record = train_record(path)
    result = {
        "meta": {"command": "python bench/vision.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
                 "seconds": time.perf_counter() - t0, "split": args.split, "n_eval": len(ev), "seeds": args.seeds,
                 "model": {k: record["config"][k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                            "image_size", "patch_size", "epochs")},
                 "model_top1": record["top1"], "learn": DIGITS_PRUNE, "score": "wanda"},
        "rows": rows,
        "targets": targets(rows),
        "runs": runs,
    }
    out = Path(args.out)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

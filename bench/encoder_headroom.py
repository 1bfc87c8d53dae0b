"""How much room the refit leaves a permutation on the embedded MiniLM (all-MiniLM-L6-v2) pruned 2:4.

    python bench/encoder_headroom.py                      # 3 seeds, 10 s of search a site (about 25 min, 1 thread)

With the library's defaults (reconstruction after the mask, one permutation per layer, Wanda, G = 4)
the learned run's guard keeps the heuristic's plan in every block (``encoder_defaults.md``). Is that
the trainer's fault, or is there no better plan to find? Per seed, on one calibration pass (the
sentences and batches of ``bench/encoder.py``), three plans are compared:

* ``identity``: the plain N:M mask, no permutation (then refitted, as every row here);
* ``heuristic``: the library's search (the learned trainer's warm start and the guard's rival);
* ``searched``: the heuristic's plan improved by a greedy local search **on the quantity the refit
  minimises**, each site's exact output error after the refit (``tr((W' − W) H (W' − W)ᵀ)`` summed
  over the site's consumers): random swaps of two channels of one group in different blocks, kept
  when they lower it, for ``--seconds`` a site. The search sees what no trainer sees (every
  candidate refitted exactly); it is too slow to ship and serves here as an upper reference for
  plans near the heuristic's.

Each plan is then applied with the refit and measured as in ``encoder.md`` (mean cosine of the
mean-pooled sentence embedding to the dense one and nearest-neighbour agreement, 300 held-out test
sentences). Writes ``bench/results/encoder_headroom.{json,md}``: ``rows`` per plan (mean, sample std
over seeds), ``runs`` per plan and seed, ``sites`` per site and seed (error ratios to the heuristic).
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from encoder import N_CALIB, calib_batches, embed, fidelity, load_sentences

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PLANS = ("identity", "heuristic", "searched")
log = logging.getLogger("bench.encoder_headroom")


def site_error(model, cal, site, perm) -> float:
    """The site's output error after the refit under ``perm`` (sum over its consumers)."""
    from permsparse.core.pattern import NMPattern
    from permsparse.core.permuter import unpermuted_mask
    from permsparse.core.reconstruct import masked_lstsq, refit_error

    pattern = NMPattern.parse(cal.cfg.pattern)
    total = 0.0
    for c in site.consumers:
        W, H = model.get_submodule(c).weight.detach(), cal.stats[c].xxt
        mask = unpermuted_mask(cal.scores[c], perm, pattern, validate=False)
        total += refit_error(masked_lstsq(W, H, mask), W, H)
    return total


def search_site(model, cal, site, start, seconds: float, rng: random.Random):
    """Greedy swaps from ``start`` on the exact refitted error; (plan, error, tries, kept swaps)."""
    from permsparse.core.pattern import NMPattern
    from permsparse.core.permutation import Permutation

    m = NMPattern.parse(cal.cfg.pattern).m
    idx, groups = start.indices.clone(), start.groups
    k = site.d_in // groups
    best = site_error(model, cal, site, start)
    tries = kept = 0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        g = rng.randrange(groups)
        a, b = rng.sample(range(g * k, (g + 1) * k), 2)
        if a // m == b // m:  # the same block: the same mask
            continue
        cand = idx.clone()
        cand[a], cand[b] = idx[b], idx[a]
        err = site_error(model, cal, site, Permutation(cand, groups))
        tries += 1
        if err < best:
            best, idx, kept = err, cand, kept + 1
    return Permutation(idx, groups), best, tries, kept


def run_seed(model, tokenizer, sents, seed: int, dense: torch.Tensor, seconds: float) -> tuple[list[dict], list[dict]]:
    from permsparse.api import plan_candidates
    from permsparse.config import PruneConfig
    from permsparse.core.permutation import Permutation

    batches = calib_batches(tokenizer, sents.calib, N_CALIB, 8, seed)
    cfg = PruneConfig(pattern="2:4", score="wanda", permutation="heuristic", groups=4, progress=False)
    cal = plan_candidates(model, cfg, batches, bf16_calibration=False).calibration
    rng = random.Random(seed)
    plans: dict[str, dict] = {"identity": {}, "heuristic": dict(cal.heuristic), "searched": {}}
    sites = []
    for site in cal.sites:
        heur = cal.heuristic[site.name]
        e_id = site_error(model, cal, site, Permutation.identity(site.d_in, heur.groups))
        e_h = site_error(model, cal, site, heur)
        if site.head_tied:  # a swap would break the head tie: the heuristic's plan stands
            plans["searched"][site.name], e_s, tries, kept = heur, e_h, 0, 0
        else:
            plans["searched"][site.name], e_s, tries, kept = search_site(model, cal, site, heur, seconds, rng)
        sites.append({"seed": seed, "site": site.name, "d_in": site.d_in, "identity_over_heuristic": e_id / e_h,
                      "searched_over_heuristic": e_s / e_h, "tries": tries, "swaps_kept": kept})
        log.info("seed %d %-32s identity/heur %.3f searched/heur %.4f (%d of %d swaps kept)", seed, site.name,
                 e_id / e_h, e_s / e_h, kept, tries)
    runs = []
    held = sents.test
    for name in PLANS:
        pruned = copy.deepcopy(model)
        cal.apply_(pruned, plans[name])
        runs.append({"plan": name, "seed": seed, **fidelity(embed(pruned, tokenizer, held), dense)})
        log.info("seed %d %-10s cosine %.4f nn-agree %.4f", seed, name, runs[-1]["cosine"], runs[-1]["nn_agree"])
    return runs, sites


def summarise(runs: list[dict], sites: list[dict]) -> list[dict]:
    rows = []
    for name in PLANS:
        sel = [r for r in runs if r["plan"] == name]
        row: dict = {"plan": name, "seeds": len(sel)}
        for key in ("cosine", "nn_agree"):
            vals = [r[key] for r in sel]
            row.update({f"{key}_mean": statistics.fmean(vals),
                        f"{key}_std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
        if name != "heuristic":
            ratios = [s[f"{name}_over_heuristic"] for s in sites]
            row.update({"site_error_over_heuristic_median": statistics.median(ratios),
                        "site_error_over_heuristic_min": min(ratios), "site_error_over_heuristic_max": max(ratios)})
        rows.append(row)
    return rows


def render(result: dict) -> str:
    from permsparse.report import markdown_table

    m = result["meta"]
    by = {r["plan"]: r for r in result["rows"]}
    h, s = by["heuristic"], by["searched"]
    margin = s["cosine_mean"] - h["cosine_mean"]
    spread = max(s["cosine_std"], h["cosine_std"])
    kinds = {}
    for row in result["sites"]:
        kinds.setdefault(row["site"].split(".")[-1], []).append(row)  # query, key, ..., mlp_out
    per_kind = [{"site": k, "d_in": v[0]["d_in"], "n": len(v),
                 "identity_over_heuristic_median": statistics.median(r["identity_over_heuristic"] for r in v),
                 "searched_over_heuristic_median": statistics.median(r["searched_over_heuristic"] for r in v),
                 "searched_over_heuristic_min": min(r["searched_over_heuristic"] for r in v),
                 "tries_median": statistics.median(r["tries"] for r in v),
                 "swaps_kept_median": statistics.median(r["swaps_kept"] for r in v)} for k, v in kinds.items()]
    paired = [rs["cosine"] - rh["cosine"] for rs in result["runs"] if rs["plan"] == "searched"
              for rh in result["runs"] if rh["plan"] == "heuristic" and rh["seed"] == rs["seed"]]
    return "".join([
        "# Encoder headroom: is there a better plan under the refit?\n\n",
        f"`{m['command']}` on {m['machine']}, {m['seconds']:.0f} s in all. The embedded MiniLM, 2:4, Wanda, G = 4, "
        f"the library's defaults (one permutation per layer, reconstruction after the mask); {m['n_calib']} "
        f"calibration sentences per seed (as `encoder.py`), fidelity on {m['n_held']} held-out test sentences. "
        f"`searched`: the heuristic's plan after {m['seconds_per_site']:g} s a site of greedy swaps on each site's "
        "exact refitted output error (see the script's docstring). Seeds "
        f"{m['seeds']}; std is the sample std.\n\n",
        markdown_table(result["rows"], floatfmt=".4f"),
        f"\nSearched − heuristic cosine: {margin:+.4f} (3-seed spread {spread:.4f}); per seed "
        + ", ".join(f"{d:+.4f}" for d in paired) + ".\n\n",
        "Per kind of site (error ratios to the heuristic's plan, all seeds and blocks):\n\n",
        markdown_table(per_kind, floatfmt=".4f"),
        "\nPer seed:\n\n",
        markdown_table(result["runs"], floatfmt=".4f"),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seconds", type=float, default=10.0, help="greedy search a site [10]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "encoder_headroom.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from permsparse.data.assets import embedded_bert_path
    from permsparse.io.atomic import atomic_write_json, atomic_write_text
    from permsparse.models.loading import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(str(embedded_bert_path()), task="encoder")
    sents = load_sentences()
    dense = embed(model, tokenizer, sents.test)
    meta = {"command": "python bench/encoder_headroom.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "seeds": args.seeds, "seconds_per_site": args.seconds, "n_calib": N_CALIB, "n_held": len(sents.test)}
    runs, sites = [], []
    out = Path(args.out)
    for seed in args.seeds:
        r, s = run_seed(model, tokenizer, sents, seed, dense, args.seconds)
        runs += r
        sites += s
        result = {"meta": {**meta, "seconds": time.perf_counter() - t0}, "rows": summarise(runs, sites),
                  "runs": runs, "sites": sites}
        atomic_write_json(out, result)  # what is done so far, after every seed
        text = render(result)
        atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fidelity of the embedded sentence embedder (all-MiniLM-L6-v2, a BERT) pruned 2:4.

    python bench/encoder.py                          # the table (about 10 minutes on 2 CPU cores)
    python bench/encoder.py --split val --seeds 0    # the same on the validation sentences (for tuning)
    python bench/encoder.py --defaults               # the same with the library's defaults (encoder_defaults.md)
    python bench/encoder.py --defaults --scores wanda,sparsegpt   # + SparseGPT's mask under the plans (7.5 min)
    python bench/encoder.py --defaults --split val --seeds 0 1 --learn objective=e2e --sweep refit_every=0,8 \
        --sweep refit_every=8+lr=0.01+margin=0.3+tau_start=0.1+tau_end=0.02 \
        --out bench/results/encoder_refit_val.json   # the trainer that sees the refit (29 min)

Sentences come from the embedded Wikipedia text: every article is split into sentences; those
of every tenth article (articles 9, 19, ...) are the **test** pool, of the articles before
them (8, 18, ...) the **validation** pool, the rest the calibration pool. 300 sentences are
drawn from the test (or validation) pool once (a fixed draw, the same for every seed); each
seed draws the calibration sentences and seeds the trainer. Calibration batches hold
sentences of similar length cut to the shortest of the batch, so no batch holds padding
(the statistics count every position).

Per seed: one calibration pass, heuristic search and learned run (``plan_candidates``, from
float32 statistics, as ``permsparse prune --permutation learned`` searches), shared by Wanda,
Wanda + heuristic and Wanda + learned (the guard's plan; also the learned plan whatever the
guard kept); SparseGPT 2:4 and Wanda unstructured 50 % are their own ``prune`` runs on the
same calibration sentences. Sentence embedding = mean of the last hidden states over the
attention mask. Measured on the held-out sentences: the mean cosine of each sentence's
embedding to the dense one, and nearest-neighbour agreement (the share of sentences whose
nearest other held-out sentence, by cosine, is the one the dense model picks).

Writes ``bench/results/encoder.json`` (``rows``: per method the mean, sample std, min and max
over seeds; ``runs``: one record per method and seed) and ``encoder.md``; ``--split val``
writes ``encoder_val.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from settings import BEFORE_0_2, NO_BUDGET  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: The trainer's settings, chosen on the validation sentences (``encoder_val.md``).
LEARN = {"epochs": 2.0, "batch_size": 8, "lr": 0.05, "bf16": True, "hidden_loss": "cosine"}
N_CALIB = 256  # calibration sentences per seed
N_HELD = 300  # held-out sentences
GROUPS = 4
MAX_TOKENS = 128

log = logging.getLogger("bench.encoder")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_INITIAL = re.compile(r"\b[A-Z]\.$")  # "... modeled on J." : a name's initial, not a sentence end


def _sentences_of(article: str) -> list[str]:
    """Plain prose sentences of one cleaned article: 6 to 40 words, starting with a capital
    letter and ending with a full stop, without markup left by the cleaner."""
    out = []
    for para in article.split("\n")[1:]:  # the first line is the title
        for s in _SENTENCE_END.split(para.strip()):
            s = s.strip()
            if (6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".") and not _INITIAL.search(s)
                    and not any(c in s for c in "|={}[]<>*#")):
                out.append(s)
    return out


@dataclass
class Sentences:
    calib: list[str]  # the calibration pool
    val: list[str]
    test: list[str]


def load_sentences(n_held: int = N_HELD) -> Sentences:
    """The three disjoint pools (by article); ``val`` and ``test`` hold ``n_held`` sentences each."""
    from permsparse.data.wikipedia import load_wikipedia_articles

    pools: dict[str, list[str]] = {"calib": [], "val": [], "test": []}
    for i, article in enumerate(load_wikipedia_articles()):
        pools["test" if i % 10 == 9 else "val" if i % 10 == 8 else "calib"] += _sentences_of(article)
    pools = {k: list(dict.fromkeys(v)) for k, v in pools.items()}  # no duplicates, order kept
    rng = random.Random(1234)  # one draw of held-out sentences for every seed
    return Sentences(pools["calib"], rng.sample(pools["val"], n_held), rng.sample(pools["test"], n_held))


def calib_batches(tokenizer, pool: list[str], n: int, batch_size: int, seed: int) -> list[dict]:
    """``n`` sentences of ``pool`` drawn with ``seed``, in batches of similar length, each cut
    to its shortest sentence (no padding)."""
    drawn = random.Random(seed).sample(pool, n)
    lengths = [len(tokenizer(s, truncation=True, max_length=MAX_TOKENS)["input_ids"]) for s in drawn]
    ordered = [s for _, s in sorted(zip(lengths, drawn))]
    batches = []
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        shortest = min(len(tokenizer(s, truncation=True, max_length=MAX_TOKENS)["input_ids"]) for s in chunk)
        enc = tokenizer(chunk, truncation=True, max_length=shortest, padding=True, return_tensors="pt")
        assert bool(enc["attention_mask"].all()), "a calibration batch holds padding"
        batches.append(dict(enc))
    random.Random(seed + 1).shuffle(batches)  # not shortest first: the guard reads the first batches
    return batches


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """``(n, H)`` sentence embeddings: the mean of the last hidden states over the attention mask."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], truncation=True, max_length=MAX_TOKENS, padding=True,
                        return_tensors="pt")
        h = model(**enc).last_hidden_state  # (B, T, H)
        w = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * w).sum(1) / w.sum(1))
    return torch.cat(out)


def fidelity(emb: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the dense embeddings, and nearest-neighbour agreement with the dense model."""
    def neighbours(e: torch.Tensor) -> torch.Tensor:
        z = F.normalize(e, dim=-1)
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)  # a sentence is not its own neighbour
        return sim.argmax(-1)

    return {"cosine": float(F.cosine_similarity(emb, dense, dim=-1).mean()),
            "nn_agree": float((neighbours(emb) == neighbours(dense)).float().mean())}


def run_seed(model, tokenizer, sents: Sentences, split: str, seed: int, dense: torch.Tensor, learn: dict,
             groups: int, progress: bool, methods: tuple[str, ...] = (), defaults: bool = False,
             scores: tuple[str, ...] = ("wanda",)) -> list[dict]:
    """The ``methods`` (default: all) of one seed; per score in ``scores``, one calibration and
    learned run serve its plain, heuristic and learned rows (``sparsegpt``: SparseGPT's mask in
    the permuted layout; its plain row is the ``sparsegpt`` reference; with
    ``objective=blockwise`` the learned row is ``prune``'s block-by-block walk).
    ``defaults``: those rows with the library's site, reconstruction and budget defaults instead
    of the settings this table was first measured with (the references stay as they are)."""
    from permsparse.api import plan_candidates
    from permsparse.config import LearnConfig, PruneConfig
    from permsparse.models.sites import find_sites
    from permsparse.pipeline.calibration import resolve_objective

    methods = methods or METHODS
    held = sents.test if split == "test" else sents.val
    batches = calib_batches(tokenizer, sents.calib, N_CALIB, int(learn["batch_size"]), seed)
    t0 = time.perf_counter()

    def measure(pruned) -> dict[str, float]:
        return fidelity(embed(pruned, tokenizer, held), dense)

    rows = []
    for score in scores:
        cfg = PruneConfig(pattern="2:4", score=score, permutation="learned", groups=groups, progress=progress,
                          # Not the defaults: the settings encoder.md was measured with (end to end, no budget).
                          learn=LearnConfig(seed=seed, **{**({} if defaults else {**NO_BUDGET, "objective": "e2e"}),
                                                          **learn}),
                          **({} if defaults else BEFORE_0_2))
        # The objective prune() takes (auto: block-wise for this headless BertModel since it was measured so).
        blockwise = resolve_objective(model, find_sites(model), cfg) == "blockwise"
        if blockwise:
            cfg = replace(cfg, permutation="heuristic")
        # float32 statistics: the plain and heuristic rows are what prune() without learning gives.
        run = plan_candidates(model, cfg, batches, bf16_calibration=False)
        calib_s = run.calibration.seconds
        for method, plan in (((score, "none"),) if score == "wanda" else ()) + ((f"{score}+heuristic", "heuristic"),):
            rows.append({"method": method, "seed": seed, **measure(run.pruned(model, plan)[0]),
                         "prune_seconds": calib_s})
        if blockwise:
            rows.append(_blockwise_row(model, replace(cfg, permutation="learned"), batches, seed, measure,
                                       f"{score}+learned"))
            rows.append(_prune_row(model, f"{score}+heuristic-sequential",  # the same walk, the heuristic's plan alone
                                   replace(cfg, permutation="heuristic", sequential=True), batches, seed, measure))
        else:
            unguarded = measure(run.pruned(model, "learned")[0])
            rows.append({"method": f"{score}+learned", "seed": seed, **measure(run.pruned(model, run.kept)[0]),
                         "prune_seconds": calib_s + run.learn_seconds, "kept_plan": run.kept,
                         "train_steps": len(run.history), "cosine_unguarded": unguarded["cosine"],
                         "nn_agree_unguarded": unguarded["nn_agree"], **_local_refit(model, run),
                         **{f"guard_{k}": v for k, v in run.guard.items()}})
    for method, pattern, score in (("sparsegpt", "2:4", "sparsegpt"),
                                   ("wanda-unstructured50", "unstructured50", "wanda")):
        if method in methods:
            rows.append(_prune_row(model, method, PruneConfig(pattern=pattern, score=score, permutation="none",
                                                              groups=groups, progress=progress, **BEFORE_0_2), batches, seed,
                                   measure))
    for r in rows:
        r.update(split=split, n_calib=N_CALIB)
        log.info("seed %d %-22s cosine %.4f  nn-agree %.4f", seed, r["method"], r["cosine"], r["nn_agree"])
    log.info("seed %d: %.0f s", seed, time.perf_counter() - t0)
    return rows


def _local_refit(model, run) -> dict:
    """Where the kept weights are refitted: per site, the learned plan's output error after the refit
    over the heuristic's (each layer on its own calibration inputs), as the number of sites where
    the learned plan is the better one and the median ratio."""
    from permsparse.core.reconstruct import refit_error

    cal = run.calibration
    if not cal.cfg.refits:
        return {}
    errors = {}
    for plan in ("heuristic", "learned"):
        weights, _ = cal.weights(model, run.plans[plan])
        errors[plan] = [sum(refit_error(weights[c], model.get_submodule(c).weight, cal.stats[c].xxt) for c in s.consumers)
                        for s in cal.sites]
    ratios = [lr / max(h, 1e-30) for lr, h in zip(errors["learned"], errors["heuristic"])]
    return {"sites_learned_refits_better": sum(r < 1 for r in ratios), "sites": len(ratios),
            "learned_refit_error_ratio_median": statistics.median(ratios)}


def _prune_row(model, method: str, cfg, batches: list[dict], seed: int, measure, result: list | None = None) -> dict:
    """``prune`` of a copy of ``model`` with ``cfg``, measured (the ``PruneResult`` appended to ``result``)."""
    from permsparse.api import prune

    pruned = _copy(model)
    t0 = time.perf_counter()
    res = prune(pruned, None, cfg, batches)
    if result is not None:
        result.append(res)
    return {"method": method, "seed": seed, **measure(pruned), "prune_seconds": time.perf_counter() - t0}


def _blockwise_row(model, cfg, batches: list[dict], seed: int, measure, method: str = "wanda+learned") -> dict:
    """The learned row of the block-wise objective (``prune``'s walk, each block's guard)."""
    out: list = []
    row = _prune_row(model, method, cfg, batches, seed, measure, out)
    res = out[0]
    row.update(kept_plan=res.kept_plan, train_steps=len(res.history), cosine_unguarded=float("nan"),
               nn_agree_unguarded=float("nan"))
    return row


def _copy(model):
    import copy

    return copy.deepcopy(model)


METHODS = ("wanda", "wanda+heuristic", "wanda+learned", "sparsegpt", "wanda-unstructured50")
#: the rows of ``--scores sparsegpt``: SparseGPT's mask (and update) in the permuted layout
SPARSEGPT_PLANS = ("sparsegpt+heuristic", "sparsegpt+learned")
#: with the block-wise objective: the heuristic's plan walked block by block the same way (``--sequential``)
SEQUENTIAL = ("wanda+heuristic-sequential", "sparsegpt+heuristic-sequential")


def summarise(runs: list[dict]) -> list[dict]:
    """One flat record per method: mean, sample std, min, max over seeds."""
    rows = []
    for method in METHODS + SPARSEGPT_PLANS + SEQUENTIAL:
        sel = [r for r in runs if r["method"] == method]
        if not sel:
            continue
        row: dict = {"method": method, "seeds": len(sel)}
        for key in ("cosine", "nn_agree"):
            vals = [r[key] for r in sel]
            row.update({f"{key}_mean": statistics.fmean(vals),
                        f"{key}_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        f"{key}_min": min(vals), f"{key}_max": max(vals)})
        row["prune_seconds_mean"] = statistics.fmean(r["prune_seconds"] for r in sel)
        if method.endswith("+learned"):
            row["kept_plans"] = ",".join(r["kept_plan"] for r in sel)
            row["cosine_unguarded_mean"] = statistics.fmean(r["cosine_unguarded"] for r in sel)
            if all("sites" in r for r in sel):  # refitted: sites where the learned plan refits better
                row["sites_learned_refits_better"] = ",".join(f"{r['sites_learned_refits_better']}/{r['sites']}"
                                                              for r in sel)
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Does learned beat the heuristic (and Wanda) by more than the seed spread? Margin =
    difference of means, spread = the larger sample std of the two."""
    by = {r["method"]: r for r in rows}
    out = []
    for score in ("wanda", "sparsegpt"):
        learned = by.get(f"{score}+learned")
        if learned is None:
            continue
        for key in ("cosine", "nn_agree"):
            for base in (f"{score}+heuristic", f"{score}+heuristic-sequential", score):
                if base not in by:
                    continue
                margin = learned[f"{key}_mean"] - by[base][f"{key}_mean"]
                spread = max(learned[f"{key}_std"], by[base][f"{key}_std"])
                out.append({"learned": learned["method"], "metric": key, "vs": base, "margin": margin,
                            "spread": spread, "met": margin > spread})
    return out


def render(result: dict) -> str:
    from permsparse.report import markdown_table

    m = result["meta"]
    cols = ["method", "seeds", "cosine_mean", "cosine_std", "cosine_min", "cosine_max", "nn_agree_mean",
            "nn_agree_std", "prune_seconds_mean", "kept_plans"]
    lines = [
        "# Encoder: the embedded MiniLM (all-MiniLM-L6-v2) pruned 2:4\n\n",
        f"`{m['command']}` on {m['machine']}, {m['seconds']:.0f} s in all. Score Wanda (`sparsegpt+*` rows: SparseGPT's mask chosen and the kept weights updated "
        f"in the permuted layout), G = {m['groups']}; "
        f"{m['n_calib']} calibration sentences per seed; fidelity on {m['n_held']} held-out **{m['split']}** "
        f"sentences of the embedded Wikipedia text (mean-pooled sentence embeddings): `cosine` = mean cosine "
        f"to the dense embedding, `nn_agree` = share of sentences whose nearest held-out neighbour is the "
        f"dense model's. Seeds {m['seeds']} (calibration draw and trainer); std is the sample std. Learned "
        f"settings (chosen on the validation sentences, `encoder_val.md`): `{m['learn']}`. Wanda, heuristic "
        f"and learned rows: {m.get('settings', 'shared sites, o_proj folded, the plain mask W * M')}.\n\n",
        markdown_table(result["rows"], cols, floatfmt=".4f"),
        "\nTarget: learned above the heuristic (and Wanda) by more than the seed spread (margin = difference "
        "of means, spread = the larger std of the two):\n\n",
        markdown_table([{**t, "margin": f"{t['margin']:+.4f}", "spread": f"{t['spread']:.4f}"}
                        for t in result["targets"]]),
        _validation_summary(),
        "\nPer seed (`*_unguarded`: the learned permutations whatever the guard kept):\n\n",
        markdown_table([{k: v for k, v in r.items() if k in ("method", "seed", "cosine", "nn_agree", "kept_plan",
                                                             "train_steps", "cosine_unguarded", "prune_seconds")}
                        for r in result["runs"]], floatfmt=".4f"),
    ]
    return "".join(lines)


def _validation_summary(path: Path = RESULTS / "encoder_val.json") -> str:
    """The choices made on the validation sentences (``encoder_val.json``), as a short table."""
    from permsparse.report import markdown_table

    if not path.is_file():
        return ""
    import json

    val = json.loads(path.read_text())
    rows = [{"setting": r.get("setting") if r["method"] == "wanda+learned" else "-", "method": r["method"], "cosine_mean": r["cosine_mean"],
             "cosine_std": r["cosine_std"], "nn_agree_mean": r["nn_agree_mean"], "kept_plans": r.get("kept_plans")}
            for r in val["rows"] if r["method"] == "wanda+learned" or r["setting"] == val["rows"][0]["setting"]]
    rows.sort(key=lambda r: r["method"] == "wanda+learned")
    return ("\nOn the validation sentences (`encoder_val.md`, seeds " + str(val["meta"]["seeds"]) + "; each "
            "setting changes one of the settings above; `objective=blockwise`: the block-wise objective, "
            "each block's guard choosing among none, heuristic and learned):\n\n"
            + markdown_table(rows, floatfmt=".4f"))


def render_sweep(result: dict) -> str:
    """The validation table of a ``--sweep``: per setting, Wanda, the heuristic and the learned run."""
    from permsparse.report import markdown_table

    m = result["meta"]
    cols = ["setting", "method", "seeds", "cosine_mean", "cosine_std", "nn_agree_mean", "nn_agree_std",
            "prune_seconds_mean", "kept_plans", "cosine_unguarded_mean", "sites_learned_refits_better"]
    rows = [r for r in result["rows"] if r["method"] == "wanda+learned"]
    first = result["rows"][0]["setting"]
    base = [r for r in result["rows"] if r["method"] != "wanda+learned" and r["setting"] == first]
    return "".join([
        "# Encoder: tuning the trainer on the validation sentences\n\n",
        f"`{m['command']}` on {m['machine']}, {m['seconds']:.0f} s in all. The embedded MiniLM, 2:4, Wanda, "
        f"G = {m['groups']}, {m['n_calib']} calibration sentences per seed; fidelity on {m['n_held']} "
        f"**{m['split']}** sentences (never the reported test sentences; see `encoder.md` for the protocol). "
        f"Seeds {m['seeds']}. Each setting changes one trainer setting of `{m['learn']}`.\n\n",
        "Baselines (the same for every setting):\n\n",
        markdown_table([{k: v for k, v in r.items() if k != "setting"} for r in base], cols[1:], floatfmt=".4f"),
        "\nThe learned run per setting:\n\n",
        markdown_table(rows, cols, floatfmt=".4f"),
    ])


def _alternatives(spec: str) -> list[str]:
    """``KEY=V1,V2`` -> ``["KEY=V1", "KEY=V2"]``; ``K1=V1+K2=V2`` (one setting of two keys) as it is."""
    if "+" in spec:
        return [spec]
    key, values = spec.split("=", 1)
    return [f"{key}={v}" for v in values.split(",")]


def _setting(item: str) -> tuple[str, object]:
    """``key=value`` with the value as a bool, number or string."""
    key, value = item.split("=", 1)
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--split", default="test", choices=["test", "val"], help="where fidelity is measured [test]")
    # Two threads on two cores that other work shares stall each other (a forward 20x slower).
    ap.add_argument("--threads", type=int, default=1, help="torch threads [1: the machine is shared]")
    ap.add_argument("--out", default=None, help="[bench/results/encoder.json; encoder_val.json with --split val]")
    ap.add_argument("--learn", default="", help="trainer settings over LEARN, e.g. 'epochs=2,hidden_loss=nmse'")
    ap.add_argument("--groups", type=int, default=GROUPS)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (tuning: the first "
                    "three come from one run anyway)")
    ap.add_argument("--sweep", action="append", default=[], help="KEY=V1,V2,...: one learned run per value of "
                    "this trainer setting (each over LEARN and --learn), the rest as they are; K1=V1+K2=V2: one "
                    "run with both; repeatable")
    ap.add_argument("--defaults", action="store_true", help="the library's defaults for the Wanda, heuristic and "
                    "learned rows (one permutation per layer, reconstruction, 600 s budget); writes "
                    "encoder_defaults.{json,md}")
    ap.add_argument("--scores", default="wanda", help="comma-separated scores of the plain, heuristic and learned "
                    "rows: wanda, sparsegpt (SparseGPT's mask in the permuted layout)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown of --out from its JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from permsparse.data.assets import embedded_bert_path
    from permsparse.models.loading import load_model

    name = "encoder_defaults.json" if args.defaults else "encoder.json" if args.split == "test" else "encoder_val.json"
    out = Path(args.out or RESULTS / name)
    if args.render:
        import json

        from permsparse.io.atomic import atomic_write_text

        result = json.loads(out.read_text())
        text = render(result) if not any(r.get("setting") for r in result["runs"]) else render_sweep(result)
        atomic_write_text(out.with_suffix(".md"), text)
        print(text)
        return 0
    learn = {**LEARN, **dict(_setting(item) for item in filter(None, args.learn.split(",")))}
    t0 = time.perf_counter()
    model, tokenizer = load_model(str(embedded_bert_path()), task="encoder")
    sents = load_sentences()
    held = sents.test if args.split == "test" else sents.val
    dense = embed(model, tokenizer, held)
    settings = [(name, {**learn, **dict(map(_setting, name.split("+")))}) for spec in args.sweep
                for name in _alternatives(spec)]
    methods = tuple(args.methods.split(","))
    meta = {"command": "python bench/encoder.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "split": args.split, "n_held": len(held), "n_calib": N_CALIB, "seeds": args.seeds, "learn": learn,
            "groups": args.groups, "score": args.scores, "pattern": "2:4", "pools": {"calib": len(sents.calib)},
            "settings": ("the library's defaults (reconstruction after the mask, one permutation per layer)"
                         if args.defaults else "shared sites, o_proj folded, the plain mask W * M")}
    runs: list[dict] = []
    for name, learn_s in settings or [("", learn)]:
        for seed in args.seeds:
            for r in run_seed(model, tokenizer, sents, args.split, seed, dense, learn_s, args.groups, args.progress,
                              methods if not settings else METHODS[:3], args.defaults,
                              tuple(args.scores.split(","))):
                runs.append({**r, "setting": name} if settings else r)
            # What is done so far, after every seed (a long sweep that is stopped keeps its runs).
            text = _write(out, {**meta, "seconds": time.perf_counter() - t0}, runs, settings)
    print(text)
    return 0


def _write(out: Path, meta: dict, runs: list[dict], settings: list) -> str:
    """``out`` (JSON) and its Markdown twin from the runs so far; the Markdown."""
    from permsparse.io.atomic import atomic_write_json, atomic_write_text

    names = [n for n, _ in settings if any(r["setting"] == n for r in runs)]
    rows = (summarise(runs) if not settings else
            [{"setting": n, **row} for n in names for row in summarise([r for r in runs if r["setting"] == n])])
    result = {"meta": meta, "rows": rows, "targets": targets(rows) if not settings else [], "runs": runs}
    text = render(result) if not settings else render_sweep(result)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), text)
    return text


if __name__ == "__main__":
    sys.exit(main())

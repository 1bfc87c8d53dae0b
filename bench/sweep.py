"""The paper's ablations and open questions as one sweep on the embedded default.

    python bench/sweep.py                     # the full grid on SmolLM2-135M + Wikipedia (~3 h on 2 CPU cores)
    python bench/sweep.py --preset tiny       # two points per axis on a tiny random LLaMA (CI, < 1 min)
    python bench/sweep.py --axes groups,init  # only some axes
    python bench/sweep.py --render            # re-render sweep.md and sweep.png from sweep.json
    python bench/sweep.py --axes score --only "ria 2:4,wanda 4:8" --out A   # some points, in their own process
    python bench/sweep.py --merge A B         # join the sweep.json of runs split over processes

Axes (each varies one setting of the base configuration, everything else fixed):

1. ``groups``    G in {1, 2, 4, 8, 16} (G = 1: one global permutation per site)
2. ``tau``       temperature start/end, annealing schedule, Sinkhorn iterations
3. ``init``      heuristic warm start, identity-biased, zero + noise, a random permutation
4. ``sync``      one permutation per site (Q/K/V and gate/up share it, paid by one gather
                 after the norm) vs one per layer (a gather in front of every layer); with
                 the profiled time of the gathers in the deployed model
5. ``epochs``    1 vs 5 epochs, with the held-out perplexity after every epoch
6. ``score``     magnitude, Wanda, RIA, SparseGPT under learned permutations, 2:4 and 4:8
7. ``defaults``  the winners of the axes above together, against the base

Every point reports the held-out perplexity of the *learned* permutations (not of whatever
the final guard would keep; the kept plan is recorded too) beside the same score's
heuristic and unpermuted perplexity, the cost parameters, the steps and training seconds.
Calibration statistics, scores and the heuristic are computed once per (score, pattern,
groups, sync) and shared; the dense weights are restored between points. Writes
``bench/results/sweep.json`` (``rows`` of flat records), ``sweep.md`` and ``sweep.png``
(``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))  # bench/settings.py, also when a test loads this file by path
from settings import BEFORE_0_2, NO_BUDGET  # noqa: E402

from permsparse.api import CandidatePlans, Calibration, calibrate, plan_candidates  # noqa: E402
from permsparse.config import LearnConfig, PruneConfig  # noqa: E402
from permsparse.evaluate import perplexity  # noqa: E402
from permsparse.models.sites import find_sites, get_module  # noqa: E402
from permsparse.train.loop import make_batches  # noqa: E402
from permsparse.train.bank import moved_share  # noqa: E402

AXES = ("groups", "tau", "init", "sync", "epochs", "score", "defaults")

#: Per preset: the values tried on each axis. Each entry is (label, overrides of the base
#: PruneConfig; "learn" overrides go to its LearnConfig).
GRIDS: dict[str, dict[str, list[tuple[str, dict]]]] = {
    "full": {
        "groups": [(f"G={g}", {"groups": g}) for g in (1, 2, 4, 8, 16)],
        "tau": [
            ("tau 1->0.05 exp, 10 it", {}),
            ("tau 1->0.3 exp", {"learn": {"tau_end": 0.3}}),
            ("tau 3->0.05 exp", {"learn": {"tau_start": 3.0}}),
            ("tau 1->0.05 linear", {"learn": {"tau_schedule": "linear"}}),
            ("5 Sinkhorn it", {"learn": {"sinkhorn_iters": 5}}),
        ],
        "init": [(i, {"learn": {"init": i}}) for i in ("heuristic", "identity", "noise", "random")],
        "sync": [("synchronised", {"sync": True}), ("independent", {"sync": False})],
        "epochs": [("1 epoch", {}), ("5 epochs", {"learn": {"epochs": 5.0}})],
        "score": [(f"{s} {p}", {"score": s, "pattern": p})
                  for p in ("2:4", "4:8") for s in ("magnitude", "wanda", "ria", "sparsegpt")],
        # The winners of the axes above, together (what the CLI's defaults became).
        "defaults": [("base", {}), ("G=2 + 5 Sinkhorn it", {"groups": 2, "learn": {"sinkhorn_iters": 5}})],
    },
    "tiny": {
        "groups": [(f"G={g}", {"groups": g}) for g in (1, 2)],
        "tau": [("tau 1->0.05 exp, 10 it", {}), ("5 Sinkhorn it", {"learn": {"sinkhorn_iters": 5}})],
        "init": [(i, {"learn": {"init": i}}) for i in ("heuristic", "random")],
        "sync": [("synchronised", {"sync": True}), ("independent", {"sync": False})],
        "epochs": [("1 epoch", {}), ("3 epochs", {"learn": {"epochs": 3.0}})],
        "score": [(f"{s} 2:4", {"score": s, "pattern": "2:4"}) for s in ("magnitude", "sparsegpt")],
        "defaults": [("base", {}), ("G=1 + 5 Sinkhorn it", {"groups": 1, "learn": {"sinkhorn_iters": 5}})],
    },
}


# -- setup -------------------------------------------------------------------------------------

#: The trainer settings of the base configuration, pinned: the library's defaults moved
#: after this sweep (groups auto, 5 Sinkhorn iterations), the base it was run with did not.
_BASE_LEARN = dict(**NO_BUDGET, objective="e2e", epochs=1.0, init="heuristic", lr=0.02, tau_start=1.0, tau_end=0.05,
                   tau_schedule="exponential", sinkhorn_iters=10, alpha=1.0)
#: Per preset: the base configuration every axis varies (argument: windows per step).
BASES: dict[str, Callable[[int], PruneConfig]] = {
    "full": lambda batch_size: PruneConfig(pattern="2:4", score="wanda", permutation="learned", groups=4,
                                           progress=False, **BEFORE_0_2, learn=LearnConfig(batch_size=batch_size, **_BASE_LEARN)),
    "tiny": lambda batch_size: PruneConfig(pattern="2:4", score="wanda", permutation="learned", groups=2,
                                           progress=False, **BEFORE_0_2,
                                           learn=LearnConfig(batch_size=batch_size, **{**_BASE_LEARN, "lr": 0.05})),
}
#: Row fields that identify a point's configuration.
_CONFIG_FIELDS = ("pattern", "score", "groups", "sync", "init", "tau_start", "tau_end", "tau_schedule",
                  "sinkhorn_iters", "epochs")


def _config_fields(cfg: PruneConfig) -> dict:
    lc = cfg.learn
    return {"pattern": cfg.pattern, "score": cfg.score, "groups": cfg.groups, "sync": cfg.sync, "init": lc.init,
            "tau_start": lc.tau_start, "tau_end": lc.tau_end,
            "tau_schedule": lc.tau_schedule, "sinkhorn_iters": lc.sinkhorn_iters, "epochs": lc.epochs}


@dataclasses.dataclass
class Setup:
    """The model and data every point shares."""

    name: str
    model: torch.nn.Module
    calib: torch.Tensor
    eval: torch.Tensor
    base: PruneConfig
    describe: str


def embedded_setup(n_calib: int, window: int, eval_tokens: int, batch_size: int) -> Setup:
    from permsparse.data.text import load_text_windows
    from permsparse.models.loading import load_model

    model, tok = load_model("smollm2-135m")
    # Calibration windows of `window` tokens; evaluation always in 512-token windows (as quality.md).
    calib = load_text_windows("wikipedia", tok, window, n_calib, 0, eval_tokens=eval_tokens).calib
    ev = load_text_windows("wikipedia", tok, 512, 1, 0, eval_tokens=eval_tokens).eval
    base = BASES["full"](batch_size)
    desc = (f"SmolLM2-135M-Instruct (GGUF, float32), embedded Wikipedia: calibration {n_calib} windows of {window} "
            f"tokens (batch {batch_size}: {math.ceil(n_calib / batch_size)} steps per epoch); held-out perplexity on "
            f"the last {ev.numel()} tokens in 512-token windows")
    return Setup("smollm2-135m", model, calib, ev, base, desc)


def tiny_setup() -> Setup:
    """A tiny random LLaMA (vocabulary 256) on the embedded Wikipedia text read as bytes:
    real data, no tokenizer, seconds per point."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from permsparse.data.text import split_token_stream
    from permsparse.data.wikipedia import load_wikipedia_articles

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    text = "\n\n".join(load_wikipedia_articles()[:3]).encode("utf-8")
    ids = torch.tensor(list(text[:40_000]), dtype=torch.long)
    w = split_token_stream(ids, window=32, eval_tokens=256, n_calib=8, seed=0, source="wikipedia bytes")
    base = BASES["tiny"](2)
    return Setup("tiny-llama", model, w.calib, w.eval, base,
                 "tiny random LLaMA (2 blocks, hidden 64), embedded Wikipedia as bytes: 8 calibration windows of 32")


# -- one point -----------------------------------------------------------------------------------


def configure(base: PruneConfig, overrides: dict) -> PruneConfig:
    over = dict(overrides)
    learn = dataclasses.replace(base.learn, **over.pop("learn", {}))
    return dataclasses.replace(base, learn=learn, **over)


@dataclasses.dataclass
class Prepared:
    """One calibration of the sweep's model, and the perplexities of its plain and heuristic plans."""

    calibration: Calibration
    ppl_none: float = math.nan
    ppl_heuristic: float = math.nan


class Sweep:
    """Runs points against one :class:`Setup`, sharing calibrations (statistics, scores, heuristic)."""

    def __init__(self, setup: Setup, eval_batch: int = 4) -> None:
        self.s = setup
        self.eval_batch = eval_batch
        self.model = setup.model
        self.model.requires_grad_(False)
        self._prep: dict[tuple, Prepared] = {}
        self.learned: dict[tuple[str, str], dict] = {}  # (axis, setting) -> learned permutations
        self.dense_ppl = self._ppl()
        # Every linear layer's dense weight, restored after each pruned evaluation.
        self._dense = {n: m.weight.detach().clone() for n, m in self.model.named_modules()
                       if isinstance(m, torch.nn.Linear)}

    def _ppl(self) -> float:
        return perplexity(self.model, self.s.eval, batch_size=self.eval_batch, progress=False)

    def _restore(self) -> None:
        with torch.no_grad():
            for n, w in self._dense.items():
                get_module(self.model, n).weight.copy_(w)

    @contextlib.contextmanager
    def pruned(self, prep: Prepared, perms: dict | None):
        """The model pruned in place with ``perms`` (none: plain N:M) inside the block; the
        dense weights are restored on the way out (cheaper than a copy per evaluation)."""
        try:
            prep.calibration.apply_(self.model, perms)
            yield self.model
        finally:
            self._restore()

    def ppl_of(self, prep: Prepared, perms: dict | None) -> float:
        """Held-out perplexity of the model pruned with ``perms``."""
        with self.pruned(prep, perms):
            return self._ppl()

    def prepare(self, cfg: PruneConfig) -> Prepared:
        key = (cfg.score, cfg.pattern, cfg.groups, cfg.sync, cfg.learn.batch_size)
        if key not in self._prep:
            # Scores and statistics are the size of the model: keep only the base setup's and this one.
            base = self.s.base
            base_key = (base.score, base.pattern, base.groups, base.sync, base.learn.batch_size)
            for old in [k for k in self._prep if k != base_key]:
                del self._prep[old]
            sites = find_sites(self.model, sync=cfg.sync, attn_out=cfg.attn_out)
            prep = Prepared(calibrate(self.model, cfg, make_batches(self.s.calib, cfg.learn.batch_size), sites=sites))
            prep.ppl_none = self.ppl_of(prep, None)
            prep.ppl_heuristic = self.ppl_of(prep, prep.calibration.heuristic)
            self._prep[key] = prep
        return self._prep[key]

    def point(self, axis: str, label: str, cfg: PruneConfig, epoch_eval: bool = False) -> list[dict]:
        prep = self.prepare(cfg)
        info: dict = {}
        epochs: list[dict] = []
        steps_per_epoch = len(prep.calibration.batches)

        def on_step(rec, state) -> None:
            if "cost_params" not in info:
                info["cost_params"] = sum(p.numel() for p in state.bank.parameters())
            if epoch_eval and (rec.step + 1) % steps_per_epoch == 0:
                epochs.append({"epoch": (rec.step + 1) // steps_per_epoch, "step": rec.step,
                               "ppl_learned": self.ppl_of(prep, state.bank.hard())})

        plans = plan_candidates(self.model, cfg, calibration=prep.calibration, on_step=on_step)
        rows = [self._row(axis, label, cfg, prep, plans, info)]
        if epoch_eval:
            rows += self._epoch_rows(rows[0], plans.history, epochs, steps_per_epoch)
        if axis == "sync":
            rows[0].update(self.gather_cost(prep, plans.plans["learned"]))
        self.learned[(axis, label)] = plans.plans["learned"]
        return rows

    def _row(self, axis: str, label: str, cfg: PruneConfig, prep: Prepared, plans: CandidatePlans,
             info: dict) -> dict:
        hist = plans.history
        train_s = sum(h.seconds for h in hist)
        learned = plans.plans["learned"]
        row = {
            "axis": axis, "setting": label, "model": self.s.name, "pattern": cfg.pattern, "score": cfg.score,
            "groups": cfg.groups, "sync": cfg.sync, "init": cfg.learn.init,
            "tau_start": cfg.learn.tau_start, "tau_end": cfg.learn.tau_end, "tau_schedule": cfg.learn.tau_schedule,
            "sinkhorn_iters": cfg.learn.sinkhorn_iters, "epochs": cfg.learn.epochs, "steps": len(hist),
            "ppl_dense": self.dense_ppl, "ppl_none": prep.ppl_none, "ppl_heuristic": prep.ppl_heuristic,
            "ppl_learned": self.ppl_of(prep, learned),
            "kept_plan": plans.kept, "cost_params": info.get("cost_params", 0),
            "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(len(hist), 1), 2),
            "guard_seconds": round(plans.learn_seconds - train_s, 1),
            "prepare_seconds": round(prep.calibration.seconds, 1),
            "moved_last_step": hist[-1].changed if hist else 0.0,
            "moved_vs_heuristic": round(moved_share(prep.calibration.heuristic, learned), 4),
        }
        row["gain_vs_heuristic_pct"] = round(100.0 * (1 - row["ppl_learned"] / row["ppl_heuristic"]), 2)
        return row

    @staticmethod
    def _epoch_rows(row: dict, hist: list, epochs: list[dict], steps_per_epoch: int) -> list[dict]:
        """The long run's held-out perplexity and mean calibration loss after every epoch."""
        n_steps = max(len(hist), 1)
        rows = []
        for e in epochs:
            part = hist[(e["epoch"] - 1) * steps_per_epoch: e["epoch"] * steps_per_epoch]
            rows.append({**{k: row[k] for k in ("model", "pattern", "score", "groups", "epochs")},
                         "axis": "epochs-curve", "setting": f"after epoch {e['epoch']}", "epoch": e["epoch"],
                         "ppl_learned": e["ppl_learned"], "train_loss": sum(h.loss for h in part) / len(part),
                         "tau": hist[min(e["step"], n_steps - 1)].tau})
        return rows

    def gather_cost(self, prep: Prepared, perms: dict) -> dict:
        """Deploy the pruned model with ``perms`` and profile the time of its gathers."""
        from permsparse.models.deploy import count_gathers, deploy

        sys.path.insert(0, str(HERE))
        from deploy import _gather_time  # the profiler attribution of bench/deploy.py

        with self.pruned(prep, perms) as model:
            masked = copy.deepcopy(model).eval()
        deployed = deploy(copy.deepcopy(masked), prep.calibration.sites, perms).eval()
        gathers = count_gathers(deployed)
        ids = self.s.eval[:1]
        gather_ms, total_ms = _gather_time(deployed, masked, ids, rounds=3)
        return {"deployed_gathers": gathers, "gather_ms": round(gather_ms, 2), "forward_ms": round(total_ms, 2),
                "gather_pct": round(100.0 * gather_ms / total_ms, 2)}


def solver_rows(model: torch.nn.Module, groups: tuple[int, ...], repeats: int = 3) -> list[dict]:
    """Per training step, the time of the permutation machinery alone (Sinkhorn forward and
    backward, and the batched hard assignment, for every site) at each G: what the groups
    axis costs apart from the model's forward and backward, measured on an idle machine."""
    import statistics

    from permsparse.train.bank import PermutationBank
    from permsparse.core.pattern import NMPattern

    pattern = NMPattern.parse("2:4")
    sites = find_sites(model)
    rows = []
    for g in groups:
        bank = PermutationBank(sites, g, pattern, init="noise")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out, _ = bank(0.5, 10)
            sum(p.sum() for p, _ in out.values()).backward()
            times.append(time.perf_counter() - t0)
        rows.append({"axis": "groups-solver", "setting": f"G={g}", "groups": g,
                     "cost_params": sum(p.numel() for p in bank.parameters()),
                     "solver_seconds_per_step": round(statistics.median(times), 3), "threads": torch.get_num_threads()})
    return rows


def run(setup: Setup, grid: dict, axes: list[str], log: Callable[[str], None] = print,
        on_rows: Callable[[list[dict]], None] | None = None, only: set[str] | None = None) -> list[dict]:
    """Every point of ``grid`` on ``axes`` (only the settings named in ``only``, if given);
    ``on_rows(rows so far)`` after each point."""
    sweep = Sweep(setup)
    log(f"[sweep] dense ppl {sweep.dense_ppl:.2f}")
    rows: list[dict] = []
    baseline: dict | None = None  # the base configuration's row, shared by the axes that contain it
    base_key: tuple[str, str] | None = None
    for axis in axes:
        for label, over in grid[axis]:
            if only is not None and label not in only:
                continue
            cfg = configure(setup.base, over)
            if baseline is not None and cfg == setup.base:
                got = [{**baseline, "axis": axis, "setting": label}]
                if axis == "sync":  # the same learned run, deployed and profiled
                    got[0].update(sweep.gather_cost(sweep.prepare(cfg), sweep.learned[base_key]))
            else:
                t0 = time.perf_counter()
                got = sweep.point(axis, label, cfg, epoch_eval=axis == "epochs" and cfg.learn.epochs > 1)
                got[0]["wall_seconds"] = round(time.perf_counter() - t0, 1)
                if cfg == setup.base and baseline is None:
                    baseline, base_key = dict(got[0]), (axis, label)
            rows.extend(got)
            if on_rows:
                on_rows(rows)
            r = got[0]
            log(f"[sweep] {axis:9s} {label:24s} learned {r['ppl_learned']:8.2f}  heuristic {r['ppl_heuristic']:8.2f}"
                f"  none {r['ppl_none']:8.2f}  ({r.get('wall_seconds', 0):.0f}s)")
    return rows


# -- outputs ------------------------------------------------------------------------------------------


def merge(runs: list[dict]) -> tuple[list[dict], dict]:
    """Rows of several runs of the same setup (axes or settings split over processes), in the
    grid's order; a point present in several runs is taken from the first."""
    if not runs:
        raise ValueError("nothing to merge")
    setups = {r["meta"]["setup"] for r in runs} - {"solver only"}  # solver timings fit any setup
    if len(setups) > 1:
        raise ValueError(f"cannot merge sweeps of different setups: {sorted(setups)}")
    grid = GRIDS.get(runs[0]["meta"].get("preset", "full"), {})
    rows: list[dict] = []
    for axis in (*AXES, "epochs-curve", "groups-solver"):
        seen: dict[str, dict] = {}
        for r in runs:
            for row in r["rows"]:
                if row["axis"] == axis:
                    seen.setdefault(row["setting"], row)
        order = [label for label, _ in grid.get("groups" if axis == "groups-solver" else axis, [])]
        # The base configuration's point of an axis may have run under another axis's name
        # (it is the same run): take it from there.
        base = BASES[runs[0]["meta"].get("preset", "full")](2)
        want = _config_fields(base)
        base_rows = [row for r in runs for row in r["rows"]
                     if row["axis"] in AXES and all(row.get(k) == v for k, v in want.items())]
        for label, over in grid.get(axis, []):
            if label not in seen and base_rows and _config_fields(configure(base, over)) == want:
                seen[label] = {**base_rows[0], "axis": axis, "setting": label}
        rows.extend(sorted(seen.values(), key=lambda row: (order.index(row["setting"]) if row["setting"] in order
                                                            else len(order), row["setting"])))
    meta = dict(next(r["meta"] for r in runs if r["meta"]["setup"] != "solver only"))
    meta["command"] = " + ".join(r["meta"]["command"] for r in runs)
    # Complete when every point of the grid is there (the runs themselves may each be partial).
    have = {(row["axis"], row["setting"]) for row in rows}
    meta["complete"] = all((axis, label) in have for axis in AXES for label, _ in grid.get(axis, []))
    meta["total_minutes"] = max(r["meta"].get("total_minutes", 0) for r in runs)
    n_proc = len(meta["command"].split(" + "))
    meta["note"] = re.sub(r"; \d+ processes ran axes side by side", "", meta["note"]) + \
        f"; {n_proc} processes ran axes side by side"
    return rows, meta


def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    from permsparse.io.atomic import atomic_write_json, atomic_write_text
    from permsparse.report import markdown_table

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {"rows": rows, "meta": meta})
    cols = ["setting", "ppl_learned", "ppl_heuristic", "ppl_none", "gain_vs_heuristic_pct", "kept_plan",
            "cost_params", "steps", "train_seconds", "seconds_per_step", "moved_vs_heuristic"]
    md = [f"# Sweep: the paper's ablations and open questions\n\nCommand: `{meta['command']}`\n\n{meta['setup']}. "
          f"Base configuration: {meta['base']}. Dense perplexity {meta['ppl_dense']:.2f}. Each axis changes one "
          f"setting; `ppl_learned` is the learned permutations' held-out perplexity, `ppl_heuristic` / `ppl_none` "
          f"the same score with the zig-zag heuristic / without permutation, `kept_plan` what the final guard "
          f"would keep. Times on {meta['machine']} ({meta['note']}). {meta['date']}.\n"]
    for axis in AXES:
        sub = [r for r in rows if r["axis"] == axis]
        if not sub:
            continue
        extra = ["deployed_gathers", "gather_ms", "gather_pct"] if axis == "sync" else []
        if axis == "score":
            extra = ["pattern", "score"]
        md.append(f"\n## {axis}\n\n")
        md.append(markdown_table(sub, cols + extra))
        if axis == "groups":
            solver = [r for r in rows if r["axis"] == "groups-solver"]
            if solver:
                md.append("\nThe permutation machinery alone per training step (Sinkhorn forward + backward and the "
                          "hard assignment, all sites; `--solver`, idle machine):\n\n")
                md.append(markdown_table(solver, ["setting", "cost_params", "solver_seconds_per_step", "threads"]))
        if axis == "epochs":
            curve = [r for r in rows if r["axis"] == "epochs-curve"]
            if curve:
                md.append("\nHeld-out perplexity after each epoch of the long run:\n\n")
                md.append(markdown_table(curve, ["setting", "ppl_learned", "train_loss", "tau"]))
    md.append("\n![sweep](sweep.png)\n")
    atomic_write_text(out / "sweep.md", "".join(md))
    plot(rows, out / "sweep.png")


def plot(rows: list[dict], path: Path) -> None:
    from permsparse.report import pyplot

    plt = pyplot()

    axes = [a for a in AXES if any(r["axis"] == a for r in rows)]
    fig, grid = plt.subplots(3, 3, figsize=(16, 13))
    flat = grid.flatten()
    for ax, axis in zip(flat, axes):
        sub = [r for r in rows if r["axis"] == axis]
        x = range(len(sub))
        ax.plot(x, [r["ppl_none"] for r in sub], "v", color="tab:red", ms=8, label="no permutation")
        ax.plot(x, [r["ppl_heuristic"] for r in sub], "s", color="tab:orange", ms=8, label="heuristic")
        ax.plot(x, [r["ppl_learned"] for r in sub], "o", color="tab:blue", ms=9, label="learned")
        ax.set_xticks(list(x), [r["setting"] for r in sub], rotation=35, ha="right", fontsize=8)
        ax.set_title(axis)
        ax.set_ylabel("held-out perplexity")
        lo = min(min(r["ppl_learned"], r["ppl_heuristic"]) for r in sub)
        hi = max(max(r["ppl_none"], r["ppl_learned"]) for r in sub)
        ax.set_ylim(lo - 0.1 * (hi - lo) - 1e-3, hi + 0.1 * (hi - lo) + 1e-3)
        ax.set_xlim(-0.5, len(sub) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    if axes:
        flat[0].legend(fontsize=8)
    curve = [r for r in rows if r["axis"] == "epochs-curve"]
    ax = flat[len(axes)] if len(axes) < len(flat) else None
    if ax is not None and curve:
        ax.plot([r["epoch"] for r in curve], [r["ppl_learned"] for r in curve], "o-", label="held-out ppl")
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out perplexity")
        ax.set_title("long run: held-out perplexity per epoch")
        tw = ax.twinx()
        tw.plot([r["epoch"] for r in curve], [r["train_loss"] for r in curve], "s--", color="tab:gray",
                label="calibration loss")
        tw.set_ylabel("calibration loss (mean over the epoch)")
        ax.grid(alpha=0.3)
    for extra in flat[len(axes) + (1 if curve else 0):]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=sorted(GRIDS))
    ap.add_argument("--axes", default=",".join(AXES), help="comma-separated subset of " + ",".join(AXES))
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for sweep.json/.md/.png")
    ap.add_argument("--n-calib", type=int, default=32, help="calibration windows (full preset)")
    ap.add_argument("--window", type=int, default=256, help="tokens per calibration window (full preset)")
    ap.add_argument("--batch-size", type=int, default=2, help="windows per step (full preset)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (full preset)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    ap.add_argument("--render", action="store_true", help="only re-render sweep.md and sweep.png from sweep.json")
    ap.add_argument("--only", default=None,
                    help="comma-separated settings to run (e.g. 'ria 2:4,G=8'), to split one axis over processes")
    ap.add_argument("--solver", action="store_true",
                    help="only time the permutation machinery per step for G in 1..16 on SmolLM2's sites "
                    "(writes sweep.json with those rows; merge it with the others)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="join the sweep.json of several runs (e.g. axes split over processes) into --out")
    opts = ap.parse_args(argv)
    out = Path(opts.out)
    if opts.render:
        saved = json.loads((out / "sweep.json").read_text())
        write_outputs(saved["rows"], saved["meta"], out)
        return 0
    if opts.merge:
        rows, meta = merge([json.loads((Path(d) / "sweep.json").read_text()) for d in opts.merge])
        write_outputs(rows, meta, out)
        return 0
    axes = [a for a in opts.axes.split(",") if a]
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        ap.error(f"unknown axes {unknown}; choose from {AXES}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t0 = time.time()
    if opts.solver:
        from permsparse.models.loading import load_model

        model = tiny_setup().model if opts.preset == "tiny" else load_model("smollm2-135m")[0]
        groups = (1, 2) if opts.preset == "tiny" else (1, 2, 4, 8, 16)
        rows = solver_rows(model, groups)
        meta = {"command": "python bench/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "preset": opts.preset, "setup": "solver only", "complete": True, "date": time.strftime("%Y-%m-%d")}
        from permsparse.io.atomic import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "sweep.json", {"rows": rows, "meta": meta})
        for r in rows:
            print(f"[sweep] solver {r['setting']}: {r['solver_seconds_per_step']} s/step, {r['cost_params']} costs")
        return 0
    if opts.preset == "tiny":
        setup = tiny_setup()
    else:
        setup = embedded_setup(opts.n_calib, opts.window, opts.eval_tokens, opts.batch_size)
    b = setup.base
    meta = {
        "command": "python bench/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": opts.preset, "setup": setup.describe,
        "base": (f"{b.pattern} {b.score}, G={b.groups}, synchronised sites, learned from the heuristic warm start, "
                 f"cost table, lr {b.learn.lr}, tau {b.learn.tau_start}->{b.learn.tau_end} {b.learn.tau_schedule}, "
                 f"{b.learn.sinkhorn_iters} Sinkhorn iterations, {b.learn.epochs:g} epoch, alpha {b.learn.alpha}"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "note": "wall-clock seconds; other jobs shared the cores during part of the run, so compare seconds only "
                "within an axis",
        "date": time.strftime("%Y-%m-%d"),
    }

    def save(rows: list[dict], done: bool = False) -> None:
        meta.update(ppl_dense=rows[0]["ppl_dense"] if rows else float("nan"), complete=done,
                    total_minutes=round((time.time() - t0) / 60, 1))
        write_outputs(rows, meta, out)

    only = {x.strip() for x in opts.only.split(",")} if opts.only else None
    rows = run(setup, GRIDS[opts.preset], axes, on_rows=save, only=only)  # partial results are on disk after every point
    save(rows, done=True)
    print(f"[sweep] wrote {out / 'sweep.json'} ({meta['total_minutes']} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LLaMA-2-7B-shaped models: the learned prune's training step, its time and its memory, measured.

Builds random LLaMA models at LLaMA-2-7B width (hidden 4096, MLP 11008, 32 heads, vocab
32000) with the given numbers of decoder blocks (the full 32 included), in bfloat16 on the
device, and runs the library's learned prune end to end (2:4, Wanda, G = 4, synchronised
sites). Each training step is split into the hard assignments (the bank's forward), the
Sinkhorn (the bank's backward: the soft matrices are recomputed there; timed alone on the same
costs after each step, as the backward runs it), ``W_eff``, and the model (teacher forward,
student forward and backward: the rest of the step). A depth that does not fit is a row that
says so (the CUDA out-of-memory error caught), not a skipped line. The memory account of the
third step (bench/memory.py's probe) goes into each row.

    python bench/gpu_block.py --depths 32 --batches 4,1            # on a CUDA machine: gpu_block.{json,md}
    python bench/gpu_block.py --device cpu --depths 2 --batches 1 --window 512   # gpu_block_cpu.{json,md}
    python bench/gpu_block.py --tiny --device cpu --out /tmp/g      # smoke test anywhere

Full-depth figures are measured rows; the per-block extrapolation appears only for a batch whose
full depth was not measured, and says so. The random weights make the perplexity meaningless;
only time and memory are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from settings import BEFORE_0_2, NO_BUDGET  # noqa: E402

from memory import Probe  # noqa: E402
from permsparse.api import prune  # noqa: E402
from permsparse.config import LearnConfig, PruneConfig  # noqa: E402
from permsparse.core.sinkhorn import hard_assignment, host_cores, soft_entropy, solver_threads  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.train.callbacks import Callback, PhaseTimer  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, blocks=32, params=6.74e9)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_attention_heads=4,
            num_key_value_heads=4, blocks=4, params=None)
PAPER_STEPS = 64  # 128 windows x 2048 tokens, 2 epochs, batch 4


class _Measure(Callback):
    """The phase timer, the memory probe, and after each step the Sinkhorn of the bank's costs
    timed alone (the work the backward's recomputation does)."""

    def __init__(self, model, device: torch.device, iters: int) -> None:
        self.timer, self.probe = PhaseTimer(device), Probe(model, at_step=2)
        self.device, self.iters, self.sinkhorn_s = device, iters, []
        self.solver: dict = {}

    def on_train_begin(self, state) -> None:
        self.probe.on_train_begin(state)

    def on_phase_begin(self, state, name) -> None:
        self.timer.on_phase_begin(state, name)
        self.probe.on_phase_begin(state, name)

    def on_phase_end(self, state, name) -> None:
        self.probe.on_phase_end(state, name)
        self.timer.on_phase_end(state, name)

    def on_step_end(self, state, log) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for cost in state.bank.cost_tensors().values():
            soft_entropy(cost, log.tau, self.iters)
        sync()
        self.sinkhorn_s.append(time.perf_counter() - t0)

    def on_train_end(self, state) -> None:
        self.solver = dict(getattr(state.bank, "assign_stats", {}))

    def close(self) -> None:
        self.probe.close()


def _model(shape: dict, depth: int, device: torch.device, window: int):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=depth,
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=max(window, 128), initializer_range=0.02)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def _train_direct(model, calib: torch.Tensor, learn: LearnConfig, meas: _Measure) -> tuple[list, int]:
    """The trainer alone (no heuristic search, guard or export): Wanda scores from one calibration
    batch, the identity-biased start, a teacher forward every step (at the paper's 128 windows the
    7B teacher logits exceed the cache's 8 GiB)."""
    from permsparse.core.pattern import NMPattern
    from permsparse.models import apply, calibrate
    from permsparse.models.sites import find_sites
    from permsparse.train.loop import make_batches, train_end_to_end

    sites = find_sites(model)
    consumers = [c for s in sites for c in s.consumers]
    stats = calibrate.collect_stats(model, make_batches(calib[: learn.batch_size], learn.batch_size), consumers,
                                    progress=False, bf16=True)
    scores = {}
    for s in sites:
        scores.update(zip(s.consumers, apply.site_scores(model, s, "wanda", stats)))
    del stats
    cfg = dataclasses.replace(learn, init="identity", teacher_cache_gb=0.0)
    _, history = train_end_to_end(model, sites, scores, NMPattern.parse("2:4"), 4, calib, cfg,
                                  progress=False, callbacks=[meas])
    return history, len(sites)


def run_depth(shape: dict, depth: int, device: torch.device, steps: int, batch: int, window: int,
              init: str = "heuristic", assign: str = "threads", ckpt: bool = False, direct: bool = False) -> dict:
    model = _model(shape, depth, device, window)
    init = "identity" if direct else init
    calib = torch.randint(3, shape["vocab_size"], (steps * batch, window), generator=torch.Generator().manual_seed(0))
    learn = LearnConfig(**NO_BUDGET, objective="e2e", batch_size=batch, epochs=1.0, guard_batches=1, snapshots=0, bf16=True, init=init,
                        activation_checkpointing=ckpt)
    pc = PruneConfig(pattern="2:4", score="wanda", permutation="learned", groups=4, learn=learn, progress=False,
                     **BEFORE_0_2)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    meas = _Measure(model, device, learn.sinkhorn_iters)
    t0 = time.perf_counter()
    with solver_threads(1) if assign == "serial" else nullcontext():  # serial: one host thread
        if direct:
            history, n_sites = _train_direct(model, calib, learn, meas)
        else:
            res = prune(model, None, pc, calib, on_step=meas)
            history, n_sites = res.history, len(res.sites)
            del res
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    card = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else float("nan")
    step = [h.seconds for h in history]
    # The first step pays one-off costs (kernel selection, the mask cache); the medians skip it.
    tail = slice(1, None) if len(step) > 2 else slice(None)
    step_s = statistics.median(step[tail])
    parts = meas.timer.medians()
    sink_s = statistics.median(meas.sinkhorn_s[tail])
    assign_s, weights_s = parts["bank_s"], parts["weights_s"]
    row = {
        "kind": "e2e_step", "shape": "llama2-7b" if shape is LLAMA2_7B else "tiny", "init": init, "assign": assign,
        "ckpt": ckpt, "blocks": depth, "batch": batch, "window": window,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": batch * window,
        "steps": len(step), "step_s": round(step_s, 4), "assign_s": round(assign_s, 4), "sinkhorn_s": round(sink_s, 4),
        "bank_s": round(assign_s + sink_s, 4), "bank_share": round((assign_s + sink_s) / step_s, 4),
        "weights_s": round(weights_s, 4), "model_s": round(step_s - assign_s - sink_s - weights_s, 4),
        "prune_s": round(seconds, 2), "peak_gib_over_model": round(peak, 3),
        "peak_reserved_gib": round(reserved, 2), "card_gib": round(card, 1),
        "free_share": round(1 - reserved / card, 3) if cuda else float("nan"),
        "model_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3),
        "sites": n_sites, "solver_groups": meas.solver, "direct": direct,
    }
    if meas.probe.account is not None:
        row["account_gib"] = {r: round(b / 2**30, 3) for r, b in meas.probe.account.bytes.items() if b}
        row["account_where"] = meas.probe.where
    del model, meas
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def try_depth(*args, **kwargs) -> dict:
    """:func:`run_depth`, or a row saying that it does not fit (CUDA out of memory)."""
    shape, depth, device, steps, batch, window = args[:6]
    try:
        return run_depth(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as err:
        alloc = torch.cuda.max_memory_allocated() / 2**30
        row = {"kind": "oom", "blocks": depth, "batch": batch, "window": window, "ckpt": kwargs.get("ckpt", False),
               "init": kwargs.get("init", "heuristic"), "assign": kwargs.get("assign", "threads"),
               "direct": kwargs.get("direct", False),
               "device": torch.cuda.get_device_name(), "note": f"does not fit at batch {batch} x {window}",
               "max_allocated_gib": round(alloc, 2), "error": str(err).splitlines()[0][:160]}
    gc.collect()
    torch.cuda.empty_cache()
    return row


def time_assignment(ks: list[int], reps: int = 3) -> list[dict]:
    """One k x k hard assignment of random costs (the solver's worst case: no group certified)."""
    rows = []
    for k in ks:
        c = torch.randn(1, k, k, generator=torch.Generator().manual_seed(0))
        hard_assignment(c)
        t0 = time.perf_counter()
        for _ in range(reps):
            hard_assignment(c)
        rows.append({"kind": "assign", "k": k, "assign_s": round((time.perf_counter() - t0) / reps, 4)})
    return rows


def estimate(rows: list[dict], shape: dict) -> list[dict]:
    """Per-block extrapolation to the full depth, ONLY for (batch, settings) whose full depth was
    not measured (neither fitting nor refused): an estimate, labelled with its assumptions."""
    out = []
    runs = [r for r in rows if r["kind"] in ("e2e_step", "oom")]
    keys = {(r["batch"], r["window"], r["init"], r["assign"], r["ckpt"]) for r in runs}
    for key in sorted(keys, key=str):
        mine = [r for r in runs if (r["batch"], r["window"], r["init"], r["assign"], r["ckpt"]) == key]
        if any(r["blocks"] == shape["blocks"] for r in mine) or shape["params"] is None:
            continue
        e = sorted((r for r in mine if r["kind"] == "e2e_step"), key=lambda r: r["blocks"])
        if len(e) < 2:
            continue
        a, b = e[0], e[-1]
        per = {k: (b[k] - a[k]) / (b["blocks"] - a["blocks"]) for k in ("step_s", "bank_s", "model_s", "weights_s",
                                                                         "peak_gib_over_model")}
        full = {k: a[k] + per[k] * (shape["blocks"] - a["blocks"]) for k in per}
        out.append({
            "kind": "estimate", "batch": key[0], "window": key[1], "init": key[2], "assign": key[3], "ckpt": key[4],
            "blocks": shape["blocks"], "from_blocks": [a["blocks"], b["blocks"]],
            **{f"per_block_{k}": round(v, 4) for k, v in per.items()},
            **{k: round(v, 2) for k, v in full.items()},
            "paper_steps": PAPER_STEPS, "train_hours": round(full["step_s"] * PAPER_STEPS / 3600, 2),
            "assumptions": "linear in depth from the two measured depths; same host, batch and settings",
        })
    return out


def _gib(x) -> str:
    return "" if x is None or x != x else f"{x:.1f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# LLaMA-2-7B-shaped models: the learned prune's training step, measured",
        "",
        f"Generated by `python bench/gpu_block.py {meta['argv']}` on {meta['created']} ({meta['device']}, "
        f"torch {meta['torch']}, {meta['host']}).",
        "",
        "Random LLaMA models at LLaMA-2-7B width (hidden 4096, MLP 11008, 32 heads, vocab 32000), bfloat16; the "
        "learned prune end to end, 2:4 Wanda, G = 4, synchronised sites. Seconds per step, medians over the steps "
        "after the first: `assign` = the hard assignments (the bank's forward), `Sinkhorn` = the soft matrices the "
        "backward recomputes (timed alone on the same costs), `bank` = both, `W_eff` = the permuted masked weights, "
        "`model` = the rest (teacher forward, student forward and backward). `peak`: device memory allocated "
        "during the run beyond the weights, and the share of the card the allocator had not reserved at its peak "
        "(CUDA only). `ckpt`: activation checkpointing of the blocks. `whole run`: the prune (calibration, "
        "heuristic, training, guard), or with `--direct` the trainer alone.",
        "",
        "| blocks | batch | init | assign | ckpt | step s | assign | Sinkhorn | bank share | W_eff | model | "
        "peak GiB over weights | weights GiB | card free at peak | whole run s |",
        "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "e2e_step":
            lines.append(
                f"| {r['blocks']} | {r['batch']} x {r['window']} | {r['init']} | {r['assign']} | "
                f"{'yes' if r['ckpt'] else 'no'} | **{r['step_s']:.3f}** | {r['assign_s']:.3f} | {r['sinkhorn_s']:.3f} | "
                f"**{r['bank_share']:.0%}** | {r['weights_s']:.3f} | {r['model_s']:.3f} | "
                f"{_gib(r['peak_gib_over_model'])} | {r['model_gib']:.1f} | "
                f"{'' if r.get('free_share', float('nan')) != r.get('free_share') else format(r['free_share'], '.0%')} | "
                f"{r['prune_s']:.0f} |")
        elif r["kind"] == "oom":
            lines.append(f"| {r['blocks']} | {r['batch']} x {r['window']} | {r['init']} | {r['assign']} | "
                         f"{'yes' if r['ckpt'] else 'no'} | **{r['note']}** (CUDA out of memory, "
                         f"{r['max_allocated_gib']:.1f} GiB allocated) | | | | | | | | | |")
    full = [r for r in rows if r["kind"] == "e2e_step" and r["blocks"] == meta["full_depth"]]
    if full:
        lines += ["", "## Full depth, measured", ""]
        for r in full:
            lines.append(f"- batch {r['batch']} x {r['window']}, ckpt {'yes' if r['ckpt'] else 'no'}: "
                         f"{r['step_s']:.2f} s per step; {PAPER_STEPS} steps (128 windows x 2048 tokens, 2 epochs at "
                         f"batch 4) = **{r['step_s'] * PAPER_STEPS / 3600:.2f} GPU-hours** (measured step x steps).")
    acc = [r for r in rows if r.get("account_gib")]
    if acc:
        lines += ["", "## Memory account (third step, end of its loss; GiB)", "",
                  "| blocks | batch | ckpt | " + " | ".join(sorted({k for r in acc for k in r['account_gib']})) + " |",
                  "| ---: | --- | --- |" + " ---: |" * len({k for r in acc for k in r['account_gib']})]
        keys = sorted({k for r in acc for k in r["account_gib"]})
        for r in acc:
            lines.append(f"| {r['blocks']} | {r['batch']} x {r['window']} | {'yes' if r['ckpt'] else 'no'} | "
                         + " | ".join(f"{r['account_gib'].get(k, 0):.2f}" for k in keys) + " |")
    if any(r["kind"] == "assign" for r in rows):
        lines += ["", "| k | one hard assignment of random costs, s (host) |", "| ---: | ---: |"]
        lines += [f"| {r['k']} | {r['assign_s']:.4f} |" for r in rows if r["kind"] == "assign"]
    for ex in (r for r in rows if r["kind"] == "estimate"):
        lines += ["", f"## ESTIMATE (not measured) for {ex['blocks']} blocks at batch {ex['batch']} x {ex['window']}, "
                  f"ckpt {'yes' if ex['ckpt'] else 'no'}", "",
                  f"Assumptions: {ex['assumptions']} (blocks {ex['from_blocks']}). Per block "
                  f"{ex['per_block_step_s']:.3f} s per step; full depth {ex['step_s']:.1f} s per step, "
                  f"{ex['train_hours']:.2f} GPU-hours for {ex['paper_steps']} steps, about "
                  f"{ex['peak_gib_over_model']:.0f} GiB beside the weights."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda (refused when absent, unless --tiny or given)")
    ap.add_argument("--tiny", action="store_true", help="a tiny width (smoke test of the script)")
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--batches", default="4", help="batch sizes (windows per step), each at every depth")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", default="heuristic/threads",
                    help="init/assign pairs: init in {heuristic, noise}, assign in {threads, serial}")
    ap.add_argument("--ckpt", default="no", help="activation checkpointing settings: no, yes or no,yes")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--runs", default=None, help="depth:batch:ckpt triples (e.g. 32:4:yes,32:1:no) instead of "
                    "--depths x --batches x --ckpt")
    ap.add_argument("--direct", action="store_true",
                    help="time the trainer alone (no heuristic search, guard or export; identity-biased start)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.device is None and not torch.cuda.is_available() and not args.tiny:
        ap.error("no CUDA device: this benchmark measures a GPU (--device cpu measures this CPU; --tiny for a smoke test)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = TINY if args.tiny else LLAMA2_7B
    window = min(args.window, 128) if args.tiny else args.window
    rows = []
    if args.runs:  # depth:batch:ckpt triples instead of the product of the lists
        plan = [(c.split("/")[0], c.split("/")[1], r.split(":")[2] == "yes", int(r.split(":")[1]), int(r.split(":")[0]))
                for c in args.configs.split(",") for r in args.runs.split(",")]
    else:
        plan = [(init, assign, ckpt == "yes", int(b), int(d)) for init, assign in (c.split("/") for c in args.configs.split(","))
                for ckpt in args.ckpt.split(",") for b in args.batches.split(",") for d in args.depths.split(",")]
    for init, assign, ckpt, batch, depth in plan:
        run = try_depth if device.type == "cuda" else run_depth
        rows.append(run(shape, depth, device, args.steps, batch, window, init=init, assign=assign, ckpt=ckpt,
                        direct=args.direct))
        print(rows[-1], flush=True)
    rows += time_assignment([shape["hidden_size"] // 4, shape["intermediate_size"] // 4])
    rows += estimate(rows, shape)
    meta = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "host_cores": host_cores(),
        "full_depth": shape["blocks"], "argv": " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_block_tiny" if args.tiny else ("gpu_block" if device.type == "cuda" else "gpu_block_cpu")
    atomic_write_json(args.out / f"{name}.json", {"rows": rows, "meta": meta})
    atomic_write_text(args.out / f"{name}.md", markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

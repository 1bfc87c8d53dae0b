"""LLaMA-2-7B-shaped blocks on CUDA: the learned prune's training step, measured.

Builds random LLaMA models at LLaMA-2-7B width (hidden 4096, MLP 11008, 32 heads, vocab
32000) with 1 and 2 decoder blocks, in bfloat16 on the GPU, and runs the library's
learned prune end to end (2:4, Wanda, G = 4, synchronised sites, batches of 4 x 2048
tokens). Each training step is split into the permutation bank's forward (Sinkhorn on
the GPU, the hard assignments with scipy on the host), the construction of ``W_eff``,
and the model's teacher forward, student forward and backward (the rest of the step).
The 7B step is extrapolated from the per-block slope of the two depths (same embedding
and head), next to bench/scaling.py's CPU-based estimate.

    python bench/gpu_block.py                       # on a CUDA machine: gpu_block.{json,md}
    python bench/gpu_block.py --tiny --device cpu --out /tmp/g   # smoke test anywhere

The random weights make the perplexity meaningless; only time and memory are read.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.config import LearnConfig  # noqa: E402
from permsparse.api import prune  # noqa: E402
from permsparse.config import PruneConfig  # noqa: E402
from permsparse.core.sinkhorn import hard_assignment, host_cores, solver_threads  # noqa: E402
from permsparse.train.callbacks import PhaseTimer  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, blocks=32, params=6.74e9)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_attention_heads=4,
            num_key_value_heads=4, blocks=4, params=None)
PAPER_STEPS = 64  # 128 windows x 2048 tokens, 2 epochs, batch 4 (bench/scaling.py's assumption)


def run_depth(shape: dict, depth: int, device: torch.device, steps: int, batch: int, window: int,
              init: str = "heuristic", assign: str = "threads") -> dict:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=depth,
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=max(window, 128), initializer_range=0.02)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    n = steps * batch
    calib = torch.randint(3, shape["vocab_size"], (n, window), generator=torch.Generator().manual_seed(0))
    learn = LearnConfig(batch_size=batch, epochs=1.0, guard_batches=1, snapshots=0, bf16=True, init=init)
    pc = PruneConfig(pattern="2:4", score="wanda", permutation="learned", groups=4, learn=learn, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    timer = PhaseTimer(device)
    # serial: the solver as it was before it used every host core (one thread)
    with solver_threads(1) if assign == "serial" else nullcontext():
        res = prune(model, None, pc, calib, on_step=timer)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    step = [h.seconds for h in res.history]
    # The first step pays one-off costs (kernel selection, the mask cache); the median skips it.
    tail = slice(1, None) if len(step) > 2 else slice(None)
    step_s = statistics.median(step[tail])
    parts = timer.medians()
    bank_s, weights_s = parts["bank_s"], parts["weights_s"]
    row = {
        "kind": "e2e_step", "shape": "llama2-7b" if shape is LLAMA2_7B else "tiny", "init": init, "assign": assign, "blocks": depth,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params": sum(p.numel() for p in model.parameters()), "tokens_per_step": batch * window,
        "steps": len(step), "step_s": round(step_s, 4), "bank_s": round(bank_s, 4),
        "weights_s": round(weights_s, 4), "model_s": round(step_s - bank_s - weights_s, 4),
        "prune_s": round(seconds, 2), "peak_gib_over_model": round(peak, 3),
        "model_gib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 3),
        "sites": len(res.sites),
    }
    del model, res
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_assignment(ks: list[int], reps: int = 3) -> list[dict]:
    """One k x k hard assignment (scipy on the host), the unit of the bank's host work."""
    rows = []
    for k in ks:
        c = torch.randn(1, k, k, generator=torch.Generator().manual_seed(0))
        hard_assignment(c)
        t0 = time.perf_counter()
        for _ in range(reps):
            hard_assignment(c)
        rows.append({"kind": "assign", "k": k, "assign_s": round((time.perf_counter() - t0) / reps, 4)})
    return rows


def extrapolate(rows: list[dict], shape: dict, init: str, assign: str) -> dict | None:
    """Step of the full-depth model from the per-block slope of the measured depths."""
    e = sorted((r for r in rows if r["kind"] == "e2e_step" and r["init"] == init and r["assign"] == assign),
               key=lambda r: r["blocks"])
    if len(e) < 2 or shape["params"] is None:
        return None
    a, b = e[0], e[-1]
    per = {k: (b[k] - a[k]) / (b["blocks"] - a["blocks"]) for k in ("step_s", "bank_s", "model_s", "weights_s",
                                                                     "peak_gib_over_model")}
    full = {k: a[k] + per[k] * (shape["blocks"] - a["blocks"]) for k in per}
    return {
        "kind": "extrapolated", "shape": "llama2-7b", "init": init, "assign": assign, "blocks": shape["blocks"],
        "per_block_step_s": round(per["step_s"], 4), "per_block_bank_s": round(per["bank_s"], 4),
        "per_block_model_s": round(per["model_s"], 4), "per_block_weights_s": round(per["weights_s"], 4),
        "step_s": round(full["step_s"], 2), "bank_s": round(full["bank_s"], 2), "model_s": round(full["model_s"], 2),
        "weights_s": round(full["weights_s"], 2), "peak_gib_over_model": round(full["peak_gib_over_model"], 1),
        "model_gib": round(shape["params"] * 2 / 2**30, 1),
        "paper_steps": PAPER_STEPS, "train_hours": round(full["step_s"] * PAPER_STEPS / 3600, 2),
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# LLaMA-2-7B-shaped blocks: the learned prune's training step on CUDA",
        "",
        f"Generated by `python bench/gpu_block.py` on {meta['created']} ({meta['device']}, torch {meta['torch']}, "
        f"{meta['host']}).",
        "",
        "Random LLaMA models at LLaMA-2-7B width (hidden 4096, MLP 11008, 32 heads, vocab 32000), bfloat16 on the "
        f"GPU; learned prune end to end, 2:4 Wanda, G = 4, synchronised sites; {meta['steps']} steps of "
        f"{meta['batch']} x {meta['window']} tokens. `bank`: Sinkhorn (GPU) and the hard assignments (scipy, host); "
        "`W_eff`: the permuted masked weights; `model`: teacher forward, student forward and backward. Medians "
        "over the steps after the first. Peak: GPU memory allocated during the prune beyond the model's weights.",
        "",
        "`init`: `heuristic` is the default warm start; `noise` starts from random costs, so every group runs "
        "the full solver on every step (the worst case of the host work). `assign`: `threads` solves the groups' assignments "
        f"on all {meta['host_cores']} host cores at once (the library's way); `serial` on one thread, as "
        "before.",
        "",
        "| init | assign | blocks | params | step s | bank s | W_eff s | model s | peak GiB over model | whole prune s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "e2e_step":
            lines.append(f"| {r['init']} | {r['assign']} | {r['blocks']} | {r['params'] / 1e6:.0f}M | {r['step_s']:.3f} | {r['bank_s']:.3f} | "
                         f"{r['weights_s']:.3f} | {r['model_s']:.3f} | {r['peak_gib_over_model']:.2f} | "
                         f"{r['prune_s']:.1f} |")
    lines += ["", "| k | one hard assignment s (host) |", "| ---: | ---: |"]
    lines += [f"| {r['k']} | {r['assign_s']:.4f} |" for r in rows if r["kind"] == "assign"]
    for ex in (r for r in rows if r["kind"] == "extrapolated"):
        lines += [
            "",
            f"## Extrapolated to LLaMA-2-7B ({ex['blocks']} blocks) from the per-block slope, init {ex['init']}, "
            f"assignments {ex['assign']}",
            "",
            f"Per block: {ex['per_block_step_s']:.3f} s per step, of which bank {ex['per_block_bank_s']:.3f} s, "
            f"W_eff {ex['per_block_weights_s']:.3f} s, model {ex['per_block_model_s']:.3f} s.",
            "",
            f"Full model: **{ex['step_s']:.1f} s per step** (bank {ex['bank_s']:.1f}, W_eff {ex['weights_s']:.1f}, "
            f"model {ex['model_s']:.1f}); {ex['paper_steps']} steps (128 windows x 2048 tokens, 2 epochs) "
            f"= **{ex['train_hours']:.2f} GPU-hours** of training on one GPU; activations and costs about "
            f"{ex['peak_gib_over_model']:.0f} GiB beside the {ex['model_gib']:.0f} GiB of bf16 weights.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda (refused when absent, unless --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a tiny width (smoke test of the script)")
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--configs", default="heuristic/threads,heuristic/serial,noise/threads",
                    help="init/assign pairs: init in {heuristic, noise}, assign in {threads, serial}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        ap.error("no CUDA device: this benchmark measures the GPU (use --tiny --device cpu for a smoke test)")
    shape = TINY if args.tiny else LLAMA2_7B
    window = min(args.window, 128) if args.tiny else args.window
    rows = []
    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    for init, assign in configs:
        for depth in (int(d) for d in args.depths.split(",")):
            rows.append(run_depth(shape, depth, device, args.steps, args.batch, window, init, assign))
            print(rows[-1], flush=True)
    ks = [shape["hidden_size"] // 4, shape["intermediate_size"] // 4]
    rows += time_assignment(ks)
    rows += [ex for ex in (extrapolate(rows, shape, init, assign) for init, assign in configs) if ex]
    meta = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": rows[0]["device"], "torch": torch.__version__,
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "steps": args.steps, "batch": args.batch, "window": window,
        "host_cores": host_cores(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_block" if not args.tiny else "gpu_block_tiny"
    atomic_write_json(args.out / f"{name}.json", {"rows": rows, "meta": meta})
    atomic_write_text(args.out / f"{name}.md", markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

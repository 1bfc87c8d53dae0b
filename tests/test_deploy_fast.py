"""The fast deployed model: 2:4 layers that keep attention on its fused kernels, the per-shape
dense fallback, the static cache, and the GPU bench's dry run.

cuSPARSELt needs CUDA; on the CPU its two ops are replaced by the stand-in of
bench/gpu_deploy.py, which implements the contract of aten/src/ATen/native/sparse/cuda/
cuSPARSELtOps.cpp (compressed storage of the kept values; ``transpose_result`` -> ``(n, m)``
row-major). GPU tests run the real kernels and skip without CUDA.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench_module import load_bench
from permsparse.core.pattern import NMPattern
from permsparse.models.apply import prune_site_
from permsparse.models.deploy import count_gathers, deploy
from permsparse.models.fast import (
    accelerate,
    choose_min_tokens,
    compile_options,
    to_sparse24,
    use_static_cache,
)
from permsparse.models.sites import find_sites, get_module
from permsparse.models.sparse24 import Sparse24Linear, fused_attention_layout_ok, pack_2to4, row_major

PATTERN = NMPattern.parse("2:4")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _bench():
    return load_bench("gpu_deploy")


@pytest.fixture
def cusparselt():
    """The CPU stand-in for ``torch._cslt_compress`` / ``torch._cslt_sparse_mm``, with a call log."""
    bench = _bench()
    calls = []

    def mm(packed, dense_b, *args, **kwargs):
        out = bench.emu_sparse_mm(packed, dense_b, *args, **kwargs)
        calls.append({"dense_b": dense_b, "out": out, **kwargs})
        return out

    with bench.emulated_cusparselt():
        torch._cslt_sparse_mm = mm
        yield calls


def _w24(d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    keep = w.abs().reshape(d_out, -1, 4).topk(2, -1).indices
    mask = torch.zeros(d_out, d_in // 4, 4).scatter(-1, keep, 1.0).reshape(d_out, d_in)
    return (w * mask).half()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 4e-3) -> bool:
    """Equal within fp16 rounding of the larger values (fp16 keeps ~3 decimal digits)."""
    return (a.float() - b.float()).abs().max().item() <= rel * max(1.0, b.float().abs().max().item())


def _masked_tiny(tiny, dtype=torch.float16):
    t = tiny("llama")
    model = t.model.to(dtype).eval()
    sites = find_sites(model)
    gen = torch.Generator().manual_seed(0)
    perms = {s.name: s.random_permutation(4, gen) for s in sites}
    with torch.no_grad():
        for s in sites:
            prune_site_(model, s, PATTERN, "magnitude", None, perms[s.name])
    return t, model, sites, perms


# -- the layout: why attention left its fused kernels, and the fix ------------------------------------


class StockSemiStructuredLinear(nn.Module):
    """What ``F.linear`` on a torch.sparse semi-structured weight returned before torch 2.13:
    ``(W @ x^T).t()`` viewed back to ``(..., out)`` (``semi_sparse_mm`` + ``semi_sparse_linear``)."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        x2d = x.reshape(-1, x.shape[-1])
        return (self.lin.weight @ x2d.t()).t().view(*x.shape[:-1], -1)  # (rows, out), strides (1, rows)


def _sdpa_layouts(model, ids, monkeypatch) -> list[bool]:
    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(fused_attention_layout_ok(q, k, v))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    monkeypatch.setattr(F, "scaled_dot_product_attention", original)
    return seen, out


def test_transposed_product_sends_attention_off_the_fused_kernels_and_sparse24_does_not(
        tiny, cusparselt, monkeypatch):
    """The chain of evidence on the real LLaMA attention: a transposed product reaches SDPA with
    ``stride(-1) != 1`` (fused kernels refuse it); :class:`Sparse24Linear`'s output does not."""
    t, model, sites, perms = _masked_tiny(tiny, torch.float32)
    model.config._attn_implementation = "sdpa"
    ids = t.inputs["input_ids"]  # (2, 12): B*T = 24 rows
    ok, ref = _sdpa_layouts(model, ids, monkeypatch)
    assert ok and all(ok)

    stock = copy.deepcopy(model)
    for s in sites:
        for c in s.consumers:
            if c.endswith(("q_proj", "k_proj", "v_proj")):
                stock.get_submodule(c.rsplit(".", 1)[0]).__setattr__(c.rsplit(".", 1)[1],
                                                                  StockSemiStructuredLinear(get_module(stock, c)))
    bad, out = _sdpa_layouts(stock, ids, monkeypatch)
    assert bad and not any(bad)  # every layer: math fallback on CUDA
    assert torch.allclose(out, ref, atol=1e-4)  # same values, only the layout differs

    fast = deploy(copy.deepcopy(model).half(), sites, perms)
    to_sparse24(fast, sites, 0)
    good, out = _sdpa_layouts(fast, ids, monkeypatch)
    assert good and all(good)
    assert (out.float() - ref).abs().max() < 2e-2 * max(1.0, ref.abs().max().item())


def test_sparse24_asks_the_kernel_for_a_row_major_result_without_copies(cusparselt):
    w = _w24(64, 128)
    bias = torch.randn(64).half()
    layer = Sparse24Linear(w, bias)
    x = torch.randn(2, 8, 128).half()
    y = layer(x)
    call = cusparselt[-1]
    assert call["transpose_result"] is True
    assert call["dense_b"].stride() == (1, 128)  # x passed as its transposed view, not copied
    assert y.is_contiguous() and y.data_ptr() == call["out"].data_ptr()  # the kernel's own buffer
    assert close(y, F.linear(x.float(), w.float(), bias.float()))
    q = y.view(2, 8, 4, 16).transpose(1, 2)
    assert fused_attention_layout_ok(q)


def test_row_major_guard_repairs_a_transposed_kernel_result(cusparselt, monkeypatch):
    """Should a torch version hand back the transposed view again, the layer still returns row-major."""
    bench = _bench()

    def old(packed, dense_b, *args, transpose_result=False, **kwargs):
        return bench.emu_sparse_mm(packed, dense_b, *args, transpose_result=False, **kwargs).t()  # (n, m) view

    w = _w24(64, 128)
    layer = Sparse24Linear(w, None)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", old)
    x = torch.randn(3, 16, 128).half()
    y = layer(x)
    assert y.is_contiguous()
    assert close(y, F.linear(x.float(), w.float()))
    t = torch.randn(4, 6).t()
    assert row_major(t).is_contiguous() and torch.equal(row_major(t), t)
    c = torch.randn(4, 6)
    assert row_major(c) is c


def test_dense_fallback_below_min_tokens_and_padding(cusparselt):
    w = _w24(32, 64, seed=1)
    layer = Sparse24Linear(w, None, min_tokens=16)
    for rows, sparse in ((1, False), (15, False), (16, True), (21, True)):  # 21: padded to 24 for the kernel
        n = len(cusparselt)
        x = torch.randn(rows, 64).half()
        y = layer(x)
        assert (len(cusparselt) > n) is sparse
        assert y.shape == (rows, 32) and y.is_contiguous()
        assert close(y, x.float() @ w.float().t())
    assert Sparse24Linear(w, None).weight is None  # always 2:4: no dense copy kept
    assert layer.weight is not None


def test_gather_and_from_linear(cusparselt):
    w = _w24(32, 64, seed=2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    layer = Sparse24Linear(w, None, input_perm=perm)
    x = torch.randn(24, 64).half()
    assert close(layer(x), x[:, perm].float() @ w.float().t())
    lin = nn.Linear(64, 32, bias=True).half()
    with torch.no_grad():
        lin.weight.copy_(w)
    conv = Sparse24Linear.from_linear(lin)
    assert close(conv(x), lin(x).float())


def test_pack_refuses_what_the_kernels_cannot_run():
    w = _w24(32, 64)
    with pytest.raises(ValueError, match="deploy it first"):
        pack_2to4(w + 0.1)
    with pytest.raises(ValueError, match="float16"):
        pack_2to4(w.float())
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_2to4(w[:24])


@pytest.mark.parametrize("speedups,margin,expected", [
    ({16: 0.3, 256: 0.8, 1024: 1.1, 4096: 1.3}, 0.0, 1024),
    ({16: 1.2, 256: 1.3}, 0.0, 16),
    ({16: 0.3, 256: 0.9}, 0.0, None),  # loses at the largest size: never 2:4
    ({16: 1.1, 256: 0.9, 1024: 1.2}, 0.0, 1024),  # only the winning tail counts
    ({16: 0.5, 256: 1.01, 1024: 1.3}, 0.02, 1024),  # within the margin stays dense
])
def test_choose_min_tokens(speedups, margin, expected):
    assert choose_min_tokens(speedups, margin) == expected


# -- the deployed model on the (emulated) kernels --------------------------------------------------------


def test_to_sparse24_model_matches_masked_dense_and_generates(tiny, cusparselt):
    t, masked, sites, perms = _masked_tiny(tiny)
    fast = deploy(copy.deepcopy(masked), sites, perms)
    gathers = count_gathers(fast)
    shapes = {tuple(get_module(fast, c).weight.shape) for s in sites for c in s.consumers}
    never = sorted(shapes)[0]
    chosen = to_sparse24(fast, sites, {never: None})  # one shape stays dense, the others always 2:4
    assert count_gathers(fast) == gathers
    for name, n in chosen.items():
        layer = get_module(fast, name)
        assert isinstance(layer, Sparse24Linear) is (n is not None)
    ids = t.inputs["input_ids"]
    with torch.no_grad():
        ref = masked(input_ids=ids, use_cache=False).logits.float()
        got = fast(input_ids=ids, use_cache=False).logits.float()
        assert (got - ref).abs().max() < 2e-2 * max(1.0, ref.abs().max().item())
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
        plain = fast.generate(ids, **kw)
        use_static_cache(fast)
        assert fast.generation_config.cache_implementation == "static"
        assert torch.equal(fast.generate(ids, **kw), plain)  # static KV cache, same greedy tokens
    with pytest.raises(ValueError, match="only once"):
        to_sparse24(fast, sites, 0)


def test_to_sparse24_names_a_layer_that_is_not_deployed(tiny, cusparselt):
    _, masked, sites, _ = _masked_tiny(tiny)
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\..*deploy it first"):
        to_sparse24(masked, sites, 0)  # original coordinates: not 2:4 along the stored columns


def test_accelerate_and_from_pretrained_compile_need_cuda(tiny, tmp_path):
    import permsparse

    t, masked, sites, perms = _masked_tiny(tiny, torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        accelerate(deploy(copy.deepcopy(masked), sites, perms), sites)
    out = permsparse.export(masked, tmp_path / "out", sites, perms, pattern="2:4", score="magnitude", groups=4)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        permsparse.from_pretrained(out, deploy=True, compile=True)
    plain = permsparse.from_pretrained(out, deploy=True)  # the deploy path without compile: as before
    assert not any(isinstance(m, Sparse24Linear) for m in plain.modules())


def test_compile_options():
    assert compile_options(True) == {"mode": "reduce-overhead"}
    assert compile_options("cudagraphs") == {"backend": "cudagraphs"}
    assert compile_options("max-autotune") == {"mode": "max-autotune"}
    with pytest.raises(ValueError):
        compile_options(1)


def test_emulated_kernel_round_trips_the_compressed_weight():
    bench = _bench()
    w = _w24(48, 96, seed=3)
    packed = bench.emu_compress(w)
    assert packed.numel() == w.numel() * 9 // 16  # cuSPARSELt's compressed size for fp16
    eye = torch.eye(96).half()
    assert torch.equal(bench.emu_sparse_mm(packed, eye), w)
    assert bench.emu_sparse_mm(packed, eye, transpose_result=True).stride() == (48, 1)


@pytest.mark.slow
def test_norm_gather_fuses_into_the_norm_kernel_under_inductor(tiny):
    """Under torch.compile the site's gather costs no launch of its own: inductor emits one
    kernel for RMSNorm + index_select, as many kernels as the norm alone (CPU inductor)."""
    from torch._inductor.utils import run_and_get_code

    from permsparse.models.deploy import GatheredOutput

    norm = tiny("llama").model.model.layers[0].input_layernorm
    perm = torch.randperm(norm.weight.numel(), generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, norm.weight.numel())
    kernels = {}
    for name, mod in (("norm", norm), ("gathered", GatheredOutput(norm, perm))):
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(mod), x)
        assert torch.allclose(out, mod(x), atol=1e-5)
        kernels[name] = [line.split("=")[0].strip() for line in "\n".join(code).splitlines()
                         if "async_compile.cpp_pybinding" in line or "async_compile.triton" in line]
    assert kernels["norm"] and len(kernels["gathered"]) == len(kernels["norm"])
    assert any("index_select" in k and "rsqrt" in k for k in kernels["gathered"])


# -- the GPU bench, end to end on the CPU ------------------------------------------------------------------


def test_gpu_bench_dry_run(tmp_path):
    bench = _bench()
    assert bench.main(["--tiny", "--device", "cpu", "--emulate-2to4", "--models", "smollm2",
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_deploy.json").read_text())
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds.count("prefill") == 2 and kinds.count("decode") == 2
    corr = next(r for r in data["rows"] if r["kind"] == "correctness")
    assert corr["deployed_fused_layout_ok"] is True and corr["masked_fused_layout_ok"] is True
    assert corr["greedy_identical"] == corr["greedy_prompts"]
    assert corr["max_abs_logit_diff"] < 2e-2 * max(1.0, corr["max_abs_logit"])
    lib = next(r for r in data["rows"] if r["kind"] == "library")
    assert "CUDA" in lib["status"]
    assert "dry run" in (tmp_path / "gpu_deploy.md").read_text()


def test_capture_check_refuses_host_reads():
    bench = _bench()
    with bench.no_host_reads():
        with pytest.raises(RuntimeError, match="host read"):
            bool(torch.tensor(1))
    assert bool(torch.tensor(1))


# -- CUDA: the real kernels ------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_sparse24_matches_dense_and_is_row_major():
    from permsparse.models.sparse24 import sparse24_unavailable

    if sparse24_unavailable("cuda"):
        pytest.skip(sparse24_unavailable("cuda"))
    w = _w24(256, 512).cuda()
    bias = torch.randn(256, device="cuda").half()
    layer = Sparse24Linear(w, bias)
    for rows in (1, 13, 64, 1000):
        x = torch.randn(rows, 512, device="cuda").half()
        y = layer(x)
        assert y.is_contiguous()
        assert (y.float() - F.linear(x, w, bias).float()).abs().max() < 5e-2


@pytest.mark.gpu
@needs_cuda
def test_cuda_accelerate_generates_like_masked_dense(tiny):
    from permsparse.models.sparse24 import sparse24_unavailable

    if sparse24_unavailable("cuda"):
        pytest.skip(sparse24_unavailable("cuda"))
    t = tiny("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = t.model.half().cuda().eval()
    sites = find_sites(model)
    gen = torch.Generator().manual_seed(0)
    perms = {s.name: s.random_permutation(4, gen) for s in sites}
    with torch.no_grad():
        for s in sites:
            prune_site_(model, s, PATTERN, "magnitude", None, perms[s.name])
    fast = accelerate(deploy(copy.deepcopy(model), sites, perms), sites, compile="cudagraphs", min_tokens=8)
    assert any(isinstance(m, Sparse24Linear) for m in fast.modules())
    ids = t.inputs["input_ids"].cuda()  # (2, 12): 24 rows, on the 2:4 kernels
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        got = fast(input_ids=ids, use_cache=False).logits.float().clone()  # graph outputs are reused
        assert close(got, ref, rel=2e-2)
        a, b = model.generate(ids, **kw), fast.generate(ids, **kw)
    assert fast.generation_config.cache_implementation == "static"
    assert b.shape == a.shape and torch.equal(b[:, : ids.shape[1] + 1], a[:, : ids.shape[1] + 1])

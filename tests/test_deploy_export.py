"""Prune → deploy → export → load round trips, calibration statistics, and bad input."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from permsparse.io import atomic
from permsparse.io import export as psio
from permsparse.io import plan as pplan
from permsparse.models.apply import heuristic_permutation, prune_site_, site_scores
from permsparse.models.calibrate import collect_stats, run_blocks
from permsparse.models.deploy import GatheredOutput, PermutedLinear, deploy, deployed_violations, to_semi_structured
from permsparse.core.pattern import NMPattern, count_violations, nm_mask
from permsparse.core.permutation import Permutation
from permsparse.models.sites import find_sites, get_module

from conftest import REGISTERED_FAMILIES, TINY_FAMILIES

ATOL = 1e-4
PATTERN = NMPattern.parse("2:4")
GROUPS = 4

#: The stock auto class that loads each family's export.
STOCK_AUTO = {
    "llama": "AutoModelForCausalLM",
    "llama_mha": "AutoModelForCausalLM",
    "mistral": "AutoModelForCausalLM",
    "qwen2": "AutoModelForCausalLM",
    "qwen2_5_vl": "AutoModelForImageTextToText",
    "vit": "AutoModelForImageClassification",
    "bert": "AutoModel",
    "opt": "AutoModelForCausalLM",
}


def sites_of(t, **kw):
    if t.family not in REGISTERED_FAMILIES:
        kw["example_inputs"] = t.inputs
    return find_sites(t.model, **kw)


def prune(model, sites, batches, score="wanda", pattern=PATTERN, groups=GROUPS, perms=None):
    """Wanda (or magnitude) 2:4 with heuristic permutations (or the given ones), in place."""
    stats = None
    if score != "magnitude":
        stats = collect_stats(model, batches, [c for s in sites for c in s.consumers], progress=False)
    out = {}
    for s in sites:
        scores = site_scores(model, s, score, stats)
        perm = perms[s.name] if perms is not None else heuristic_permutation(s, scores, pattern, groups)
        prune_site_(model, s, pattern, score, stats, perm, scores)
        out[s.name] = perm
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def is_deployed(model) -> bool:
    return any(isinstance(m, (PermutedLinear, GatheredOutput)) for m in model.modules())


# -- the full round trip on every tiny family ---------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prune_deploy_export_load(tiny, family, tmp_path):
    t = tiny(family)
    sites = sites_of(t)
    dense = t.output()
    perms = prune(t.model, sites, t.batches(3))
    assert sum(not p.is_identity() for p in perms.values()) >= len(sites) // 2
    pruned = t.output()
    assert max_diff(pruned, dense) > 1e-3  # pruning did something

    # Export (original coordinates) → stock loader → same outputs.
    out_dir = psio.export(
        t.model, tmp_path / "export", sites, perms, pattern=PATTERN, score="wanda", groups=GROUPS,
        metrics={"note": "test", "retained": torch.tensor(0.5)},
    )
    assert out_dir == (tmp_path / "export").absolute()
    stock_cls = getattr(transformers, STOCK_AUTO[family])
    stock = stock_cls.from_pretrained(out_dir).eval()
    assert type(stock) is type(t.model)
    assert max_diff(t.output(stock), pruned) <= 1e-5

    # Deploy in place → hardware-aligned N:M in the stored layout, same outputs.
    deploy(t.model, sites, perms)
    assert is_deployed(t.model)
    violations = deployed_violations(t.model, sites, PATTERN)
    assert len(violations) == sum(len(s.consumers) for s in sites)
    assert not any(violations.values()), {k: v for k, v in violations.items() if v}
    assert max_diff(t.output(), pruned) <= ATOL

    # permsparse.load: deployed and plain.
    loaded = psio.load(out_dir)
    assert not loaded.training and is_deployed(loaded)
    assert max_diff(t.output(loaded), pruned) <= ATOL
    assert not any(deployed_violations(loaded, sites, PATTERN).values())
    plain = psio.load(out_dir, deploy=False)
    assert not is_deployed(plain)
    assert max_diff(t.output(plain), pruned) <= 1e-5

    # The plan reads back as written.
    meta, sites2, perms2 = pplan.read_plan(out_dir)
    assert sites2 == sites
    assert all(perms2[s.name] == perms[s.name] for s in sites)
    assert (meta["pattern"], meta["score"], meta["groups"]) == ("2:4", "wanda", GROUPS)
    assert meta["format_version"] == pplan.FORMAT_VERSION
    assert set(meta["versions"]) == {"permsparse", "torch", "transformers"}
    assert meta["metrics"] == {"note": "test", "retained": 0.5}
    assert meta["created"]


@pytest.mark.parametrize("kw", [dict(sync=False), dict(attn_out="gather")], ids=["unsync", "attn_gather"])
def test_prune_deploy_load_other_site_modes(tiny, kw, tmp_path):
    t = tiny("llama")
    sites = find_sites(t.model, **kw)
    perms = prune(t.model, sites, t.batches(2))
    pruned = t.output()
    out_dir = psio.export(t.model, tmp_path / "e", sites, perms, pattern="2:4", score="wanda", groups=GROUPS)
    deploy(t.model, sites, perms)
    assert not any(deployed_violations(t.model, sites, PATTERN).values())
    assert max_diff(t.output(), pruned) <= ATOL
    assert max_diff(t.output(psio.load(out_dir)), pruned) <= ATOL


def test_export_json_layout(tiny, tmp_path):
    t = tiny("llama")
    sites = find_sites(t.model)
    perms = prune(t.model, sites[:2], None, score="magnitude")  # only two sites pruned and planned
    out = psio.export(t.model, tmp_path / "e", sites[:2], perms, pattern="2:4", score="magnitude", groups=GROUPS)
    data = json.loads((out / "permsparse.json").read_text())
    assert list(data)[:4] == ["format_version", "pattern", "score", "groups"]
    entry = data["sites"][1]
    assert entry["name"] == "model.layers.0.attn_out" and entry["kv_of_head"] == [0, 0, 1, 1]
    assert sorted(entry["permutation"]) == list(range(64)) and entry["permutation_groups"] == 4
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "permsparse.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary leftovers


# -- the real embedded models -----------------------------------------------------------------


def test_smollm2_round_trip(smollm2, tmp_path):
    """SmolLM2-135M (LLaMA, GQA 9:3, tied embeddings): prune the first and last blocks
    (Wanda 2:4; heuristic permutation for the head-tied o_proj site, random ones elsewhere
    to keep the test fast), deploy, export, stock-load and permsparse.load."""
    model0, tok = smollm2
    model = copy.deepcopy(model0)
    ids = tok("Permutations move weights between N:M blocks without changing the function.",
              return_tensors="pt").input_ids
    all_sites = find_sites(model)
    last = f"model.layers.{model.config.num_hidden_layers - 1}"
    sites = [s for s in all_sites if s.block in ("model.layers.0", last)]
    assert len(sites) == 8
    gen = torch.Generator().manual_seed(0)
    perms = {s.name: s.random_permutation(GROUPS, gen) for s in sites}
    stats = collect_stats(model, [ids], [c for s in sites for c in s.consumers], progress=False)
    o_site = sites[1]
    assert o_site.kv_of_head == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    perms[o_site.name] = heuristic_permutation(o_site, site_scores(model, o_site, "wanda", stats), PATTERN, GROUPS)
    for s in sites:
        prune_site_(model, s, PATTERN, "wanda", stats, perms[s.name])
    with torch.no_grad():
        pruned = model(input_ids=ids).logits

    out = psio.export(model, tmp_path / "smollm2", sites, perms, pattern="2:4", score="wanda",
                      groups=GROUPS, tokenizer=tok)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    with torch.no_grad():
        stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert max_diff(stock(input_ids=ids).logits, pruned) <= 1e-5
        del stock
        loaded = psio.load(out)
        assert not any(deployed_violations(loaded, sites, PATTERN).values())
        assert max_diff(loaded(input_ids=ids).logits, pruned) <= ATOL
    # The input head stays tied to the embeddings in the deployed model.
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_minilm_round_trip(minilm, tmp_path):
    """all-MiniLM-L6-v2 (BERT, 6 layers): every site pruned (magnitude 2:4; heuristic π for
    the first layer's sites, random ones elsewhere to keep the test fast)."""
    model0, tok = minilm
    model = copy.deepcopy(model0)
    batch = tok(["a sentence to embed", "another, slightly longer sentence to embed"],
                padding=True, return_tensors="pt")
    sites = find_sites(model)
    assert len(sites) == 4 * 6
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
    gen = torch.Generator().manual_seed(0)
    perms = {s.name: s.random_permutation(GROUPS, gen) for s in sites}
    for s in sites[:4]:
        perms[s.name] = heuristic_permutation(s, site_scores(model, s, "magnitude", None), PATTERN, GROUPS)
    prune(model, sites, None, score="magnitude", perms=perms)
    with torch.no_grad():
        pruned = model(**batch).last_hidden_state
    assert max_diff(pruned, dense) > 1e-3
    out = psio.export(model, tmp_path / "minilm", sites, perms, pattern="2:4", score="magnitude",
                      groups=GROUPS, tokenizer=tok)
    with torch.no_grad():
        stock = transformers.AutoModel.from_pretrained(out).eval()
        assert max_diff(stock(**batch).last_hidden_state, pruned) <= 1e-5
        loaded = psio.load(out)
        assert max_diff(loaded(**batch).last_hidden_state, pruned) <= ATOL
    assert not any(deployed_violations(loaded, sites, PATTERN).values())
    deploy(model, sites, perms)
    with torch.no_grad():
        assert max_diff(model(**batch).last_hidden_state, pruned) <= ATOL


# -- calibration statistics ---------------------------------------------------------------------


def direct_stats(model, layers, batches, hessian=False):
    """Σ_t x² (and Xᵀ X) of every layer's input, by hand."""
    got = {n: {"sq": 0.0, "xxt": 0.0, "n": 0} for n in layers}
    handles = []
    for n in layers:
        def hook(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            got[n]["sq"] = got[n]["sq"] + (x * x).sum(0)
            got[n]["xxt"] = got[n]["xxt"] + x.T @ x
            got[n]["n"] += x.shape[0]
        handles.append(get_module(model, n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return got


def test_one_shot_stats_equal_direct(tiny):
    t = tiny("llama")
    layers = [c for s in find_sites(t.model) for c in s.consumers]
    batches = t.batches(3)
    stats = collect_stats(t.model, batches, layers, hessian=True, progress=False)
    ref = direct_stats(t.model, layers, batches)
    for n in layers:
        assert stats[n].n_tokens == ref[n]["n"] == 3 * 2 * 12
        torch.testing.assert_close(stats[n].sq_sum, ref[n]["sq"], rtol=1e-10, atol=0)
        # Each batch's X^T X is taken in float32 and summed in float64.
        torch.testing.assert_close(stats[n].xxt, ref[n]["xxt"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[n].H, (2 / ref[n]["n"] * ref[n]["xxt"]).float())
    # q, k and v read one tensor: its terms are computed once, into accumulators of their own.
    q, k = stats["model.layers.0.self_attn.q_proj"], stats["model.layers.0.self_attn.k_proj"]
    assert torch.equal(q.sq_sum, k.sq_sum) and torch.equal(q.xxt, k.xxt) and q.xxt is not k.xxt


def test_sequential_stats_follow_pruned_blocks(tiny):
    t = tiny("llama")
    model = t.model
    sites = find_sites(model)
    blocks = [(f"model.layers.{i}", model.model.layers[i]) for i in range(model.config.num_hidden_layers)]
    layers_of = {b: [c for s in sites if s.block == b for c in s.consumers] for b, _ in blocks}
    batches = t.batches(2)
    dense = copy.deepcopy(model)
    one_shot = collect_stats(dense, batches, [c for s in sites for c in s.consumers], progress=False)

    seen, pruned_state = {}, {}

    def on_block(name, block, stats, inputs):
        seen[name] = {k: copy.deepcopy(v) for k, v in stats.items()}
        assert len(inputs) == len(batches)
        for s in sites:
            if s.block == name:
                prune_site_(model, s, PATTERN, "wanda", stats)
        pruned_state[name] = copy.deepcopy(block.state_dict())

    run_blocks(model, blocks, batches, lambda b: layers_of[b], on_block, progress=False)

    # First block: its inputs are the dense model's, so one-shot and sequential agree.
    for n in layers_of["model.layers.0"]:
        torch.testing.assert_close(seen["model.layers.0"][n].sq_sum, one_shot[n].sq_sum, rtol=1e-6, atol=1e-9)
    # Later block: statistics equal a direct computation through the pruned first block.
    ref_model = copy.deepcopy(dense)
    ref_model.model.layers[0].load_state_dict(pruned_state["model.layers.0"])
    ref = direct_stats(ref_model, layers_of["model.layers.1"], batches)
    for n in layers_of["model.layers.1"]:
        st = seen["model.layers.1"][n]
        assert st.n_tokens == ref[n]["n"]
        torch.testing.assert_close(st.sq_sum, ref[n]["sq"], rtol=1e-5, atol=1e-7)
        # ... and differ from the dense one-shot statistics (pruning block 0 mattered).
        assert not torch.allclose(st.sq_sum, one_shot[n].sq_sum, rtol=1e-3)
    # run_blocks left every block pruned to 2:4 (identity permutation).
    for s in sites:
        for c in s.consumers:
            assert count_violations(get_module(model, c).weight, PATTERN) == 0


# -- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    """A pruned tiny LLaMA export (module scoped); tests copy it before tampering."""
    from conftest import make_tiny

    t = make_tiny("llama")
    sites = find_sites(t.model)
    perms = prune(t.model, sites, t.batches(2))
    out = psio.export(t.model, tmp_path_factory.mktemp("exp") / "llama", sites, perms,
                      pattern="2:4", score="wanda", groups=GROUPS)
    return out, t


@pytest.fixture
def export_copy(llama_export, tmp_path):
    src, _ = llama_export
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def edit_plan(path: Path, fn) -> None:
    data = json.loads((path / "permsparse.json").read_text())
    fn(data)
    (path / "permsparse.json").write_text(json.dumps(data))


def site_entry(data, name):
    return next(s for s in data["sites"] if s["name"] == name)


def test_plan_wrong_length(export_copy):
    edit_plan(export_copy, lambda d: site_entry(d, "model.layers.1.mlp_in")["permutation"].pop())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp_in.*length 63"):
        pplan.read_plan(export_copy)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp_in"):
        psio.load(export_copy)


def test_plan_not_a_permutation(export_copy):
    def dup(d):
        p = site_entry(d, "model.layers.0.mlp_out")["permutation"]
        p[1] = p[0]
    edit_plan(export_copy, dup)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp_out.*not a permutation"):
        psio.load(export_copy)


def test_plan_crosses_groups(export_copy):
    def cross(d):
        p = site_entry(d, "model.layers.0.mlp_in")["permutation"]
        p[0], p[-1] = p[-1], p[0]  # swap channels of the first and last of 4 groups
    edit_plan(export_copy, cross)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp_in.*across"):
        psio.load(export_copy)


def test_plan_breaks_head_ties(export_copy):
    def untie(d):
        p = site_entry(d, "model.layers.0.attn_out")["permutation"]
        head1 = p[16:32]
        p[16:32] = head1[::-1]  # head 1 no longer matches head 0 of its KV group
    edit_plan(export_copy, untie)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attn_out.*differs between query heads"):
        psio.load(export_copy)


def test_plan_unknown_layer(export_copy):
    edit_plan(export_copy, lambda d: site_entry(d, "model.layers.1.attn_out")["consumers"].__setitem__(
        0, "model.layers.1.self_attn.out_proj"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.out_proj does not exist"):
        psio.load(export_copy)


def test_kept_outputs_are_the_dense_blocks_and_the_next_block_sees_the_pruned_one(tiny):
    """``keep_outputs``: the statistics pass hands each block's dense outputs to ``on_block``
    (the block-wise trainer's targets, not computed again), and the walk still feeds the next
    block what the block gives once ``on_block`` has pruned it."""
    from permsparse.models.calibrate import block_output, hidden_of

    t = tiny("llama")
    model = t.model
    sites = find_sites(model)
    blocks = [(f"model.layers.{i}", model.model.layers[i]) for i in range(model.config.num_hidden_layers)]
    layers_of = {b: [c for s in sites if s.block == b for c in s.consumers] for b, _ in blocks}
    dense, pruned = {}, {}

    def on_block(name, block, stats, inputs):
        with torch.no_grad():
            dense[name] = [block_output(block(*a, **k)) for a, k in zip(inputs.args, inputs.kwargs)]
            assert all(torch.equal(o, d) for o, d in zip(inputs.outputs, dense[name], strict=True))
            for s in sites:
                if s.block == name:
                    prune_site_(model, s, PATTERN, "wanda", stats)
            pruned[name] = [block_output(block(*a, **k)) for a, k in zip(inputs.args, inputs.kwargs)]
        if name == "model.layers.1":
            fed = [hidden_of(a, k) for a, k in zip(inputs.args, inputs.kwargs)]
            assert all(torch.equal(f, o) for f, o in zip(fed, pruned["model.layers.0"]))
            assert not all(torch.equal(f, d) for f, d in zip(fed, dense["model.layers.0"]))

    run_blocks(model, blocks, t.batches(2), lambda b: layers_of[b], on_block, progress=False, keep_outputs=True)
    assert set(dense) == {b for b, _ in blocks}


def test_plan_unknown_site_block(export_copy):
    def move(d):
        e = site_entry(d, "model.layers.1.mlp_out")
        e["name"] = "model.layers.7.mlp_out"
        e["consumers"] = ["model.layers.7.mlp.down_proj"]
    edit_plan(export_copy, move)
    with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.down_proj does not exist"):
        psio.load(export_copy)


def test_plan_wrong_width(export_copy):
    def widen(d):
        e = site_entry(d, "model.layers.0.mlp_out")
        e["d_in"] = 64
        e["permutation"] = list(range(64))
    edit_plan(export_copy, widen)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj reads 128 input channels"):
        psio.load(export_copy)


@pytest.mark.parametrize("deploy_", [True, False])
def test_weight_edited_violates_nm(export_copy, deploy_):
    from safetensors.torch import load_file, save_file

    f = export_copy / "model.safetensors"
    tensors = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    w = tensors[name]
    zeros = (w == 0).nonzero()
    for r, c in zeros[:3].tolist():  # revive three pruned weights
        w[r, c] = 1.0
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.* [1-3] (violating )?blocks"):
        psio.load(export_copy, deploy=deploy_)


def test_plan_json_errors(export_copy):
    plan = export_copy / "permsparse.json"
    text = plan.read_text()
    plan.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        pplan.read_plan(export_copy)
    data = json.loads(text)
    plan.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ValueError, match="unsupported format_version 99"):
        psio.load(export_copy)
    plan.write_text(json.dumps({k: v for k, v in data.items() if k != "groups"}))
    with pytest.raises(ValueError, match="missing keys groups"):
        pplan.read_plan(export_copy)
    plan.write_text(json.dumps({**data, "pattern": "4:2"}))
    with pytest.raises(ValueError, match="bad pattern"):
        pplan.read_plan(export_copy)
    del data["sites"][0]["permutation"]
    plan.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attn_in is missing keys permutation"):
        pplan.read_plan(export_copy)
    plan.unlink()
    with pytest.raises(FileNotFoundError, match="permsparse.json is missing"):
        psio.load(export_copy)


class _Evil:
    """Unpickling this creates a marker file: proof that nothing was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_dir_is_refused(export_copy, tmp_path, monkeypatch):
    marker = tmp_path / "UNPICKLED"
    (export_copy / "model.safetensors").unlink()
    with open(export_copy / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Evil(str(marker)), fh)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match=r"refusing to unpickle pytorch_model\.bin"):
        psio.load(export_copy)
    assert not marker.exists() and not loads


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        psio.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        psio.load(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        psio.load(tmp_path / "file.txt")


def test_export_refuses_existing_and_overwrites_atomically(llama_export, tmp_path):
    src, t = llama_export
    _, sites, perms = pplan.read_plan(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    target = tmp_path / "out"
    psio.export(model, target, sites, perms, pattern="2:4", score="wanda", groups=GROUPS)
    with pytest.raises(FileExistsError, match=str(target)):
        psio.export(model, target, sites, perms, pattern="2:4", score="wanda", groups=GROUPS)
    log = tmp_path.parent / "steps.jsonl"
    log.write_text('{"step": 1}\n')
    psio.export(model, target, sites, perms, pattern="2:4", score="magnitude", groups=GROUPS,
                metrics={"v": 2}, overwrite=True, config={"lr": 0.1}, extra_files={"logs/steps.jsonl": log})
    meta, _, _ = pplan.read_plan(target)
    assert meta["score"] == "magnitude" and meta["metrics"] == {"v": 2} and meta["config"] == {"lr": 0.1}
    assert (target / "logs" / "steps.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(ValueError, match="relative path"):
        psio.export(model, target, sites, perms, pattern="2:4", score="wanda", groups=GROUPS, overwrite=True,
                    extra_files={"../x": log})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # old copy and temp dir are gone
    assert max_diff(t.output(psio.load(target)), t.output(model)) <= ATOL


def test_export_crash_leaves_nothing(llama_export, tmp_path, monkeypatch):
    src, t = llama_export
    _, sites, perms = pplan.read_plan(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    real_save = type(model).save_pretrained

    def crashing_save(self, path, *a, **k):
        real_save(self, path, *a, **k)  # weights and config are written...
        raise RuntimeError("disk full")  # ...then the process "crashes" midway

    monkeypatch.setattr(type(model), "save_pretrained", crashing_save)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        psio.export(model, target, sites, perms, pattern="2:4", score="wanda", groups=GROUPS)
    assert list(tmp_path.iterdir()) == []

    # A crash while overwriting keeps the previous complete export untouched.
    shutil.copytree(src, target)
    before = (target / "permsparse.json").read_text()
    with pytest.raises(RuntimeError, match="disk full"):
        psio.export(model, target, sites, perms, pattern="2:4", score="magnitude", groups=GROUPS, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "permsparse.json").read_text() == before


def test_export_refuses_deployed_and_bad_plans(tiny, tmp_path):
    t = tiny("llama")
    sites = find_sites(t.model)
    perms = prune(t.model, sites, None, score="magnitude")
    with pytest.raises(ValueError, match=r"site model\.layers\.0\.attn_in .*not divisible by M=4"):
        psio.export(t.model, tmp_path / "a", sites, perms, pattern="2:4", score="magnitude", groups=32)
    with pytest.raises(ValueError, match="unknown sites: nope"):
        psio.export(t.model, tmp_path / "a", sites, {**perms, "nope": perms[sites[0].name]},
                    pattern="2:4", score="magnitude", groups=GROUPS)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp_out.*permutation has 64 channels"):
        psio.export(t.model, tmp_path / "a", sites, {**perms, sites[3].name: perms[sites[0].name]},
                    pattern="2:4", score="magnitude", groups=GROUPS)
    dense = tiny("llama").model  # weights that are not 2:4 under the plan
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has \d+ blocks violating 2:4"):
        psio.export(dense, tmp_path / "a", sites, perms, pattern="2:4", score="magnitude", groups=GROUPS)
    deploy(t.model, sites, perms)
    with pytest.raises(ValueError, match="refusing to export a deployed model"):
        psio.export(t.model, tmp_path / "a", sites, perms, pattern="2:4", score="magnitude", groups=GROUPS)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_helpers(tmp_path):
    p = atomic.atomic_write_json(tmp_path / "sub" / "x.json", {"a": torch.tensor([1, 2]), "b": Path("/p")})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": "/p"}
    atomic.atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]


def test_atomic_dir_keeps_an_existing_folder_unless_told(tmp_path):
    target = tmp_path / "d"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(FileExistsError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("third")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "first"
    with atomic.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("fourth")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


# -- the Hugging Face habits: save_pretrained / from_pretrained --------------------------------------


def test_save_pretrained_from_pretrained_round_trip(tiny, tmp_path):
    import permsparse

    t = tiny("llama")
    cfg = permsparse.PruneConfig(pattern="2:4", permutation="heuristic", groups=GROUPS, progress=False)
    result = permsparse.prune(t.model, None, cfg, calib=t.batches(2))
    assert result.config.pattern == "2:4" and result.groups == GROUPS
    assert sum(not p.is_identity() for p in result.perms.values()) > 0
    pruned = t.output()
    out = result.save_pretrained(tmp_path / "out", t.model)
    meta, sites, perms = pplan.read_plan(out)
    assert meta["config"] == cfg.to_json() and meta["metrics"]["kept_plan"] == "heuristic"
    assert permsparse.PruneConfig.from_json(meta["config"]) == cfg
    assert all(perms[s.name] == result.perms[s.name] for s in sites)

    plain = permsparse.from_pretrained(out)  # original coordinates, the checkpoint's dtype
    assert not is_deployed(plain) and next(plain.parameters()).dtype == torch.float32
    assert torch.equal(t.output(plain), pruned)
    fast = permsparse.from_pretrained(out, deploy=True, device="cpu")
    assert is_deployed(fast)
    assert max_diff(t.output(fast), pruned) <= ATOL

    # dtype "auto" is the checkpoint's, as in transformers; a dtype can still be forced.
    t.model.to(torch.bfloat16)
    half = result.save_pretrained(tmp_path / "bf16", t.model)
    loaded = permsparse.from_pretrained(half)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    stock = transformers.AutoModelForCausalLM.from_pretrained(half, dtype="auto").eval()
    assert torch.equal(t.output(loaded), t.output(stock))
    assert next(permsparse.from_pretrained(half, dtype=torch.float32).parameters()).dtype == torch.float32
    with pytest.raises(FileExistsError):
        result.save_pretrained(half, t.model)


def test_save_pretrained_needs_the_config(tiny, tmp_path):
    from permsparse.api import PruneResult

    t = tiny("llama")
    with pytest.raises(ValueError, match="no config"):
        PruneResult(find_sites(t.model), {}, []).save_pretrained(tmp_path / "x", t.model)


# -- CUDA: 2:4 semi-structured kernels --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_matches_masked_dense(tiny):
    # Widths at which the CUTLASS/cuSPARSELt 2:4 kernels accept fp16 weights (≥ 64x64).
    t = tiny("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    sites = find_sites(t.model)
    perms = prune(t.model, sites, t.batches(2))
    dense = t.model.half().cuda()
    inputs = {k: v.cuda() for k, v in t.inputs.items()}
    ref = t.output(dense, inputs)
    sparse = copy.deepcopy(dense)
    deploy(sparse, sites, perms)
    assert max_diff(t.output(sparse, inputs), ref) <= 1e-2
    assert to_semi_structured(sparse, sites) == sum(len(s.consumers) for s in sites)
    out = t.output(sparse, inputs)
    assert torch.isfinite(out).all()
    assert max_diff(out, ref) <= 5e-2 * max(1.0, ref.abs().max().item())

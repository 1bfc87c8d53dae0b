"""Permutation sites: what find_sites returns per family, and that deploying any
permutation that respects the sites leaves every model's function unchanged."""

from __future__ import annotations

import logging

import pytest
import torch

from permsparse.models.apply import heuristic_permutation, site_scores
from permsparse.models.deploy import GatheredOutput, PermutedLinear, deploy
from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.families import REGISTRY
from permsparse.models.sites import Site, find_sites, get_module, trace_sites

from conftest import REGISTERED_FAMILIES, TINY_FAMILIES

ATOL = 1e-4
MODES = {
    "sync": dict(),
    "unsync": dict(sync=False),
    "attn_gather": dict(attn_out="gather"),
}


def sites_of(t, **kw) -> list[Site]:
    if t.family not in REGISTERED_FAMILIES:
        kw["example_inputs"] = t.inputs
    return find_sites(t.model, **kw)


# -- deploy with random permutations: same function ----------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_random_permutations_deploy_keeps_function(tiny, family, mode):
    t = tiny(family)
    ref = t.output()
    sites = sites_of(t, **MODES[mode])
    gen = torch.Generator().manual_seed(1)
    perms = {s.name: s.random_permutation(4, gen) for s in sites}
    assert all(not p.is_identity() for p in perms.values())
    deploy(t.model, sites, perms)
    # Every consumer now stores W[:, π] and every permutation is paid somewhere.
    for s in sites:
        for c in s.consumers:
            assert isinstance(get_module(t.model, c), PermutedLinear), c
        if s.payment == "gather_norm":
            assert isinstance(get_module(t.model, s.norm), GatheredOutput)
    out = t.output()
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unpaid_permutation_changes_function(tiny, family):
    """Negative control: permuting consumer weights without paying must change the outputs,
    so the equality above is not an artefact of tiny activations."""
    t = tiny(family)
    ref = t.output()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in sites_of(t):
            perm = s.random_permutation(4, gen)
            for c in s.consumers:
                w = get_module(t.model, c).weight
                w.copy_(perm.apply_to_columns(w))
    assert (t.output() - ref).abs().max().item() > 1e-2


def test_identity_permutations_change_nothing(tiny_llama):
    t = tiny_llama
    sites = sites_of(t)
    deploy(t.model, sites, {s.name: Permutation.identity(s.d_in) for s in sites})
    assert not any(isinstance(m, (PermutedLinear, GatheredOutput)) for m in t.model.modules())


# -- which sites each family has ------------------------------------------------------------


def test_llama_sites_gqa(tiny_llama):
    model = tiny_llama.model
    sites = find_sites(model)
    n_layers = model.config.num_hidden_layers
    assert len(sites) == 4 * n_layers
    for i in range(n_layers):
        b = f"model.layers.{i}"
        by = {s.name: s for s in sites if s.block == b}
        assert list(by) == [f"{b}.attn_in", f"{b}.attn_out", f"{b}.mlp_in", f"{b}.mlp_out"]
        attn_in, attn_out, mlp_in, mlp_out = by.values()
        assert attn_in.consumers == tuple(f"{b}.self_attn.{p}_proj" for p in "qkv")
        assert (attn_in.payment, attn_in.norm, attn_in.d_in) == ("gather_norm", f"{b}.input_layernorm", 64)
        assert attn_out.consumers == (f"{b}.self_attn.o_proj",)
        assert attn_out.payment == "fold" and attn_out.head_tied
        assert [p.module for p in attn_out.producers] == [f"{b}.self_attn.v_proj"]
        assert attn_out.head_dim == 16
        assert attn_out.kv_of_head == (0, 0, 1, 1)  # 4 query heads, 2 KV heads
        assert attn_out.n_free == 2
        assert mlp_in.consumers == (f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj")
        assert (mlp_in.payment, mlp_in.norm) == ("gather_norm", f"{b}.post_attention_layernorm")
        assert mlp_out.consumers == (f"{b}.mlp.down_proj",) and mlp_out.d_in == 128
        assert mlp_out.payment == "fold"
        assert [p.module for p in mlp_out.producers] == [f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj"]
    # Output heads stay dense.
    assert not any("lm_head" in c for s in sites for c in s.consumers)


def test_head_tied_permutation_structure(tiny_llama):
    site = next(s for s in find_sites(tiny_llama.model) if s.name.endswith("attn_out"))
    assert site.structure(groups=1) == (4, 16)  # one group per head, whatever groups says
    perm = site.random_permutation(4, torch.Generator().manual_seed(0))
    local = perm.local
    assert torch.equal(local[0], local[1]) and torch.equal(local[2], local[3])
    free = site.untie(perm, 4)
    assert free.d_in == 32 and free.groups == 2  # one permutation per KV head: v_proj's rows
    assert site.expand(free, 4) == perm
    broken = local.clone()
    broken[1] = broken[1].flip(0)
    with pytest.raises(ValueError, match="attn_out.*differs between query heads"):
        site.untie(Permutation.from_local(broken), 4)


def test_llama_mha_untied_heads(tiny_llama_mha):
    site = next(s for s in find_sites(tiny_llama_mha.model) if s.name.endswith("attn_out"))
    assert site.kv_of_head == (0, 1, 2, 3)
    assert site.n_free == 4


def test_qwen2_5_vl_vision_and_text_sites(tiny_qwen2_5_vl):
    sites = find_sites(tiny_qwen2_5_vl.model)
    vision = [s for s in sites if ".visual." in s.name]
    text = [s for s in sites if ".language_model." in s.name]
    assert len(vision) == 4 * 2 and len(text) == 4 * 2 and len(sites) == 16
    out = next(s for s in vision if s.name.endswith("blocks.0.attn_out"))
    assert out.consumers == ("model.visual.blocks.0.attn.proj",)
    (prod,) = out.producers
    assert prod.module == "model.visual.blocks.0.attn.qkv" and prod.row_offset == 2 * 32  # v third of fused qkv
    assert out.head_dim == 8 and out.kv_of_head == (0, 1, 2, 3)
    attn_in = next(s for s in vision if s.name.endswith("blocks.0.attn_in"))
    assert attn_in.consumers == ("model.visual.blocks.0.attn.qkv",) and attn_in.norm.endswith("blocks.0.norm1")
    t_out = next(s for s in text if s.name.endswith("layers.0.attn_out"))
    assert t_out.kv_of_head == (0, 0, 1, 1)


def test_encoder_sites(tiny_vit, tiny_bert):
    vit = {s.name.rsplit(".", 1)[-1]: s for s in find_sites(tiny_vit.model) if ".0." in s.name}
    assert vit["attn_in"].payment == "gather_norm" and vit["attn_in"].norm.endswith("layernorm_before")
    assert vit["mlp_in"].consumers == ("vit.layers.0.mlp.fc1",)
    assert vit["attn_out"].producers[0].module == "vit.layers.0.attention.v_proj"
    bert = {s.name.rsplit(".", 1)[-1]: s for s in find_sites(tiny_bert.model) if ".0." in s.name}
    # Post-LN BERT: the block input is the residual stream, so readers gather themselves.
    assert bert["attn_in"].payment == "gather" and bert["mlp_in"].payment == "gather"
    assert bert["attn_out"].producers[0].module == "encoder.layer.0.attention.self.value"
    assert bert["mlp_out"].producers[0].module == "encoder.layer.0.intermediate.dense"


def test_sync_false_and_attn_gather(tiny_llama):
    model = tiny_llama.model
    unsync = find_sites(model, sync=False)
    b = "model.layers.0"
    names = [s.name for s in unsync if s.block == b]
    assert names == [
        f"{b}.attn_in.q_proj", f"{b}.attn_in.k_proj", f"{b}.attn_in.v_proj", f"{b}.attn_out",
        f"{b}.mlp_in.gate_proj", f"{b}.mlp_in.up_proj", f"{b}.mlp_out",
    ]
    assert all(s.payment == "gather" and len(s.consumers) == 1 for s in unsync if ".attn_in." in s.name)
    gathered = find_sites(model, attn_out="gather")
    out = next(s for s in gathered if s.name == f"{b}.attn_out")
    assert out.payment == "gather" and not out.head_tied and not out.producers
    assert out.structure(4) == (4, 16)
    with pytest.raises(ValueError, match="attn_out"):
        find_sites(model, attn_out="nope")


def test_site_json_round_trip(tiny_qwen2_5_vl):
    for s in find_sites(tiny_qwen2_5_vl.model):
        assert Site.from_json(s.to_json()) == s


# -- the generic fallback ---------------------------------------------------------------------


def test_generic_fallback_groups_shared_inputs(tiny_opt):
    t = tiny_opt
    assert t.model.config.model_type not in REGISTRY
    with pytest.raises(ValueError, match="example_inputs"):
        find_sites(t.model)
    sites = find_sites(t.model, example_inputs=t.inputs)
    assert sites == trace_sites(t.model, t.inputs)
    b = "model.decoder.layers.0"
    by = {s.name: s for s in sites if s.block == b}
    assert by[f"{b}.self_attn.q_proj.site"].consumers == tuple(f"{b}.self_attn.{p}_proj" for p in "qkv")
    assert by[f"{b}.self_attn.out_proj.site"].consumers == (f"{b}.self_attn.out_proj",)
    assert by[f"{b}.fc1.site"].consumers == (f"{b}.fc1",)
    assert by[f"{b}.fc2.site"].consumers == (f"{b}.fc2",) and by[f"{b}.fc2.site"].d_in == 128
    assert len(sites) == 4 * 2
    assert all(s.payment == "gather" for s in sites)
    # Every site knows its block (the ModuleList entry), also layers directly under it.
    assert [s.block for s in sites] == [f"model.decoder.layers.{i}" for i in (0, 1) for _ in range(4)]
    assert not any("lm_head" in c for s in sites for c in s.consumers)


def test_generic_fallback_reports_what_it_cannot_handle(caplog):
    """GPT-2's projections are transformers ``Conv1D`` (weight stored ``(d_in, d_out)``):
    the fallback skips them and says so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    with caplog.at_level(logging.WARNING, logger="permsparse.models.sites"):
        sites = find_sites(model, example_inputs={"input_ids": torch.randint(0, 64, (1, 8))})
    assert sites == []
    assert "h.0.attn.c_attn (transformers Conv1D" in caplog.text


# -- pattern / groups that do not fit ----------------------------------------------------------


def test_groups_not_fitting_pattern_name_the_site(tiny_llama):
    model = tiny_llama.model
    site = next(s for s in find_sites(model) if s.name == "model.layers.0.mlp_in")
    with pytest.raises(ValueError, match="model.layers.0.mlp_in.*not divisible by groups"):
        site.structure(3)
    # groups=32 → k = 2 channels, not a multiple of M=4.
    with pytest.raises(ValueError, match=r"site model\.layers\.0\.mlp_in .*not divisible by M=4"):
        site.structure(32, "2:4")
    scores = site_scores(model, site, "magnitude", None)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp_in"):
        heuristic_permutation(site, scores, NMPattern.parse("2:4"), 32)
    # Head-tied: head_dim 16 holds whole 8-blocks but not 32-blocks.
    attn_out = next(s for s in find_sites(model) if s.name == "model.layers.0.attn_out")
    attn_out.structure(1, "4:8")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attn_out.*M=32"):
        attn_out.structure(1, "2:32")

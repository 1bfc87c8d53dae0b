"""The float copy of a small GGUF model (permsparse.models.gguf_cache): the embedded SmolLM2 read
from its copy is the model read from the GGUF, and a copy that is off, too large, stale or broken
is never used."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from permsparse.models import gguf_cache
from permsparse.models.loading import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERMSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PERMSPARSE_GGUF_CACHE", raising=False)
    return tmp_path / "cache"


def test_smollm2_from_its_float_copy_is_the_model_from_the_gguf(cache, caplog):
    """The second load reads the copy the first kept (about 1 s against 25 s here) and gives the
    same weights (tied head included), config, tokenizer and logits."""
    from permsparse.data.assets import embedded_gguf_path

    pytest.importorskip("gguf")
    gguf = embedded_gguf_path()
    caplog.set_level(logging.INFO, logger="permsparse")
    first, tok1 = load_model("smollm2-135m")
    folder = gguf_cache.cached_copy(gguf, "AutoModelForCausalLM")
    assert folder is not None and folder.parent.parent == cache
    assert "kept a float copy" in caplog.text
    second, tok2 = load_model("smollm2-135m")
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [folder.name]  # read, not written again
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()
    assert first.config.to_dict() == second.config.to_dict()  # _name_or_path: the GGUF's folder
    text = "Ünïcode — and code: def f(x): return x ** 2\n\n<|im_start|>user"
    assert tok1(text).input_ids == tok2(text).input_ids
    assert (tok1.bos_token, tok1.eos_token, tok1.chat_template) == (tok2.bos_token, tok2.eos_token, tok2.chat_template)
    ids = torch.tensor([tok1(text).input_ids])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


@pytest.fixture
def tiny_source(tmp_path, tiny, minilm):
    """A tiny LLaMA with a real tokenizer, and a file standing in for the GGUF it came from."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    return tiny("llama").model, minilm[1], gguf


def _load(gguf):
    import transformers

    return gguf_cache.load_copy(gguf, transformers.AutoModelForCausalLM, transformers.AutoTokenizer,
                                {"dtype": torch.float32})


def test_a_kept_copy_loads_and_a_changed_gguf_misses_it(cache, tiny_source):
    model, tok, gguf = tiny_source
    assert _load(gguf) is None
    folder = gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM")
    assert folder is not None and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    loaded, _ = _load(gguf)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert loaded.config._name_or_path == str(gguf.parent)
    # Another process kept the same copy meanwhile: the folder stands as it is.
    assert gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM") == folder
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    assert _load(gguf) is None
    # The new copy replaces the stale one on disk.
    fresh = gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM")
    assert fresh != folder and sorted(folder.parent.iterdir()) == [fresh]


def test_a_broken_copy_is_removed_and_not_used(cache, tiny_source, caplog):
    model, tok, gguf = tiny_source
    folder = gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="permsparse"):
        assert _load(gguf) is None
    assert "did not load" in caplog.text and not folder.exists()


def test_no_copy_when_turned_off_too_large_or_not_float32(cache, tiny_source, monkeypatch):
    model, tok, gguf = tiny_source
    monkeypatch.setenv("PERMSPARSE_GGUF_CACHE", "0")
    assert gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM") is None
    monkeypatch.delenv("PERMSPARSE_GGUF_CACHE")
    with monkeypatch.context() as m:
        m.setattr(gguf_cache, "MAX_COPY_BYTES", 1000)
        assert gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM") is None
    assert gguf_cache.save_copy(model.to(torch.bfloat16), tok, gguf, "AutoModelForCausalLM") is None
    assert not cache.exists()


def test_an_unwritable_cache_costs_only_the_copy(tmp_path, monkeypatch, tiny_source, caplog):
    model, tok, gguf = tiny_source
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("PERMSPARSE_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="permsparse"):
        assert gguf_cache.save_copy(model, tok, gguf, "AutoModelForCausalLM") is None
    assert "could not keep a float copy" in caplog.text

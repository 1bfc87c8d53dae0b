"""``load_model(..., device=...)``: the weights are read in the requested dtype straight onto the
device (``device_map``), never as a float32 model on the host first."""

from __future__ import annotations

import pytest
import torch

from permsparse.data.assets import embedded_bert_path
from permsparse.models import loading
from permsparse.models.loading import load_model


def _spy(monkeypatch) -> dict:
    """Records the keyword arguments ``from_pretrained`` receives."""
    import transformers

    seen: dict = {}
    real = transformers.AutoModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", classmethod(spy))
    return seen


@pytest.fixture(scope="module")
def bf16_bert(tmp_path_factory):
    """The embedded MiniLM saved in bfloat16, as hub checkpoints of large models are."""
    import shutil

    folder = tmp_path_factory.mktemp("bert_bf16")
    model, tok = load_model(embedded_bert_path(), task="encoder")
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    for f in embedded_bert_path().iterdir():  # anything else the folder holds (vocab files)
        if f.is_file() and not (folder / f.name).exists():
            shutil.copy(f, folder / f.name)
    return folder


def test_device_load_reads_bf16_weights_straight_onto_the_device(monkeypatch, bf16_bert):
    seen = _spy(monkeypatch)
    model, tok = load_model(bf16_bert, task="encoder", device="cpu", dtype=torch.bfloat16)
    # Placed by from_pretrained as each tensor is read, in the dtype asked for.
    assert seen["device_map"] == {"": "cpu"} and seen["low_cpu_mem_usage"] is True
    assert seen[loading._dtype_kwarg()] == torch.bfloat16
    assert "device_map" not in tok.init_kwargs  # the tokenizer is not given the model's placement
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    # Without a device: the host default, float32, placed by torch as before.
    seen.clear()
    model, _ = load_model(bf16_bert, task="encoder")
    assert "device_map" not in seen and {p.dtype for p in model.parameters()} == {torch.float32}


def test_accelerator_defaults_to_bf16_and_the_host_to_float32():
    assert loading._placement(None, None, "folder", kw := {}) == (torch.float32, False) and kw == {}
    assert loading._placement(None, "cuda", "folder", kw := {}) == (torch.bfloat16, True)
    assert kw == {"device_map": {"": "cuda"}, "low_cpu_mem_usage": True}
    assert loading._placement(torch.float16, "cuda:1", "folder", kw := {})[0] == torch.float16
    assert kw["device_map"] == {"": "cuda:1"}
    # GGUF is dequantized on the host (in the dtype asked for) and moved after loading.
    assert loading._placement(None, "cuda", "gguf", kw := {}) == (torch.bfloat16, False) and kw == {}


def test_cli_passes_the_device_unless_streaming(monkeypatch, tmp_path):
    import permsparse.models.loading as ml

    got = {}

    def fake_load(name, task="causal-lm", dtype=None, device=None):
        got.update(device=device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ml, "load_model", fake_load)
    import permsparse.cli.prune as cli_prune

    # This machine may have no CUDA: the preflight would refuse --device cuda before the load this
    # test looks at (that refusal has its own test in tests/test_reliability.py).
    monkeypatch.setattr(cli_prune, "check_device", lambda config: None)
    from permsparse.cli import main

    for extra, want in ((["--device", "cuda"], "cuda"), (["--device", "cuda", "--offload", "--objective",
                                                          "blockwise"], None), ([], None)):
        got.clear()
        main(["prune", "smollm2-135m", "--out", str(tmp_path / "o"), *extra])
        assert got == {"device": want}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_is_bf16_on_the_gpu():
    model, _ = load_model(embedded_bert_path(), task="encoder", device="cuda")
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cuda")}

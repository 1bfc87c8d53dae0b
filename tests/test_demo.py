"""The embedded demo: its wiring on a tiny model (fast), and end to end on the embedded
SmolLM2 (slow: several minutes on 2 CPU cores; run with `make test-all`)."""

import math

import pytest
import torch

from permsparse import demo
from permsparse.data.text import TextWindows


class _Tokenizer:
    def save_pretrained(self, path) -> None:
        (path / "tokenizer.json").write_text("{}")


def test_demo_wiring_on_a_tiny_model(tiny, tmp_path, monkeypatch, one_thread):
    """Rows, the exported plan and the report, with the model and the text swapped for tiny ones."""
    from permsparse.io.export import read_plan

    model = tiny("llama").model
    ids = torch.randint(3, 128, (12, 16), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(demo, "load_model", lambda spec: (model, _Tokenizer()))
    monkeypatch.setattr(demo, "load_text_windows",
                        lambda *a, **k: TextWindows(calib=ids[:8], eval=ids[8:], source="tiny", n_tokens=ids.numel()))
    monkeypatch.setitem(demo.PRESETS, "tiny", {"n_calib": 8, "eval_tokens": 64,
                                               "learn": {"epochs": 1.0, "batch_size": 2}})
    rows = demo.run_demo("tiny", out=tmp_path / "demo", progress=False)
    assert [r["method"] for r in rows] == ["dense", "wanda", "wanda+heuristic", "wanda+learned"]
    assert all(math.isfinite(r["ppl"]) for r in rows)
    assert rows[1]["seconds"] == rows[2]["seconds"] < rows[3]["seconds"]  # one shared calibration, then learning
    meta, sites, perms = read_plan(tmp_path / "demo")
    assert len(sites) == 14 and set(perms) == {s.name for s in sites}  # one site per layer, 7 per block
    assert (tmp_path / "demo" / "report.md").is_file()
    with pytest.raises(FileExistsError):
        demo.run_demo("tiny", out=tmp_path / "demo", progress=False)


@pytest.mark.slow
def test_demo_quick_preset_learned_not_worse_than_heuristic(tmp_path):
    from permsparse.demo import run_demo
    from permsparse.io.plan import read_plan

    rows = run_demo("quick", out=tmp_path / "demo", progress=False)
    ppl = {r["method"]: r["ppl"] for r in rows}
    assert set(ppl) == {"dense", "wanda", "wanda+heuristic", "wanda+learned"}
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["dense"] < ppl["wanda+heuristic"] < ppl["wanda"]
    # The held-out guard keeps the learned plan only where it wins on batches the trainer never saw: on
    # 2 idle AVX2 cores (5 steps fit the 150 s) it keeps the heuristic's (docs/results.md, "A guard on
    # held-out batches"). What must not happen: a kept learned plan worse on held-out text.
    assert ppl["wanda+learned"] <= ppl["wanda+heuristic"]
    meta, sites, perms = read_plan(tmp_path / "demo")
    # One permutation per layer (the default since 0.2): q, k, v, o, gate, up, down in each of 30 blocks.
    assert len(sites) == 7 * 30 and (tmp_path / "demo" / "report.md").is_file()

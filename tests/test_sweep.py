"""The reduced sweep (two points per axis, a tiny model, real text as bytes) runs end to end."""

from __future__ import annotations

import json
import math

import pytest

from bench_module import load_bench


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _sweep_module():
    return load_bench("sweep")


def test_tiny_sweep_writes_every_axis(tmp_path):
    sweep = _sweep_module()
    assert sweep.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    rows = data["rows"]
    assert (tmp_path / "sweep.md").stat().st_size > 0 and (tmp_path / "sweep.png").stat().st_size > 0
    for axis in sweep.AXES:
        sub = [r for r in rows if r["axis"] == axis]
        assert len(sub) == 2, axis
        for r in sub:
            for key in ("ppl_learned", "ppl_heuristic", "ppl_none", "ppl_dense"):
                assert math.isfinite(r[key]) and r[key] > 1, (axis, key, r)
            assert r["steps"] >= 1 and r["cost_params"] > 0 and r["kept_plan"] in ("none", "heuristic", "learned")
    by = {(r["axis"], r["setting"]): r for r in rows}
    # Each point really changed its setting.
    assert by[("groups", "G=1")]["groups"] == 1 and by[("groups", "G=2")]["groups"] == 2
    assert by[("groups", "G=1")]["cost_params"] > by[("groups", "G=2")]["cost_params"]  # k² per group
    assert by[("init", "random")]["init"] == "random"
    assert by[("score", "sparsegpt 2:4")]["score"] == "sparsegpt"
    assert by[("epochs", "3 epochs")]["steps"] == 3 * by[("epochs", "1 epoch")]["steps"]
    # Independent per-layer permutations pay more gathers than synchronised sites.
    sync, ind = by[("sync", "synchronised")], by[("sync", "independent")]
    assert ind["deployed_gathers"] > sync["deployed_gathers"] > 0
    assert ind["gather_ms"] >= 0 and sync["forward_ms"] > 0
    # The long run's held-out perplexity after every epoch.
    curve = [r for r in rows if r["axis"] == "epochs-curve"]
    assert [r["epoch"] for r in curve] == [1, 2, 3]
    assert all(math.isfinite(r["ppl_learned"]) and math.isfinite(r["train_loss"]) for r in curve)
    # Re-rendering from the JSON alone works (the committed results can be re-plotted).
    (tmp_path / "sweep.md").unlink()
    assert sweep.main(["--render", "--out", str(tmp_path)]) == 0
    assert "## groups" in (tmp_path / "sweep.md").read_text()
    # Axes split over two processes join back into the same table.
    half = [a for a in sweep.AXES[:3]]
    # Part a lacks the base point of its groups axis: the merge takes it from another axis
    # where the very same configuration ran.
    for name, keep in (("a", lambda r: r["axis"] in half and r["setting"] != "G=2"),
                       ("b", lambda r: r["axis"] not in half)):
        (tmp_path / name).mkdir()
        part = {"rows": [r for r in rows if keep(r)], "meta": {**data["meta"], "command": f"part {name}"}}
        (tmp_path / name / "sweep.json").write_text(json.dumps(part))
    merged = tmp_path / "merged"
    assert sweep.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(merged)]) == 0
    again = json.loads((merged / "sweep.json").read_text())
    key = lambda r: (r["axis"], r["setting"])  # noqa: E731
    assert sorted(again["rows"], key=key) == sorted(rows, key=key)
    assert again["meta"]["command"] == "part a + part b"
    with pytest.raises(ValueError, match="different setups"):
        sweep.merge([data, {**data, "meta": {**data["meta"], "setup": "another model"}}])


def test_solver_timing_rows_merge_under_the_groups_axis(tmp_path):
    sweep = _sweep_module()
    assert sweep.main(["--preset", "tiny", "--solver", "--out", str(tmp_path / "solver")]) == 0
    rows = json.loads((tmp_path / "solver" / "sweep.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["G=1", "G=2"]
    assert all(r["solver_seconds_per_step"] > 0 for r in rows)
    assert rows[0]["cost_params"] > rows[1]["cost_params"]  # one k x k table per group: G=1 has the most
    assert sweep.main(["--preset", "tiny", "--axes", "groups", "--out", str(tmp_path / "groups")]) == 0
    assert sweep.main(["--merge", str(tmp_path / "groups"), str(tmp_path / "solver"), "--out",
                       str(tmp_path / "merged")]) == 0
    md = (tmp_path / "merged" / "sweep.md").read_text()
    assert "solver_seconds_per_step" in md and "## groups" in md

"""The embedded demo end to end (slow: several minutes on 2 CPU cores; run with `make test-all`)."""

import math

import pytest

pytestmark = pytest.mark.slow


def test_demo_quick_preset_learned_not_worse_than_heuristic(tmp_path):
    from permsparse.demo import run_demo
    from permsparse.io.plan import read_plan

    rows = run_demo("quick", out=tmp_path / "demo", progress=False)
    ppl = {r["method"]: r["ppl"] for r in rows}
    assert set(ppl) == {"dense", "wanda", "wanda+heuristic", "wanda+learned"}
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["dense"] < ppl["wanda+heuristic"] < ppl["wanda"]
    assert ppl["wanda+learned"] < ppl["wanda+heuristic"]
    meta, sites, perms = read_plan(tmp_path / "demo")
    assert len(sites) == 120 and (tmp_path / "demo" / "report.md").is_file()

"""The prepared GPU script's CPU dry run: the same plumbing, tiny, and its result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_dry_run_writes_its_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_checks.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert checks["dry_run"] and [c["status"] for c in checks["checks"]] == ["ok", "ok"]
    runs = json.loads((tmp_path / "gpu_block_dry.json").read_text())["rows"]
    (row,) = runs
    assert row["kind"] == "e2e_step" and row["ckpt"] and row["blocks"] == 1 and row["steps"] == 3
    assert 0 < row["bank_share"] < 1 and row["account_gib"]["costs"] >= 0
    assert "does not fit" not in (tmp_path / "gpu_block_dry.md").read_text()
    assert (tmp_path / "gpu_checks.md").read_text().startswith("# GPU checks of issue 17")

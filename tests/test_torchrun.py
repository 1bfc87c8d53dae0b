"""The real launcher: ``torchrun --nproc_per_node 2 -m permsparse.cli prune ...`` on CPU
(gloo) against the same command in one process with the same global batch.

Checks that only rank 0 writes ``--out`` (one "wrote" line, no stray folders), that the
output loads, and that its permutations and pruned weights equal the single-process
run's, for the data-parallel end-to-end trainer and for block-wise ``--spread-blocks``.
The tiny LLaMA folder and the text come from ``test_cli``'s fixtures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from permsparse.cli import main
from permsparse.io.export import load
from permsparse.io.plan import PLAN_FILE, read_plan
from test_cli import WINDOW, calib_txt, model_dir, words  # noqa: F401  (fixtures)

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch):
    """The in-process reference runs single-threaded, as each torchrun worker does; and
    ``-q`` sets ``TQDM_DISABLE``, which monkeypatch restores for later tests."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield


def _args(model_dir, calib_txt, out, *extra) -> list[str]:
    # Global batch 4 = 2 windows per rank; 8 windows of 32 tokens keep a run a few seconds.
    return ["prune", str(model_dir), "--calib", str(calib_txt), "--n-calib", "8", *WINDOW, "--batch-size", "4",
            "--epochs", "1", "--groups", "2", "--no-bf16", "--no-eval", "--out", str(out), "-q", *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
@pytest.mark.parametrize("extra", [(), ("--objective", "blockwise", "--spread-blocks", "--steps-per-block", "4")],
                         ids=["data-parallel", "spread-blocks"])
def test_torchrun_two_processes_match_one(model_dir, calib_txt, tmp_path, capsys, extra):  # noqa: F811
    two, one = tmp_path / "two", tmp_path / "one"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "permsparse.cli",
                           *_args(model_dir, calib_txt, two, *extra)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # rank 1 returns before exporting
    assert main(_args(model_dir, calib_txt, one, *extra)) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray or temporary folders

    meta2, _, perms2 = read_plan(two)
    meta1, _, perms1 = read_plan(one)
    assert meta2["metrics"]["world_size"] == 2 and "world_size" not in meta1["metrics"]
    assert meta2["metrics"]["kept_plan"] == meta1["metrics"]["kept_plan"]
    assert {n: p.indices.tolist() for n, p in perms2.items()} == {n: p.indices.tolist() for n, p in perms1.items()}
    w2, w1 = _weights(two), _weights(one)
    assert set(w2) == set(w1)
    for k in w1:  # same permutations, so the same masks on the same dense weights
        assert torch.equal(w2[k], w1[k]), k

    model = load(two, deploy=True)
    logits = model(input_ids=torch.randint(3, 100, (1, 16))).logits
    assert torch.isfinite(logits).all()
    assert (two / PLAN_FILE).is_file()

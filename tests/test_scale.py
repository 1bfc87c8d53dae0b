"""Scaling: resumable training (SIGKILL and resume), data parallelism over gloo, block-wise
blocks spread over gloo ranks, streaming block-wise memory, and progress bars. Heavy work
runs in small subprocesses with one thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
VOCAB = 128
GROUPS = 2


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Single-threaded: these tests time and compare runs on a shared 2-core machine."""
    yield


# -- helpers shared with the subprocesses (imported there as ``test_scale``) ---------------


def _model(layers: int = 2, hidden: int = 64, inter: int = 128):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _calib(n: int = 8, window: int = 32) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, window), generator=torch.Generator().manual_seed(0))


def _config(**learn):
    from permsparse.config import LearnConfig
    from permsparse.config import PruneConfig

    kw = dict(objective="e2e", epochs=4, lr=0.05, batch_size=4, guard_batches=2, bf16=False, seed=3)
    kw.update(learn)
    return PruneConfig(permutation="learned", groups=GROUPS, learn=LearnConfig(**kw), progress=False)


def _run_prune(config, resume: bool = False, sleep: float = 0.0):
    """prune() on the tiny llama; returns (result, final costs)."""
    from permsparse.api import prune

    model = _model()
    costs = {}

    def on_step(rec, state):
        costs.update({k: v.detach().clone() for k, v in state.bank.costs.items()})
        if sleep:
            time.sleep(sleep)

    res = prune(model, None, config, _calib(), on_step=on_step, resume=resume)
    return res, costs


def _perms_json(perms) -> dict:
    return {n: p.indices.tolist() for n, p in sorted(perms.items())}


def _worker_resume(ckpt: str, out: str, resume: bool, sleep: float) -> None:
    torch.set_num_threads(1)
    cfg = _config(epochs=8, checkpoint_path=ckpt, checkpoint_every=1)
    res, _ = _run_prune(cfg, resume=resume, sleep=sleep)
    Path(out).write_text(json.dumps({"perms": _perms_json(res.learned), "kept": res.kept_plan}))


def _worker_dist(out: str) -> None:
    from safetensors.torch import save_file

    from permsparse.train import distributed as dist

    torch.set_num_threads(1)
    assert dist.init_from_env()
    try:
        res, costs = _run_prune(_config())
        if dist.is_main():
            save_file({k: v.contiguous() for k, v in costs.items()}, out + ".safetensors")
            Path(out).write_text(json.dumps({"perms": _perms_json(res.learned), "guard": res.guard,
                                             "loss": [h.loss for h in res.history]}))
    finally:
        torch.distributed.destroy_process_group()


def _spread_config():
    cfg = _config(objective="blockwise", steps_per_block=4)
    cfg.spread_blocks = True
    return cfg


def _run_spread(layers: int = 3):
    """Block-parallel prune of a tiny llama: (result, the pruned model)."""
    from permsparse.api import prune

    model = _model(layers)
    return prune(model, None, _spread_config(), _calib()), model


def _spread_json(res) -> dict:
    return {"perms": _perms_json(res.perms), "guard": res.guard, "kept": res.kept_plan,
            "reports": [r.to_json() for r in res.reports], "steps": len(res.history)}


def _worker_spread(out: str) -> None:
    """Each rank writes its own result and weights: the test checks that they agree."""
    from safetensors.torch import save_file

    from permsparse.train import distributed as dist

    torch.set_num_threads(1)
    assert dist.init_from_env()
    try:
        res, model = _run_spread()
        r = dist.rank()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.{r}.safetensors")
        Path(f"{out}.{r}").write_text(json.dumps(_spread_json(res)))
    finally:
        torch.distributed.destroy_process_group()


def _worker_memory(layers: int, out: str) -> None:
    import resource

    from permsparse.api import prune

    torch.set_num_threads(1)
    model = _model(layers, hidden=128, inter=256)
    calib = _calib(16, 64)
    cfg = _config(objective="blockwise", steps_per_block=3, batch_size=4)
    cfg.offload = True
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prune(model, None, cfg, calib)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(json.dumps({"growth_kb": peak - base}))


def _python(code: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(SRC)!r}]; import test_scale; {code}"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", **extra)
    return env


# -- 1. resumable training -------------------------------------------------------------------


def _ckpt_step(path: Path) -> int:
    from permsparse.train.checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)[1]["step"]
    except Exception:
        return -1


def test_sigkill_and_resume_gives_the_same_permutations(tmp_path):
    ref, ref_costs = _run_prune(_config(epochs=8))
    ckpt = tmp_path / "state.safetensors"
    out = tmp_path / "resumed.json"
    code = f"test_scale._worker_resume({str(ckpt)!r}, {str(out)!r}, {{resume}}, {{sleep}})"
    proc = subprocess.Popen(_python(code.format(resume=False, sleep=0.5)), env=_env())
    try:
        deadline = time.time() + 60
        while _ckpt_step(ckpt) < 3:
            assert proc.poll() is None, "the worker ended before its checkpoint at step 3"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _ckpt_step(ckpt)
    assert 3 <= killed_at < 16  # interrupted mid-run (8 epochs x 2 batches = 16 steps)
    assert not out.exists()
    subprocess.run(_python(code.format(resume=True, sleep=0.0)), env=_env(), check=True)
    got = json.loads(out.read_text())
    assert got["perms"] == _perms_json(ref.learned)
    assert got["kept"] == ref.kept_plan
    assert _ckpt_step(ckpt) == 16


def test_checkpoint_is_one_safetensors_file_and_validated(tmp_path):
    from permsparse.train.checkpoint import load_checkpoint

    ckpt = tmp_path / "s.safetensors"
    res, _ = _run_prune(_config(checkpoint_path=str(ckpt), checkpoint_every=3))
    tensors, meta = load_checkpoint(ckpt)
    assert meta["step"] == meta["steps"] == 8 and len(meta["history"]) == 8
    assert any(k.startswith("param/costs.") for k in tensors) and any(k.startswith("opt/") for k in tensors)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # Resuming a finished run returns its result without training.
    again, _ = _run_prune(_config(checkpoint_path=str(ckpt), checkpoint_every=3), resume=True)
    assert _perms_json(again.learned) == _perms_json(res.learned)
    # Another run's settings: refused with a clear message.
    with pytest.raises(ValueError, match="different run"):
        _run_prune(_config(lr=0.01, checkpoint_path=str(ckpt)), resume=True)
    with pytest.raises(ValueError, match="checkpoint path"):
        _run_prune(_config(), resume=True)


# -- 2. data parallel ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(code: str, world: int = 2) -> None:
    """``world`` processes with torchrun's environment; all must exit with 0."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(_python(code), env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in range(world)
    ]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dist.json"
    _launch(f"test_scale._worker_dist({str(out)!r})")
    ref, ref_costs = _run_prune(_config())
    got = json.loads(out.read_text())
    assert got["perms"] == _perms_json(ref.learned)
    costs = load_file(str(out) + ".safetensors")
    assert set(costs) == set(ref_costs)
    for k in costs:
        assert torch.allclose(costs[k], ref_costs[k], atol=1e-5, rtol=0), (k, (costs[k] - ref_costs[k]).abs().max())
    assert got["loss"] == pytest.approx([h.loss for h in ref.history], abs=1e-5)
    # The refitted finalists' Hessians sum float32 products of each rank's half of a batch, whose
    # rounding differs from one process's products of whole batches (~1e-7 of an entry).
    assert got["guard"] == pytest.approx(ref.guard, abs=1e-5, rel=1e-4)


def test_blocks_spread_over_two_gloo_processes_match_one_process(tmp_path):
    """3 blocks over 2 ranks (rank 0 owns two, rank 1 one): both ranks end with the
    single-process permutations, guard losses, reports and bit-identical pruned weights."""
    from safetensors.torch import load_file

    out = tmp_path / "spread"
    _launch(f"test_scale._worker_spread({str(out)!r})")
    ref, ref_model = _run_spread()
    want = json.loads(json.dumps(_spread_json(ref)))  # the same float rounding as the workers' JSON
    assert want["steps"] == 3 * 4 and len(want["perms"]) == 3 * 7  # one permutation per layer
    ref_state = ref_model.state_dict()
    for r in range(2):
        assert json.loads(Path(f"{out}.{r}").read_text()) == want, f"rank {r}"
        state = load_file(f"{out}.{r}.safetensors")
        assert set(state) == set(ref_state)
        for k, v in state.items():
            assert torch.equal(v, ref_state[k]), (r, k)


def test_spread_blocks_learns_against_dense_inputs():
    """One process: the first block matches the sequential block-wise run (same inputs);
    later blocks see dense inputs instead of the pruned blocks' outputs, so they differ."""
    from permsparse.train import distributed as dist
    from permsparse.api import prune
    from permsparse.config import PruneConfig

    spread, spread_model = _run_spread(2)
    seq_model = _model(2)
    seq = prune(seq_model, None, _config(objective="blockwise", steps_per_block=4), _calib())
    first = [k for k in seq.guard if k.startswith("model.layers.0:")]
    assert first and all(spread.guard[k] == seq.guard[k] for k in first)
    later = [k for k in seq.guard if k.startswith("model.layers.1:")]
    assert any(spread.guard[k] != seq.guard[k] for k in later)
    # Streamed (one block on the device at a time): the same model.
    cfg = _spread_config()
    cfg.offload, cfg.device = True, "cpu"
    streamed_model = _model(2)
    streamed = prune(streamed_model, None, cfg, _calib())
    assert _perms_json(streamed.perms) == _perms_json(spread.perms)
    for (n, a), (_, b) in zip(spread_model.state_dict().items(), streamed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert dist.block_owners(5, 2) == [0, 0, 0, 1, 1] and dist.block_owners(1, 3) == [0]
    with pytest.raises(ValueError, match="block-wise objective"):
        PruneConfig(spread_blocks=True, learn={"objective": "e2e"})
    assert PruneConfig(spread_blocks=True).learn.objective == "auto"  # auto: block-wise with spread blocks
    with pytest.raises(ValueError, match="choose one"):
        PruneConfig(spread_blocks=True, sequential=True, learn={"objective": "blockwise"})


def test_shard_batch_needs_divisible_batches(monkeypatch):
    from permsparse.train import distributed as dist

    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        dist.shard_batch({"input_ids": torch.zeros(4, 8)})
    got = dist.shard_batch({"input_ids": torch.arange(6).view(6, 1)})
    assert got["input_ids"].view(-1).tolist() == [2, 3]


# -- 3. streaming block by block ---------------------------------------------------------------


def test_streaming_memory_flat_in_depth(tmp_path):
    """Peak RSS growth during a streamed block-wise prune, over the RSS peak before it
    (model built, so its parameters are excluded). The working set is one block's
    training state plus the cached inputs of 16 windows x 64 tokens x 128 channels
    (~0.5 MB per copy); everything depth-dependent (the model) is allocated before the
    baseline. Bound: 8 and 16 layers may grow the peak by at most 24 MB more than 2 layers
    (allocator noise and the per-block history; a per-layer leak of one block's working
    set, a few MB, would exceed it at 16 layers). The three depths run side by side, each
    in its own process (RSS is per process)."""
    depths = (2, 8, 16)
    outs = {d: tmp_path / f"m{d}.json" for d in depths}
    procs = [subprocess.Popen(_python(f"test_scale._worker_memory({d}, {str(outs[d])!r})"), env=_env()) for d in depths]
    for p in procs:
        assert p.wait(timeout=300) == 0
    growth = {d: json.loads(outs[d].read_text())["growth_kb"] / 1024 for d in depths}
    assert growth[8] - growth[2] < 24 and growth[16] - growth[2] < 24, growth


def test_offload_gives_the_same_model_as_plain_blockwise():
    from permsparse.api import prune

    a, b = _model(), _model()
    calib = _calib()
    cfg = _config(objective="blockwise", steps_per_block=4)
    ra = prune(a, None, cfg, calib)
    cfg.offload, cfg.device = True, "cpu"
    rb = prune(b, None, cfg, calib)
    assert _perms_json(ra.perms) == _perms_json(rb.perms)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


# -- 4. progress ---------------------------------------------------------------------------


def test_progress_bars_say_block_and_step(capsys):
    from permsparse.models import calibrate
    from permsparse.api import prune

    model = _model(3)
    cfg = _config(objective="blockwise", steps_per_block=2)
    cfg.progress = True
    prune(model, None, cfg, _calib(4))
    err = capsys.readouterr().err
    assert "block 3/3" in err
    cfg = _config(epochs=1)
    cfg.progress = True
    prune(_model(), None, cfg, _calib(8))
    err = capsys.readouterr().err
    assert "learn permutations" in err and "2/2" in err and "loss=" in err


# -- export killed mid-way ---------------------------------------------------------------------


def _worker_export(out: str) -> None:
    from permsparse.io.export import export
    from permsparse.api import prune
    from permsparse.config import PruneConfig

    torch.set_num_threads(1)
    model = _model()
    res = prune(model, None, PruneConfig(permutation="heuristic", groups=GROUPS, progress=False), _calib())
    real = model.save_pretrained

    def slow(*a, **k):  # the weights are written, then the process is killed before the plan
        real(*a, **k)
        Path(out + ".saving").write_text("1")
        time.sleep(60)

    model.save_pretrained = slow
    export(model, out, res.sites, res.perms, pattern="2:4", score="wanda", groups=GROUPS)


def test_kill_during_export_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.Popen(_python(f"test_scale._worker_export({str(out)!r})"), env=_env())
    try:
        deadline = time.time() + 60
        while not Path(str(out) + ".saving").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    visible = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert visible == []
    assert not [p for p in tmp_path.rglob("permsparse.json")]

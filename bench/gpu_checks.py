"""Every GPU check of issue 17 in one go, in at most 10 minutes on one H200-class GPU.

1. the environment (``nvidia-smi``, torch, the host's cores);
2. the GPU tests (``pytest -m gpu``);
3. the LLaMA-2-7B shape at full depth (32 blocks, bf16, 2:4, G = 4, synchronised sites), the
   trainer alone (``bench/gpu_block.py --direct``), each run in its own process with its own
   time limit: 4 x 2048 tokens with activation checkpointing (the target: fits with >= 15 % of
   the card free, step <= 3 s, bank <= 30 %), 1 x 2048 without it (the issue's measured
   setting), and 4 x 2048 without it (fits, or a row saying that it does not);
4. the memory account of each run (the roles at the forward's peak, ``max_memory_allocated``,
   ``max_memory_reserved``), inside the gpu_block rows.

Results: ``<out>/gpu_block.{json,md}`` (all runs merged), ``<out>/gpu_checks.{json,md}`` (each
check's status and seconds), ``<out>/pytest_gpu.txt``.

    python bench/gpu_checks.py --out "$OUT"          # on the GPU machine; copy <out> into bench/results
    python bench/gpu_checks.py --dry-run --out /tmp/c   # the same plumbing on this CPU, tiny and quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

#: (name, gpu_block arguments, time limit s). The limits add up to 460 s with the tests' 110 s.
RUNS_GPU = [
    ("7b-32-4x2048-ckpt", ["--runs", "32:4:yes", "--steps", "3"], 170),
    ("7b-32-1x2048", ["--runs", "32:1:no", "--steps", "3"], 120),
    ("7b-32-4x2048", ["--runs", "32:4:no", "--steps", "3"], 120),
]
RUNS_DRY = [
    ("tiny-1-ckpt", ["--tiny", "--device", "cpu", "--runs", "1:2:yes", "--steps", "3", "--window", "32"], 240),
]


def _run(name: str, cmd: list[str], limit: float, log: Path | None = None) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, out = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        status = f"timed out after {limit:.0f} s"
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    if log is not None:
        log.write_text(out)
    print(f"[{name}] {status} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {"check": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": out[-1500:]}


def _environment() -> dict:
    import platform

    import torch

    from permsparse.core.sinkhorn import host_cores

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "host_cores": host_cores(),
            "host": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1))
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes: the script's plumbing")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    env = _environment()
    if not env["cuda"] and not args.dry_run:
        ap.error("no CUDA device: run with --dry-run on a CPU")
    print(json.dumps(env), flush=True)
    py = sys.executable
    tests = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-x"]
    tests += ["--co", "tests/test_assignment.py"] if args.dry_run else ["tests"]
    checks = [_run("pytest -m gpu", tests, 110, args.out / "pytest_gpu.txt")]
    rows: list[dict] = []
    for name, extra, limit in (RUNS_DRY if args.dry_run else RUNS_GPU):
        sub = args.out / "runs" / name
        res = _run(name, [py, "bench/gpu_block.py", "--direct", "--out", str(sub), *extra], limit, sub.with_suffix(".log"))
        checks.append(res)
        made = sorted(sub.glob("gpu_block*.json"))
        if made:
            rows += [r for r in json.loads(made[0].read_text())["rows"] if r["kind"] in ("e2e_step", "oom")]
        else:  # timed out or failed: a row that says so, not a silent gap
            depth, batch, ckpt = extra[extra.index("--runs") + 1].split(":")
            rows.append({"kind": "oom", "blocks": int(depth), "batch": int(batch), "window": 2048, "ckpt": ckpt == "yes",
                         "init": "identity", "assign": "threads", "direct": True, "device": env.get("device", "cpu"),
                         "note": f"not measured ({res['status']})", "max_allocated_gib": float("nan"), "error": ""})
    _write(args.out, env, checks, rows, time.perf_counter() - t_all, args.dry_run)
    return 0 if all(c["status"] == "ok" for c in checks) else 1


def _write(out: Path, env: dict, checks: list[dict], rows: list[dict], seconds: float, dry: bool) -> None:
    import gpu_block

    from permsparse.io.atomic import atomic_write_json, atomic_write_text

    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = {"created": created, "device": env.get("device", "cpu"), "torch": env["torch"], "host": env["host"],
            "host_cores": env["host_cores"], "full_depth": 4 if dry else 32,
            "argv": "--direct (bench/gpu_checks.py" + (" --dry-run)" if dry else ")")}
    name = "gpu_block_dry" if dry else "gpu_block"
    atomic_write_json(out / f"{name}.json", {"rows": rows, "meta": meta})
    atomic_write_text(out / f"{name}.md", gpu_block.markdown(rows, meta))
    atomic_write_json(out / "gpu_checks.json", {"env": env, "checks": checks, "seconds": round(seconds, 1),
                                                "created": created, "dry_run": dry})
    lines = ["# GPU checks of issue 17", "", f"`python bench/gpu_checks.py{' --dry-run' if dry else ''}` on {created}: "
             f"{env.get('device', 'CPU (dry run)')}, torch {env['torch']}, {env['host_cores']} host cores; "
             f"{seconds:.0f} s in all.", "", "| check | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {c['check']} | {c['status']} | {c['seconds']:.0f} |" for c in checks]
    lines += ["", f"Runs: [{name}.md]({name}.md)."]
    atomic_write_text(out / "gpu_checks.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

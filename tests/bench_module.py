"""The benchmark scripts under ``bench/`` as modules, for the tests that exercise their code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` loaded once per process and kept in ``sys.modules`` under its own name
    (dataclasses look their module up there). ``bench/`` is on the path while it loads, since one
    script imports another (``encoder_headroom`` imports ``encoder``)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(BENCH_DIR / f"{name}.py"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(BENCH_DIR))
    return mod

"""What ``permsparse prune`` checks before it reads a model: the paths it will write, the
training checkpoint it would overwrite or resume, the device; and what it says when a run
is interrupted.

Each check fails in one line (a :class:`~permsparse.cli.options.UsageError`, exit 2) within
a second of starting, not after the model is loaded or the training is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from pathlib import Path
from typing import Sequence

from permsparse.cli.options import UsageError
from permsparse.config import DataConfig, PruneConfig
from permsparse.io.atomic import remove_stale_temps
from permsparse.io.outputs import check_output_dir, check_writable, protected_paths
from permsparse.train.callbacks import Callback

__all__ = ["check_out", "check_checkpoint", "check_device", "run_identity", "RunIdentity", "interrupt_hint",
           "checkpoint_meta"]

log = logging.getLogger("permsparse")

#: LearnConfig fields a resumed run may change (they do not change what it computes).
_RUN_ONLY = ("checkpoint_path", "checkpoint_every", "time_budget", "prune_budget")


def check_out(out: str | None, overwrite: bool, model: str) -> Path:
    """``--out``: a new, empty or previous-run folder that can be written (see
    :mod:`permsparse.io.outputs`), never the model's folder or the current one."""
    if not out:
        raise UsageError("--out DIR is required")
    try:
        return check_output_dir(out, overwrite, protected_paths(model), label="--out", flag="--overwrite")
    except (ValueError, FileExistsError) as err:
        raise UsageError(str(err)) from None


def checkpoint_meta(path: Path) -> dict:
    """The JSON state of a permsparse training checkpoint (its header only).

    Raises:
        UsageError: a folder, or a file that is not a permsparse checkpoint (or is truncated).
    """
    from safetensors import safe_open

    if path.is_dir():
        raise UsageError(f"--checkpoint {path} is a folder; name a file (e.g. {path / 'train.safetensors'})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("permsparse_state")
        meta = json.loads(raw) if raw is not None else None
    except Exception:  # noqa: BLE001 - any unreadable file is "not a checkpoint" here
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"--checkpoint {path} exists and is not a permsparse training checkpoint (or is truncated); "
                         f"refusing to overwrite it: remove it or name another file")
    return meta


def check_checkpoint(path: str | None, out: Path, resume: bool, identity: str) -> None:
    """``--checkpoint``: outside ``--out`` (which the export replaces), writable, and, when it
    exists, a checkpoint of this very run (:func:`run_identity`). Another run's checkpoint is
    refused with or without ``--resume``; one written without an identity (by the library,
    or an earlier version) only with ``--resume``, where the trainer's own run key decides."""
    if not path:
        return
    ck = Path(path).expanduser()
    if out.resolve() in ck.resolve().parents:
        raise UsageError(f"--checkpoint {path} lies inside --out {out}, which the export replaces; keep it outside")
    if ck.is_dir():
        raise UsageError(f"--checkpoint {path} is a folder; name a file (e.g. {ck / 'train.safetensors'})")
    try:
        check_writable(ck, "--checkpoint")
    except ValueError as err:
        raise UsageError(str(err)) from None
    remove_stale_temps(ck)
    if not ck.exists():
        return
    meta = checkpoint_meta(ck)
    where = f"(step {meta.get('step', '?')} of {meta.get('steps', '?')})"
    theirs = meta.get("cli_run")
    if theirs == identity:
        if not resume:
            log.warning("--checkpoint %s holds this run's state %s; without --resume the run starts over", ck, where)
        return
    if theirs is not None:
        drop = " or drop --resume" if resume else ""
        raise UsageError(f"--checkpoint {path} holds the state of a different run {where} (other model, data or "
                         f"settings); refusing to {'resume' if resume else 'overwrite'} it: name another file{drop}")
    if not resume:
        raise UsageError(f"--checkpoint {path} holds a training state {where}; pass --resume to continue it, or "
                         f"name another file")


def check_device(config: PruneConfig) -> None:
    """``--device``: present on this machine (the config checked that torch can name it)."""
    if config.device is None:
        return
    import torch

    dev = torch.device(config.device)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {config.device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {config.device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {config.device}: MPS is not available on this machine (use --device cpu)")


def _local(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name.strip().lower()


def run_identity(model: str, config: PruneConfig, data: DataConfig) -> str:
    """A hash of what a command-line run computes: the model, the data and every setting but
    those a resumed run may change (the checkpoint's place and rhythm, the time budget, the
    device, the progress bars)."""
    cfg = config.to_json()
    for k in ("progress", "device"):  # how the run shows and where it computes, not what
        cfg.pop(k, None)
    cfg["learn"] = {k: v for k, v in cfg["learn"].items() if k not in _RUN_ONLY}
    desc = {"model": _local(model), "config": cfg, "data": {**data.to_json(), "calib": _local(data.calib)}}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunIdentity(Callback):
    """Writes the run's identity into its training checkpoint (as ``cli_run``), so that the
    next run can tell its own checkpoint from another's before it loads anything."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    def state_dict(self) -> tuple[dict, dict]:
        return {}, {"cli_run": self.identity}


def interrupt_hint(argv: Sequence[str], checkpoint: str | None, resume: bool, learned: bool) -> str:
    """What to tell a user who pressed Ctrl-C: how to continue, where that is possible."""
    if checkpoint and Path(checkpoint).expanduser().is_file():
        try:
            meta = checkpoint_meta(Path(checkpoint).expanduser())
        except UsageError:
            return f"{checkpoint} is not a usable checkpoint; run the same command again to start over"
        again = shlex.join(["permsparse", *argv] + ([] if resume else ["--resume"]))
        return (f"the training state is saved in {checkpoint} (step {meta.get('step')} of {meta.get('steps')}); "
                f"to continue, run: {again}")
    if checkpoint:
        return f"no training state was saved to {checkpoint} yet; run the same command again to start over"
    if learned:
        return "nothing was saved; pass --checkpoint FILE to make a long run resumable with --resume"
    return "nothing was written"

"""Atomic writes: the one place a file or a folder is written so that a reader, or a crash,
never sees it half-written. Standard library only, so that every layer may use it.

A file goes to a hidden temporary sibling, is fsynced and renamed over its final name
(:func:`atomic_file`); a folder is filled as a hidden temporary sibling and renamed into
place as a whole (:func:`atomic_dir`). A crash leaves the old version, the new one, or a
hidden ``.{name}.tmp-{pid}.*`` sibling; never a partial file under the final name. The next
write to the same name removes such leftovers of processes that are gone
(:func:`remove_stale_temps`): only names of this module's own pattern, never anything else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_file", "atomic_dir", "atomic_write_text", "atomic_write_json", "fsync_file", "fsync_dir",
           "fsync_tree", "json_default", "remove_stale_temps", "temp_prefix"]

log = logging.getLogger(__name__)


def temp_prefix(path: "str | os.PathLike[str]", kind: str = "tmp") -> str:
    """The name prefix of a temporary sibling of ``path``: ``.{name}.{kind}-{pid}.`` (``kind``
    ``tmp``: being written; ``old``: a replaced folder on its way out)."""
    return f".{Path(path).name}.{kind}-{os.getpid()}."


def _stale_pattern(name: str) -> "re.Pattern[str]":
    # tempfile's 8 random characters; the pid is absent in the names of older versions.
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(?:(\d+)\.)?[a-z0-9_]{{8}}$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: "str | os.PathLike[str]") -> list[Path]:
    """Remove the temporary siblings of ``path`` that a killed writer left behind (a killed
    export leaves its whole unfinished folder); returns what was removed.

    Only names of this module's pattern (:func:`temp_prefix`) whose process is gone are
    touched; a replaced folder (``old``) only once ``path`` itself exists again, since until
    then it is the one complete copy.
    """
    out = Path(path).expanduser().absolute()
    pattern = _stale_pattern(out.name)
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or (m.group(2) is not None and _alive(int(m.group(2)))):
            continue
        if m.group(1) == "old" and not out.exists():
            log.warning("%s holds the previous %s of an interrupted overwrite; it is left in place", entry, out.name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
        log.info("removed %s, left behind by an interrupted write", entry)
    return removed


def fsync_file(path: "str | os.PathLike[str]") -> None:
    """Flush a file's contents to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: "str | os.PathLike[str]") -> None:
    """Flush a directory entry (renames inside it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: "str | os.PathLike[str]") -> None:
    """:func:`fsync_file` every file under ``root``, then ``root`` itself."""
    for f in Path(root).rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success fsync it and rename it into place.

    Readers see the old file or the new one, never a partial file; on an exception the
    temporary file is removed and ``path`` is untouched. The temporary name does not end
    in ``path``'s suffix: writers that pick a format by suffix must be told the format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared like any written file
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # the body may have moved or removed it
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: "str | os.PathLike[str]", overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``path``; on success fsync everything in it
    and rename it to ``path``.

    ``overwrite``: an existing ``path`` is moved aside, the new folder renamed in, and the
    old one deleted (it is put back if the rename fails). Without it an existing ``path``
    raises ``FileExistsError`` when the body is done, and the new folder is discarded. On
    an exception the temporary folder is removed and ``path`` is untouched.
    """
    out = Path(path).expanduser().absolute()
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the folder is an ordinary directory once renamed
    old: Path | None = None
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out, "old"), dir=parent))
            os.replace(out, old / out.name)  # move the old folder aside (atomic rename)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)  # put the old one back
                raise
        else:
            os.replace(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not any(old.iterdir()):
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for tensors, numpy values, paths, patterns and objects with
    ``to_json`` (duck-typed, so that this module needs neither torch nor numpy)."""
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "numel") and hasattr(obj, "item") and obj.numel() == 1:  # a one-element tensor
        return obj.item()
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and numpy scalars
        return obj.tolist()
    if type(obj).__str__ is not object.__str__ or type(obj).__module__ == "torch":  # NMPattern, torch.dtype
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: "str | os.PathLike[str]", obj: Any, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj)`` (tensors, numpy values, paths allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")

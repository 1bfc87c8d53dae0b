"""Where a run may write: the rules that keep a user's own files safe.

An output folder (``permsparse prune --out``, :func:`permsparse.export`) is written only when
it does not exist, is empty, or holds a previous permsparse export: ``permsparse.json`` and
nothing but the files that export listed in it (``files``). Replacing a previous export needs
``overwrite``; a folder with anything else in it is never replaced, and neither is the
folder a model was read from, the current folder, or any folder that contains one of them.
Whether a path can be written at all is checked before any work starts
(:func:`check_writable`), so that a read-only or mistyped location fails in a second,
not after an hour of training.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Mapping

from permsparse.io.atomic import remove_stale_temps

__all__ = ["FolderContents", "folder_contents", "check_output_dir", "check_writable", "protected_paths",
           "LEGACY_EXPORT_FILES"]

PLAN_FILE = "permsparse.json"
#: What an export written before ``permsparse.json`` listed its files holds (a Hugging Face
#: model folder, its tokenizer or image processor, and the command line's report).
LEGACY_EXPORT_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                       "spiece.model", "chat_template.*", "*preprocessor_config.json", "processor_config.json",
                       "report.md", "*.png", "steps.jsonl")
#: Files an operating system drops into any folder a user opens.
_OS_LITTER = (".DS_Store", "Thumbs.db")


@dataclass(frozen=True)
class FolderContents:
    """What a folder holds: ``kind`` is ``missing``, ``empty``, ``run`` (a previous export and
    nothing else) or ``other``; ``foreign`` the first entries that are not an export's."""

    kind: str
    foreign: tuple[str, ...] = ()
    n_files: int = 0


def _listed_files(plan: Path) -> "set[str] | None":
    """The files a ``permsparse.json`` lists; ``None`` for a plan written before the list
    (the legacy names decide); an empty set for a file that is not a plan at all."""
    try:
        data = json.loads(plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict) or "format_version" not in data or "sites" not in data:
        return set()
    files = data.get("files")
    if files is None:
        return None
    return {str(f) for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _entries(root: Path) -> list[tuple[str, bool]]:
    """Every entry under ``root`` as ``(relative posix path, is a folder)``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [((rel / d).as_posix(), True) for d in dirnames]
        out += [((rel / f).as_posix(), False) for f in filenames]
    return sorted(out)


def folder_contents(path: "str | os.PathLike[str]", max_named: int = 3) -> FolderContents:
    """Classify a folder (see :class:`FolderContents`)."""
    root = Path(path)
    if not root.exists():
        return FolderContents("missing")
    entries = [(rel, is_dir) for rel, is_dir in _entries(root) if Path(rel).name not in _OS_LITTER]
    files = [rel for rel, is_dir in entries if not is_dir]
    if not entries:
        return FolderContents("empty")
    listed = _listed_files(root / PLAN_FILE) if (root / PLAN_FILE).is_file() else set()

    def ours(rel: str, is_dir: bool) -> bool:
        if rel == PLAN_FILE:
            return True
        if listed is None:  # an export from before the list: only its flat, known names
            return not is_dir and "/" not in rel and any(fnmatch(rel, p) for p in LEGACY_EXPORT_FILES)
        return any(f.startswith(rel + "/") for f in listed) if is_dir else rel in listed

    foreign = [rel + ("/" if is_dir else "") for rel, is_dir in entries if not ours(rel, is_dir)]
    if listed == set() or foreign:
        shown = foreign or files
        return FolderContents("other", tuple(shown[:max_named]) + (("...",) if len(shown) > max_named else ()),
                              len(files))
    return FolderContents("run", (), len(files))


def protected_paths(*models: "str | os.PathLike[str] | None") -> dict[Path, str]:
    """What no output may replace or contain, resolved, with how messages name it: the
    current folder and each of ``models`` that is a local path (the model's folder or file)."""
    out = {Path.cwd().resolve(): "the current folder"}
    for p in models:
        path = Path(p).expanduser() if p is not None and str(p).strip() else None
        if path is not None and path.exists():
            out.setdefault(path.resolve(), f"the model {path.resolve()}")
    return out


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_writable(path: "str | os.PathLike[str]", label: str) -> None:
    """Raise ``ValueError`` unless ``path`` (a file or folder to be created or replaced) can be
    written: its nearest existing ancestor is a folder in which a new entry can be made (a
    real attempt, so that read-only mounts and permissions both count)."""
    target = Path(path).expanduser().absolute()
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{label} {path}: {parent} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=parent)
    except OSError as err:
        raise ValueError(f"{label} {path} cannot be written: {parent} is not writable "
                         f"({err.strerror or type(err).__name__})") from None
    os.rmdir(probe)


def check_output_dir(out: "str | os.PathLike[str]", overwrite: bool, protect: Mapping[Path, str] | None = None,
                     label: str = "out_dir", flag: str = "overwrite=True") -> Path:
    """Check that a run may write its export to ``out`` (see the module's rules); remove the
    leftovers of a killed export there (:func:`permsparse.io.atomic.remove_stale_temps`).

    ``protect``: resolved paths that must not be replaced or contained, with their names in
    messages (see :func:`protected_paths`); ``label``/``flag``: how messages name the folder
    and the option.

    Raises:
        ValueError: a protected folder, a file, a folder of other files (even with
            ``overwrite``), or a location that cannot be written.
        FileExistsError: a previous export without ``overwrite``.
    """
    path = Path(out).expanduser()
    resolved = path.resolve()
    for p, what in (protect or {}).items():
        if _contains(resolved, p):
            rel = "is" if p == resolved else "contains"
            raise ValueError(f"{label} {out} {rel} {what}; refusing to write there: name a new folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {out} exists and is not a directory")
    contents = folder_contents(path)
    if contents.kind == "other":
        even = f" even with {flag}" if overwrite else ""
        raise ValueError(f"{label} {out} holds {contents.n_files} file(s) that are not a permsparse export "
                         f"({', '.join(contents.foreign)}); refusing to write there{even}: name a new or empty folder")
    if contents.kind == "run" and not overwrite:
        raise FileExistsError(f"{label} {out} holds a previous permsparse export ({contents.n_files} files); "
                              f"pass {flag} to replace it")
    check_writable(path, label)
    remove_stale_temps(path)
    return path

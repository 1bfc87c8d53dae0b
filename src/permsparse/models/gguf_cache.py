"""A float copy of a small GGUF model in the cache folder, so that it loads in seconds.

transformers reads a GGUF file three times per load (config, tokenizer, weights), parsing every
metadata field and the tokenizer's vocabulary each time, and then dequantizes the weights: about
20 s for the embedded SmolLM2-135M on one laptop core, paid by every CLI run, test worker and
benchmark process. The first float32 load of a GGUF model saves the dequantized model and its
tokenizer as an ordinary safetensors folder (:func:`save_copy`); later loads read that folder
(:func:`cached_copy`), about 2 s. Only models whose float32 copy is at most
:data:`MAX_COPY_BYTES` are kept (540 MB for SmolLM2-135M): a 7B model's copy would be 28 GB.

The copy is keyed by the GGUF file's absolute path, size and modification time, the model class
and the transformers version, and written atomically: a folder that exists is complete.
``PERMSPARSE_GGUF_CACHE=0`` turns the copy off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from permsparse.data.assets import default_cache_dir
from permsparse.io.atomic import atomic_dir
from permsparse.models.integrity import check_model_folder

__all__ = ["MAX_COPY_BYTES", "cache_enabled", "copy_folder", "cached_copy", "load_copy", "save_copy"]

logger = logging.getLogger(__name__)

#: Largest float copy kept (bytes of parameters): SmolLM2-135M is 0.54 GB, a 1B model 4.9 GB.
MAX_COPY_BYTES = 1 << 30
_SOURCE_FILE = "permsparse-gguf-source.json"


def cache_enabled() -> bool:
    """False when ``PERMSPARSE_GGUF_CACHE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("PERMSPARSE_GGUF_CACHE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _source(gguf: Path, model_cls: str) -> dict[str, Any]:
    import transformers

    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "model_class": model_cls, "transformers": transformers.__version__}


def copy_folder(gguf: "str | os.PathLike[str]", model_cls: str,
                cache_dir: "str | os.PathLike[str] | None" = None) -> Path:
    """Where the float copy of ``gguf`` loaded as ``model_cls`` lives (whether or not it exists)."""
    return _folder(_source(Path(gguf), model_cls), cache_dir)


def _folder(source: dict[str, Any], cache_dir: "str | os.PathLike[str] | None") -> Path:
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{Path(source['gguf']).stem}-{key}"


def cached_copy(gguf: "str | os.PathLike[str]", model_cls: str,
                cache_dir: "str | os.PathLike[str] | None" = None) -> Path | None:
    """The folder of a complete float copy of ``gguf``, or ``None`` (none kept, or turned off)."""
    if not cache_enabled():
        return None
    folder = copy_folder(gguf, model_cls, cache_dir)
    return folder if (folder / _SOURCE_FILE).is_file() else None


def load_copy(gguf: "str | os.PathLike[str]", model_cls: Any, pre_cls: Any,
              dtype_kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` from the float copy of ``gguf``, or ``None`` when there is none.

    A copy that does not load (a file removed or truncated since) is deleted with a warning, and
    ``None`` returned: the caller reads the GGUF and keeps a new copy."""
    folder = cached_copy(gguf, model_cls.__name__)
    if folder is None:
        return None
    try:
        check_model_folder(folder, model_cls)  # a truncated file is a ValueError here, not a Rust panic later
        model = model_cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **dtype_kwargs)
        tokenizer = pre_cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        logger.warning("the float copy %s of %s did not load (%s); reading the GGUF again", folder,
                       Path(gguf).name, " ".join(str(err).split())[:200])
        shutil.rmtree(folder, ignore_errors=True)
        return None
    # As if read from the GGUF: export protects the source folder, not the cache.
    model.config._name_or_path = str(Path(gguf).parent)
    logger.debug("read %s from its float copy %s", Path(gguf).name, folder)
    return model, tokenizer


def save_copy(model: Any, tokenizer: Any, gguf: "str | os.PathLike[str]", model_cls: str,
              cache_dir: "str | os.PathLike[str] | None" = None) -> Path | None:
    """Keep ``model`` (dequantized from ``gguf`` and loaded as ``model_cls``, float32) and
    ``tokenizer`` as a safetensors folder for the next load; ``None`` when the copy is off, too
    large, or cannot be written (a full disk or a read-only cache costs the next load its 20 s,
    never this one's model)."""
    params = list(model.parameters())
    if not cache_enabled() or any(p.dtype != torch.float32 for p in params):
        return None
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    if n_bytes > MAX_COPY_BYTES:
        logger.debug("no float copy of %s: %.1f GB is above the %.1f GB kept", gguf, n_bytes / 1e9,
                     MAX_COPY_BYTES / 1e9)
        return None
    source = _source(Path(gguf), model_cls)
    folder = _folder(source, cache_dir)
    try:
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            # Written last, inside the atomic folder: its presence is what cached_copy checks.
            (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    except FileExistsError:  # another process kept it meanwhile
        return folder
    except OSError as err:
        logger.warning("could not keep a float copy of %s in %s (%s); the next load reads the GGUF again",
                       gguf, folder.parent, err)
        return None
    logger.info("kept a float copy of %s in %s (%.0f MB): later loads read it instead of the GGUF",
                Path(gguf).name, folder, n_bytes / 1e6)
    _drop_stale(folder, source)
    return folder


def _drop_stale(folder: Path, source: dict[str, Any]) -> None:
    """Remove the older copies of the same GGUF as ``folder`` (the file replaced, or another
    transformers since): each is half a gigabyte that no load reads again."""
    for other in folder.parent.glob(f"{Path(source['gguf']).stem}-*"):
        try:
            old = json.loads((other / _SOURCE_FILE).read_text())
        except (OSError, ValueError):  # not a finished copy (another process may be writing it)
            continue
        if other != folder and (old["gguf"], old["model_class"]) == (source["gguf"], source["model_class"]):
            shutil.rmtree(other, ignore_errors=True)

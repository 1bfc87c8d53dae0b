"""Calibration and evaluation text, cut into fixed-length token windows.

The default source is embedded: the shortened English Wikipedia dump that ships inside
the ``gensim`` wheel (about 100 articles, ~650k SmolLM2 tokens), so pruning and
perplexity work offline. A local ``.txt`` file and the usual Hugging Face datasets
(``wikitext2``, ``c4``; optional ``datasets`` dependency) are accepted too.

Split convention for a single token stream (embedded corpus, text file): evaluation is
the *last* ``eval_tokens`` tokens cut into ``window``-token windows; calibration windows
start at random positions (seeded ``torch.Generator``) strictly *before* the evaluation
region, so the two never overlap.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mwparserfromhell
import torch

from permsparse.io.atomic import atomic_write_text
from mwparserfromhell.nodes import Argument, Comment, ExternalLink, Heading, HTMLEntity, Tag, Template, Text, Wikilink

__all__ = [
    "TextWindows",
    "embedded_corpus_path",
    "load_wikipedia_articles",
    "clean_wikitext",
    "tokenize_text",
    "split_token_stream",
    "embedded_split",
    "load_text_windows",
    "EMBEDDED_SOURCES",
    "HUB_SOURCES",
]

logger = logging.getLogger(__name__)

_CORPUS_RELPATH = Path("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
_GENSIM_PIP = "pip install --no-deps gensim==4.4.0"

#: Names of the embedded Wikipedia source accepted by :func:`load_text_windows`.
EMBEDDED_SOURCES = frozenset({"wikipedia", "embedded", "wiki"})
#: Hugging Face dataset sources (need the optional ``datasets`` package and network).
HUB_SOURCES = frozenset({"wikitext2", "c4"})

# Bump when the cleaning changes so stale disk caches are not reused.
_CLEANER_VERSION = 1


# ---------------------------------------------------------------------------------------
# Locating the embedded corpus
# ---------------------------------------------------------------------------------------


def embedded_corpus_path() -> Path:
    """Path of the Wikipedia dump inside the installed ``gensim`` package.

    Located through ``importlib.util.find_spec`` only: importing gensim is slow and it was
    installed without its dependencies, so it may not even import.
    """
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _CORPUS_RELPATH
        if candidate.is_file():
            return candidate
    where = ", ".join(locations) if locations else "gensim is not installed"
    raise FileNotFoundError(
        f"embedded Wikipedia corpus {_CORPUS_RELPATH.name} not found ({where}); "
        f"install it with: {_GENSIM_PIP}"
    )


# ---------------------------------------------------------------------------------------
# Wikitext cleaning
# ---------------------------------------------------------------------------------------

# Tags whose content is not prose (citations, maths, tables, galleries, code).
_DROP_TAGS = frozenset(
    {
        "ref", "references", "gallery", "math", "table", "timeline", "imagemap", "score",
        "syntaxhighlight", "source", "noinclude", "includeonly", "chem", "ce", "hiero",
        "nowiki", "pre", "code", "graph", "mapframe", "templatedata",
    }
)
# Link prefixes whose links render no inline text (images, categories). Links to other
# namespaces or sister projects ([[wikt:anarchy|anarchy]]) do show their label inline.
_NON_TEXT_NAMESPACES = frozenset({"file", "image", "media", "category"})
# Interlanguage links such as [[de:Anarchismus]] or [[zh-yue:...]].
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")
# Sister-project prefixes: an unlabelled [[wikt:word]] contributes just "word".
_SISTER = frozenset({"wikt", "wiktionary", "w", "s", "q", "b", "n", "v", "d", "voy", "commons", "species"})
# Trailing sections that are lists of citations/links rather than prose.
_SKIP_SECTIONS = frozenset(
    {
        "references", "external links", "further reading", "see also", "notes", "bibliography",
        "sources", "footnotes", "citations", "notes and references", "references and notes",
        "works cited", "general references", "gallery",
    }
)
_BLOCK_TAGS = frozenset({"p", "li", "dd", "dt", "div", "blockquote", "center"})

# Fallback regexes for markup that mwparserfromhell left as plain text (it gives up on
# malformed or truncated constructs, and the shortened dump cuts some articles mid-markup).
_RE_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_RE_REF_SELF = re.compile(r"<ref\b[^<>]*/>", re.I)
_RE_REF_PAIR = re.compile(r"<ref\b[^<>]*>.*?</ref\s*>", re.I | re.S)
_RE_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_RE_FILE_LINK = re.compile(
    r"\[\[\s*:?\s*(?:file|image|media|category)\s*:[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I
)
_RE_PIPED_LINK = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_RE_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_RE_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_RE_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_RE_EMPHASIS = re.compile(r"'{2,}")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_RE_SPACE_BEFORE_PUNCT = re.compile(r" +([,;.])(?=\s|$)")
_RE_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_RE_RESIDUE_LINE = re.compile(r"^(?:\{\||\|\}|\|-|\||!|(?:category|file|image)\s*:|thumb\|)", re.I)


# Inline templates whose output is prose; every other template (infoboxes, citations,
# navboxes, maintenance tags) is dropped.
_TEMPLATE_FIRST_ARG = frozenset({"nowrap", "nobr", "small", "smaller", "big", "em", "strong", "sic", "nihongo"})
_TEMPLATE_SECOND_ARG = frozenset({"lang", "transl", "transliteration"})


def _template_text(node: Any) -> str:
    """Visible text of the few common inline templates (``{{lang|grc|...}}``, ``{{convert|..}}``)."""
    name = str(node.name).strip().lower().replace("_", " ")

    def arg(i: int) -> str:
        key = str(i)
        if node.has(key):
            return str(node.get(key).value.strip_code()).strip()
        return ""

    if name in _TEMPLATE_FIRST_ARG or name.startswith("lang-"):
        return arg(1)
    if name in _TEMPLATE_SECOND_ARG:
        return arg(2)
    if name in ("convert", "cvt"):
        value, unit = arg(1), arg(2)
        return f"{value} {unit}".strip() if value else ""
    if name in ("circa", "c."):
        return f"c. {arg(1)}".strip()
    if name == "frac":
        parts = [p for p in (arg(1), arg(2), arg(3)) if p]
        return "/".join(parts) if len(parts) < 3 else f"{parts[0]} {parts[1]}/{parts[2]}"
    return ""


def _walk(code: Any, out: list[str]) -> None:
    """Append the visible prose of a parsed wikicode subtree to ``out``.

    A hand-written walk instead of ``Wikicode.strip_code()``: strip_code keeps the text of
    ``<ref>`` citations and of image captions/interlanguage links, which would pollute the
    corpus; removing those nodes first with ``Wikicode.remove`` is ~7x slower.
    """
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Template):
            text = _template_text(node)
            if text:
                out.append(text)
        elif isinstance(node, (Comment, Argument)):
            continue
        elif isinstance(node, Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS:
                continue
            if tag == "br":
                out.append("\n")
                continue
            if node.contents is not None:
                _walk(node.contents, out)
            # Only HTML-style blocks end a line here: a wiki-markup list item ("*", "#")
            # has no contents and its text follows as ordinary nodes up to its own newline.
            if tag in _BLOCK_TAGS and node.contents is not None and not node.wiki_markup:
                out.append("\n")
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            inline = title.startswith(":")  # [[:Category:X]] is a mention, not a tag
            prefix, sep, rest = title.lstrip(":").partition(":")
            prefix = prefix.strip().lower()
            if sep and not inline and (prefix in _NON_TEXT_NAMESPACES or _INTERLANGUAGE.match(prefix)):
                continue
            if node.text is not None:
                _walk(node.text, out)
            elif sep and (prefix in _NON_TEXT_NAMESPACES or _INTERLANGUAGE.match(prefix) or prefix in _SISTER):
                out.append(rest.strip())
            else:
                _walk(node.title, out)
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _walk(node.title, out)
        elif isinstance(node, Heading):
            out.append("\n\n")
            _walk(node.title, out)
            out.append("\n\n")
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        else:  # pragma: no cover - future node types: fall back to the library's stripping
            stripped = node.__strip__(normalize=True, collapse=True, keep_template_params=False)
            if stripped:
                out.append(str(stripped))


_RE_HEADING_LINE = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")


def _drop_sections(wikitext: str) -> str:
    """Drop trailing reference/link sections (``References``, ``External links``...).

    Done on the raw lines, not on parsed headings: an unclosed tag earlier in an article
    makes mwparserfromhell nest the later headings inside it, out of reach of a
    top-level scan.
    """
    kept: list[str] = []
    skip_level: int | None = None
    for line in wikitext.splitlines(keepends=True):
        match = _RE_HEADING_LINE.match(line.strip())
        if match:
            level = len(match.group(1))
            if skip_level is not None and level > skip_level:
                continue  # a subsection of a skipped section
            name = _RE_EMPHASIS.sub("", match.group(2)).strip().lower()
            skip_level = level if name in _SKIP_SECTIONS else None
        if skip_level is None:
            kept.append(line)
    return "".join(kept)


def _tidy(text: str) -> str:
    """Remove markup residue and normalise whitespace, keeping paragraph breaks."""
    text = _RE_COMMENT.sub("", text)
    text = _RE_REF_SELF.sub("", text)
    text = _RE_REF_PAIR.sub("", text)
    for pattern in (_RE_TEMPLATE, _RE_TABLE):  # innermost first, until nothing nests
        while True:
            text, n = pattern.subn("", text)
            if not n:
                break
    text = _RE_FILE_LINK.sub("", text)
    text = _RE_PIPED_LINK.sub(r"\1", text)
    text = _RE_PLAIN_LINK.sub(r"\1", text)
    text = _RE_EXT_LINK.sub(r"\1", text)
    text = _RE_HTML_TAG.sub("", text)
    text = _RE_EMPHASIS.sub("", text)
    text = _RE_MAGIC.sub("", text)

    paragraphs: list[str] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = _RE_SPACES.sub(" ", raw).strip()
        line = _RE_EMPTY_PARENS.sub("", line)
        line = _RE_SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        if line and _RE_RESIDUE_LINE.match(line):
            continue
        if line:
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs)


def clean_wikitext(wikitext: str) -> str:
    """Turn one article's MediaWiki markup into plain prose.

    Templates, citations, tables, images, categories, interlanguage links and trailing
    reference sections are dropped; headings become their own paragraphs.
    """
    out: list[str] = []
    _walk(mwparserfromhell.parse(_drop_sections(wikitext)), out)
    return _tidy("".join(out))


# ---------------------------------------------------------------------------------------
# Reading the dump (with in-process and on-disk caches)
# ---------------------------------------------------------------------------------------


def _iter_main_pages(path: Path):
    """Yield ``(title, wikitext)`` of main-namespace, non-redirect pages of a bz2 dump."""
    with bz2.open(path, "rb") as fh:
        for _event, elem in ET.iterparse(fh, events=("end",)):
            # Tags carry the export namespace, e.g. {http://www.mediawiki.org/xml/export-0.10/}page.
            if elem.tag.rpartition("}")[2] != "page":
                continue
            ns = elem.findtext("{*}ns")
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            is_redirect = elem.find("{*}redirect") is not None or text.lstrip()[:9].upper() == "#REDIRECT"
            elem.clear()  # keep memory flat while streaming
            if ns is not None and ns.strip() == "0" and not is_redirect:
                yield title, text


def _default_cache_dir() -> Path:
    env = os.environ.get("PERMSPARSE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "permsparse"


@functools.lru_cache(maxsize=4)
def _articles_cached(path: str, size: int, mtime_ns: int, cache_dir: str | None) -> tuple[str, ...]:
    """Cleaned articles of ``path``; size/mtime are part of the key so edits invalidate."""
    key = hashlib.sha256(f"{path}|{size}|{mtime_ns}|v{_CLEANER_VERSION}".encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / f"wikipedia-{key}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            payload = json.loads(cache_file.read_text(encoding="utf-8"))
            if payload.get("version") == _CLEANER_VERSION:
                logger.debug("cleaned corpus read from %s", cache_file)
                return tuple(payload["articles"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable corpus cache %s (%s)", cache_file, exc)

    start = time.perf_counter()
    articles = []
    for title, wikitext in _iter_main_pages(Path(path)):
        body = clean_wikitext(wikitext)
        if body:
            articles.append(f"{title}\n\n{body}")
    logger.info("cleaned %d Wikipedia articles from %s in %.1f s", len(articles), path, time.perf_counter() - start)

    if cache_file is not None:
        try:
            atomic_write_text(
                cache_file,
                json.dumps({"version": _CLEANER_VERSION, "source": path, "articles": articles}, ensure_ascii=False),
            )
        except OSError as exc:  # a read-only home must not break loading
            logger.warning("could not write corpus cache %s (%s)", cache_file, exc)
    return tuple(articles)


def load_wikipedia_articles(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_disk_cache: bool = True,
) -> list[str]:
    """Cleaned main-namespace articles of a bz2 MediaWiki XML dump, each prefixed by its title.

    Args:
        path: the dump; default :func:`embedded_corpus_path` (~100 articles).
        cache_dir: where the cleaned text is cached on disk; default
            ``$PERMSPARSE_CACHE_DIR`` or ``~/.cache/permsparse``.
        use_disk_cache: set False to skip the disk cache (the in-process cache stays).

    Cleaning with mwparserfromhell takes a few seconds, hence both caches; the cache key
    includes the dump's size and mtime, so a changed file is re-parsed.
    """
    p = Path(path).expanduser() if path is not None else embedded_corpus_path()
    if not p.is_file():
        raise FileNotFoundError(f"Wikipedia dump not found: {p}")
    stat = p.stat()
    resolved_cache = None
    if use_disk_cache:
        resolved_cache = str(Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir())
    return list(_articles_cached(str(p.resolve()), stat.st_size, stat.st_mtime_ns, resolved_cache))


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
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"text source {source!r} needs the optional 'datasets' package: "
            f"pip install datasets (or pip install 'permsparse[hub]'); "
            f"the embedded corpus ('wikipedia') or a local .txt file work without it"
        ) from exc
    return datasets


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
        ValueError: a text too short for two windows, or an unknown source name.
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
            text = path.read_text(encoding="utf-8")
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

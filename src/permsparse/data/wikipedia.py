"""The embedded Wikipedia text: a MediaWiki dump turned into clean prose, cached.

The default calibration and evaluation text is the shortened English Wikipedia dump that
ships inside the ``gensim`` wheel (about 100 articles; :mod:`permsparse.data.assets`).
:func:`clean_wikitext` turns an article's markup into plain prose (templates, citations,
tables, images, categories and trailing reference sections dropped);
:func:`load_wikipedia_articles` streams a dump and caches the cleaned articles in memory
and on disk. Cleaning needs the optional ``mwparserfromhell`` (``permsparse[wikipedia]``).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

from permsparse._optional import require
from permsparse.data.assets import default_cache_dir, embedded_corpus_path
from permsparse.io.atomic import atomic_write_text

__all__ = ["clean_wikitext", "load_wikipedia_articles"]

logger = logging.getLogger(__name__)

# Bump when the cleaning changes so stale disk caches are not reused.
_CLEANER_VERSION = 1


def _mw() -> Any:
    """The ``mwparserfromhell`` module (optional extra ``wikipedia``)."""
    return require("mwparserfromhell", "wikipedia", "cleaning the Wikipedia dump")


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
    nodes = _mw().nodes
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Template):
            text = _template_text(node)
            if text:
                out.append(text)
        elif isinstance(node, (nodes.Comment, nodes.Argument)):
            continue
        elif isinstance(node, nodes.Tag):
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
        elif isinstance(node, nodes.Wikilink):
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
        elif isinstance(node, nodes.ExternalLink):
            if node.title is not None:
                _walk(node.title, out)
        elif isinstance(node, nodes.Heading):
            out.append("\n\n")
            _walk(node.title, out)
            out.append("\n\n")
        elif isinstance(node, nodes.HTMLEntity):
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
    _walk(_mw().parse(_drop_sections(wikitext)), out)
    return _tidy("".join(out))


# ---------------------------------------------------------------------------------------
# Reading the dump (with in-process and on-disk caches)
# ---------------------------------------------------------------------------------------


def _iter_main_pages(path: Path) -> Iterator[tuple[str, str]]:
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
        resolved_cache = str(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    return list(_articles_cached(str(p.resolve()), stat.st_size, stat.st_mtime_ns, resolved_cache))

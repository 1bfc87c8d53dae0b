"""Recipes: ``permsparse prune``'s options in a YAML or JSON file.

A recipe is the nested schema of :meth:`permsparse.config.PruneConfig.to_json` (``learn``,
``data`` and ``run`` sections), or flat keys named as the fields or as the flags (dashes
or underscores: ``n-calib``, ``independent``), or a ``permsparse.json`` of an earlier run,
whose recorded ``config`` replays it. ``model`` may name the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from permsparse.cli.options import RETIRED_FLAGS, Option, UsageError, options

__all__ = ["load_recipe", "flatten"]

log = logging.getLogger("permsparse")

_YAML_EXTRA = "pip install 'permsparse[yaml]'"
#: Settings of the run that wrote a plan, not of what it computed: a replay must not reuse them
#: (it would write its training state into the earlier run's checkpoint).
_NOT_REPLAYED = ("checkpoint_path",)


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"cannot parse recipe {path}: {err}") from err
    try:
        import yaml
    except ImportError:
        raise UsageError(f"reading the YAML recipe {path} needs pyyaml: {_YAML_EXTRA} (or write it as .json)") from None
    try:
        return yaml.load(text, Loader=_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        # YAML errors span several lines (with a caret drawing); keep the problem and where.
        mark = getattr(err, "problem_mark", None)
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"cannot parse recipe {path}: {what}{where}") from err


_NM = re.compile(r"^[0-9]+:[0-9]+$")


def _loader(yaml: Any) -> type:
    """PyYAML's safe loader, except that ``2:4`` is the text "2:4": YAML 1.1 reads an unquoted
    ``2:4`` as the base-60 integer 124, never what a recipe means."""

    class Loader(yaml.SafeLoader):
        """SafeLoader with the resolvers below (a subclass, so PyYAML's own stays untouched)."""

    Loader.yaml_implicit_resolvers = {
        ch: ([("tag:yaml.org,2002:str", _NM)] if ch.isdigit() else []) + list(resolvers)
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return Loader


def load_recipe(path: "str | Path") -> dict[str, Any]:
    """The options a recipe file sets, by field name (and ``model`` when it names one).

    Raises:
        UsageError: no such file, a parse error, not a mapping, an unknown option (named),
            a value that does not parse, or YAML without pyyaml installed.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe file not found: {path}")
    data = _parse(p)
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must hold a mapping of option: value")
    if "format_version" in data and "sites" in data:  # a permsparse.json: replay its run
        data = data.get("config")
        if not isinstance(data, dict):
            raise UsageError(f"{path} records no config to replay (written by an export without one)")
        learn = data.get("learn")
        if isinstance(learn, dict):
            for k in _NOT_REPLAYED:
                if learn.get(k) is not None:
                    log.info("replaying %s without its %s %s", path, k, learn[k])
            data = {**data, "learn": {k: v for k, v in learn.items() if k not in _NOT_REPLAYED}}
    try:
        return flatten(data)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise UsageError(f"recipe {path}: {err}") from None


def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Nested sections and flag-named keys to ``{field name: value}`` (strings parsed as the
    flags parse them).

    Raises:
        ValueError: unknown keys (named, with dashes as underscores).
        argparse.ArgumentTypeError: a value that does not parse.
    """
    opts = options()
    by_dest = {o.dest: o for o in opts.values()}
    sections = {o.section for o in opts.values()} - {None}
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in sections and isinstance(value, Mapping):
            for sub, sub_value in value.items():
                sub_name = str(sub).replace("-", "_")
                opt = opts.get(sub_name)
                if opt is None or opt.section != name:
                    unknown.append(f"{name}.{sub_name}")
                else:
                    out[sub_name] = _value(opt, sub_value)
        elif name == "model":
            out[name] = value
        elif name == "pattern" and not isinstance(value, str):
            raise ValueError(f"pattern must be text such as \"2:4\", got {value!r} (in YAML, quote it: '2:4')")
        elif name in opts:
            out[name] = _value(opts[name], value)
        elif name in RETIRED_FLAGS:  # a flag of earlier releases; ``false`` sets the other value
            field, set_to = RETIRED_FLAGS[name]
            out[field] = set_to if value else not set_to
        elif name in by_dest:  # a flag's name: --sync, --no-bf16, --checkpoint
            opt = by_dest[name]
            out[opt.name] = (not value) if opt.inverted else _value(opt, value)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}")
    return out


def _value(opt: Option, value: Any) -> Any:
    """A recipe's value as the flag would give it: text parsed (``"0.8,0.9"``, ``"auto"``,
    ``"off"``), a YAML ``off`` (False) for an option that takes a value read as ``"off"``."""
    if opt.parse is None or opt.parse is str:
        return value
    if isinstance(value, bool):
        value = "off" if not value else "on"
    if isinstance(value, str):
        try:
            return opt.parse(value)
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"{opt.name}: {err}") from None
    return value

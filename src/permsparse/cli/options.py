"""``permsparse prune``'s options, generated from the dataclasses of :mod:`permsparse.config`.

Each field is one option: the flag is the field name with dashes (or the field's
``metadata["flag"]``), the help text and choices come from its metadata, and the help
shows the dataclass default (and the defaults of what is pruned, when they differ).
Flags are parsed with ``default=SUPPRESS``, so that a run can tell what the user set:
dataclass defaults < defaults of what is pruned < a recipe < the flags.
"""

from __future__ import annotations

import argparse
import functools
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, Callable, Mapping

from permsparse.config import (
    CLASSIFIER_DEFAULTS,
    DIGITS_PRUNE,
    DataConfig,
    LearnConfig,
    PruneConfig,
    RunConfig,
    workload_defaults,
)

__all__ = ["UsageError", "Option", "options", "add_options", "given_values", "build_configs", "resolve"]

#: The dataclasses whose fields are options, by section of the nested schema (``None``: top level).
SECTIONS: tuple[tuple[str | None, type, str], ...] = (
    (None, PruneConfig, "pruning"),
    ("learn", LearnConfig, "trainer (--permutation learned)"),
    ("data", DataConfig, "calibration and evaluation data"),
    ("run", RunConfig, "output"),
)
_PROFILES = (("image classifiers", CLASSIFIER_DEFAULTS), ("classifiers on digits", DIGITS_PRUNE))


class UsageError(Exception):
    """An error in what the user gave: reported in one line, exit status 2."""


@dataclass(frozen=True)
class Option:
    """One field of a config dataclass, as a command-line option."""

    name: str  # the field name (unique over the sections)
    section: str | None
    flag: str | None  # "--pattern"; None: no flag (recipes only)
    default: Any
    help: str
    choices: tuple | None
    parse: Callable[[str], Any] | None  # text -> value; None: a flag without a value (bool)

    @property
    def dest(self) -> str:
        """The key of the flag in a recipe written as flags (``sync``, ``no_bf16``)."""
        return self.flag[2:].replace("-", "_") if self.flag else self.name

    @property
    def inverted(self) -> bool:
        """A flag that switches a field that defaults to True off (``--no-reconstruct`` sets reconstruct False)."""
        return self.parse is None and self.default is True


def _int_or_auto(text: str) -> "int | str":
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _decays(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated decays such as 0.8,0.9, got {text!r}") from None
    return tuple(v for v in vals if v != 0.0)  # 0: none


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str) -> Any:
        if str(text).strip().lower() in ("off", "none"):
            return None
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {parse.__name__} or 'off', got {text!r}") from None

    return parse_or_none


def _parser_of(hint: Any) -> Callable[[str], Any] | None:
    """The text parser of a field's type; ``None`` for a bool (a flag without a value)."""
    if hint is bool:
        return None
    if typing.get_origin(hint) is tuple:
        return _decays
    args = typing.get_args(hint)  # the members of a union
    members = [a for a in args if a is not type(None)] or [hint]
    if set(members) == {int, str}:
        return _int_or_auto
    base = members[0]
    if len(members) == 1 and base is str:
        return str
    if len(members) == 1 and base in (int, float):
        return _optional(base) if type(None) in args else base
    raise TypeError(f"no command-line parser for {hint!r}")


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


@functools.lru_cache(maxsize=None)
def options() -> dict[str, Option]:
    """Every field of the :data:`SECTIONS` dataclasses, by field name."""
    out: dict[str, Option] = {}
    for section, cls, _ in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if is_dataclass(hints[f.name]):
                continue  # a nested section (PruneConfig.learn) has its own options
            if f.name in out:
                raise TypeError(f"option {f.name} is a field of two config sections")
            meta = f.metadata
            flag = None if meta.get("cli", True) is False else "--" + meta.get("flag", f.name).replace("_", "-")
            out[f.name] = Option(f.name, section, flag, _default(f), meta.get("help", ""), meta.get("choices"),
                                 _parser_of(hints[f.name]))
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def help_text(opt: Option) -> str:
    """The option's help with its default, e.g. ``windows per step [default: 4; image classifiers: 32]``."""
    if opt.parse is None:
        shown = "default: off"
    else:
        shown = f"default: {_shown(opt.default)}"
        shown += "".join(f"; {label}: {_shown(d[opt.name])}" for label, d in _PROFILES if opt.name in d)
    return f"{opt.help} [{shown}]".replace("%", "%%")


#: Flags of earlier releases -> the field and the value they set. ``--independent`` asked for one
#: permutation per layer when shared sites were the default; it is the default now.
RETIRED_FLAGS: dict[str, tuple[str, Any]] = {"independent": ("sync", False)}


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field with a flag, in one argument group per section."""
    by_section = {section: parser.add_argument_group(title) for section, _, title in SECTIONS}
    for opt in options().values():
        if opt.flag is None:
            continue
        group = by_section[opt.section]
        if opt.parse is None:
            action = "store_false" if opt.inverted else "store_true"
            group.add_argument(opt.flag, dest=opt.name, action=action, default=argparse.SUPPRESS, help=help_text(opt))
        else:
            group.add_argument(opt.flag, dest=opt.name, type=opt.parse, choices=opt.choices,
                               metavar=None if opt.choices else opt.dest.upper(), default=argparse.SUPPRESS,
                               help=help_text(opt))
    for flag, (name, value) in RETIRED_FLAGS.items():  # hidden: old commands keep working
        parser.add_argument(f"--{flag}", dest=name, action="store_const", const=value, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by flags (the others are absent: ``default=SUPPRESS``)."""
    return {name: getattr(args, name) for name in options() if hasattr(args, name)}


def build_configs(values: Mapping[str, Any]) -> tuple[PruneConfig, DataConfig, RunConfig]:
    """The configs of a run from field values (fields absent take the dataclass defaults).

    Raises:
        ValueError: a bad value (the dataclasses validate), or an unknown field.
    """
    opts = options()
    unknown = sorted(set(values) - set(opts))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}")
    part: dict[str | None, dict[str, Any]] = {section: {} for section, _, _ in SECTIONS}
    for name, value in values.items():
        part[opts[name].section][name] = value
    learn = LearnConfig(**part["learn"])
    return PruneConfig(**part[None], learn=learn), DataConfig(**part["data"]), RunConfig(**part["run"])


def resolve(task: str, recipe: Mapping[str, Any], flags: Mapping[str, Any]) -> tuple[PruneConfig, DataConfig,
                                                                                      RunConfig]:
    """The configs of a run on a model of ``task``: the dataclass defaults, under the defaults
    of what is pruned (:func:`permsparse.config.workload_defaults`), under the recipe, under
    the flags."""
    user = {**recipe, **flags}
    return build_configs({**workload_defaults(task, user.get("calib")), **user})

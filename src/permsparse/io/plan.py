"""The plan schema: ``permsparse.json``, what it holds and how it is checked.

A plan names the pattern, score and groups of a pruned model, every permutation site
with its permutation, the metrics, the configuration of the run (in the schema a recipe
is read in: :meth:`permsparse.config.PruneConfig.to_json`) and the versions that made it.
:func:`build_plan` makes the dict, :func:`read_plan` reads and validates one field by
field, :func:`check_plan` checks one against a model's weights.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from permsparse.core.pattern import NMPattern, count_violations, parse_pattern, pattern_str
from permsparse.core.permutation import Permutation
from permsparse.models.sites import PAYMENTS, Site, get_module

__all__ = ["FORMAT_VERSION", "PLAN_FILE", "build_plan", "read_plan", "check_plan", "check_perm_for_site"]

FORMAT_VERSION = 1
PLAN_FILE = "permsparse.json"
_REQUIRED_KEYS = ("format_version", "pattern", "score", "groups", "sites")
_SITE_KEYS = ("name", "consumers", "d_in", "payment", "permutation")


def _versions() -> dict[str, str]:
    import transformers

    from permsparse._version import __version__

    return {"permsparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_perm_for_site(site: Site, perm: Permutation, groups: int) -> Permutation:
    """Raise ``ValueError`` (naming the site) unless ``perm`` fits ``site`` and the plan's groups."""
    where = f"site {site.name} ({', '.join(site.consumers)})"
    if perm.d_in != site.d_in:
        raise ValueError(f"{where}: permutation has {perm.d_in} channels, the site reads {site.d_in}")
    g, k = site.structure(groups)  # ValueError naming the site when groups do not fit
    if not torch.equal(perm.indices // k, torch.arange(site.d_in) // k):
        what = "head" if site.head_tied else "permutation group"
        raise ValueError(f"{where}: permutation moves channels across the {g} {what}s of {k} channels")
    if site.head_tied:
        perm = Permutation(perm.indices, g)
        try:
            site.untie(perm, groups)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return perm


def build_plan(
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    pattern: "str | NMPattern | None",
    score: str,
    groups: int,
    metrics: Mapping[str, Any] | None,
    model: nn.Module | None,
    config: Mapping[str, Any] | None = None,
) -> dict:
    """The ``permsparse.json`` dict of a plan: every site with its permutation (the identity
    where ``perms`` has none), checked against the sites and ``groups``; ``config``: the run's
    configuration (:meth:`permsparse.config.PruneConfig.to_json`), recorded as ``config``.

    Raises:
        ValueError: duplicate site names, permutations for unknown sites, or a permutation
            or group structure that does not fit its site (the message names the site).
    """
    pat = parse_pattern(pattern)
    names = [s.name for s in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate site names: {', '.join(dup)}")
    unknown = sorted(set(perms) - set(names))
    if unknown:
        raise ValueError(f"permutations given for unknown sites: {', '.join(unknown)}")
    entries = []
    for site in sites:
        if pat is not None:
            site.structure(groups, pat)  # ValueError naming the site if k is not a multiple of M
        perm = perms.get(site.name)
        if perm is None:
            try:
                g, _ = site.structure(groups)
            except ValueError:
                g = 1
            perm = Permutation.identity(site.d_in, g)
        else:
            perm = check_perm_for_site(site, perm, groups)
        entry = site.to_json()
        entry["permutation"] = perm.to_list()
        entry["permutation_groups"] = perm.groups
        entries.append(entry)
    model_config = getattr(model, "config", None)
    archs = getattr(model_config, "architectures", None) or ([type(model).__name__] if model is not None else [])
    data = {
        "format_version": FORMAT_VERSION,
        "pattern": pattern_str(pat),
        "score": score,
        "groups": int(groups),
        "model_type": getattr(model_config, "model_type", None),
        "architectures": list(archs),
        "sites": entries,
        "metrics": dict(metrics) if metrics is not None else {},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if config is not None:
        data["config"] = dict(config)
    return data


def read_plan(path: "str | os.PathLike[str]") -> tuple[dict, list[Site], dict[str, Permutation]]:
    """Read and validate ``permsparse.json`` of an export folder (or the file itself).

    Returns:
        ``(meta, sites, perms)``: ``meta`` is the JSON without its ``sites``; ``perms``
        maps every site name to its permutation (identities included).

    Raises:
        FileNotFoundError: no ``permsparse.json``.
        ValueError: unparsable JSON, missing keys, unsupported format version, or a
            permutation that is not a valid permutation for its site (the message names
            the site and its layers).
    """
    file, data = _read_json(path)
    pattern, groups = _read_header(file, data)
    sites: list[Site] = []
    perms: dict[str, Permutation] = {}
    seen_consumers: dict[str, str] = {}
    for i, entry in enumerate(data["sites"]):
        site, perm = _read_site(file, i, entry, pattern, groups)
        if site.name in perms:
            raise ValueError(f"{file}: site {site.name} ({', '.join(site.consumers)}) appears twice")
        for c in site.consumers:
            if c in seen_consumers:
                raise ValueError(f"{file}: layer {c} belongs to two sites, {seen_consumers[c]} and {site.name}")
            seen_consumers[c] = site.name
        sites.append(site)
        perms[site.name] = perm
    meta = {k: v for k, v in data.items() if k != "sites"}
    return meta, sites, perms


def _read_json(path: "str | os.PathLike[str]") -> tuple[Path, dict]:
    p = Path(path)
    file = p / PLAN_FILE if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"{p} is not a permsparse export: {PLAN_FILE} is missing")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return file, data


def _read_header(file: Path, data: dict) -> "tuple[NMPattern | None, int]":
    """The plan-wide fields: keys present, format version, pattern, groups, a site list."""
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{file}: missing keys {', '.join(missing)}")
    version = data["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{file}: unsupported format_version {version!r} (this permsparse reads version {FORMAT_VERSION})"
        )
    try:
        pattern = parse_pattern(data["pattern"])
    except ValueError as err:
        raise ValueError(f"{file}: bad pattern: {err}") from None
    groups = data["groups"]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{file}: groups must be a positive integer, got {groups!r}")
    if not isinstance(data["sites"], list):
        raise ValueError(f"{file}: 'sites' must be a list")
    return pattern, groups


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_site_fields(entry: dict) -> None:
    """Every field of a site entry has its type and range (``ValueError`` naming the field),
    so that a tampered plan fails here in words, not later as an arithmetic error."""
    if not _is_name(entry["name"]):
        raise ValueError(f"name must be a non-empty string, got {entry['name']!r}")
    consumers = entry["consumers"]
    if not isinstance(consumers, list) or not consumers or not all(_is_name(c) for c in consumers):
        raise ValueError(f"consumers must be a non-empty list of layer names, got {consumers!r}")
    if len(set(consumers)) != len(consumers):
        raise ValueError(f"consumers name a layer twice: {consumers!r}")
    d_in = entry["d_in"]
    if not _is_int(d_in, 1):
        raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
    if entry["payment"] not in PAYMENTS:
        raise ValueError(f"payment must be one of {', '.join(PAYMENTS)}, got {entry['payment']!r}")
    norm = entry.get("norm")
    if norm is not None and not _is_name(norm):
        raise ValueError(f"norm must be a module name or null, got {norm!r}")
    producers = entry.get("producers", [])
    if not isinstance(producers, list) or not all(
            isinstance(p, list) and len(p) == 2 and _is_name(p[0]) and _is_int(p[1], 0) for p in producers):
        raise ValueError(f"producers must be a list of [module name, row offset >= 0] pairs, got {producers!r}")
    if not isinstance(entry.get("block", ""), str):
        raise ValueError(f"block must be a string, got {entry['block']!r}")
    groups = entry.get("permutation_groups", 1)
    if not _is_int(groups, 1):
        raise ValueError(f"permutation_groups must be a positive integer, got {groups!r}")
    _check_heads(entry, d_in)


def _check_heads(entry: dict, d_in: int) -> None:
    """``head_dim`` divides ``d_in`` and only a fold has one; ``kv_of_head`` maps each of the
    ``d_in / head_dim`` query heads to a KV head, and every KV head ``0..n-1`` has a query head."""
    head_dim, kv = entry.get("head_dim"), entry.get("kv_of_head")
    if head_dim is None:
        if kv is not None:
            raise ValueError("kv_of_head needs head_dim")
        return
    if not _is_int(head_dim, 1) or d_in % head_dim:
        raise ValueError(f"head_dim must be a positive integer that divides d_in={d_in}, got {head_dim!r}")
    if entry["payment"] != "fold":
        raise ValueError(f"head_dim ties heads for a fold through attention; payment is {entry['payment']!r}")
    if kv is None:
        return
    heads = d_in // head_dim
    if not isinstance(kv, list) or len(kv) != heads or not all(_is_int(v, 0) for v in kv):
        raise ValueError(f"kv_of_head must list a KV head index (>= 0) for each of the {heads} query heads, "
                         f"got {kv!r}")
    if set(kv) != set(range(max(kv) + 1)):
        raise ValueError(f"kv_of_head must use every KV head 0..{max(kv)}, got {kv!r}")


def _read_site(file: Path, i: int, entry: Any, pattern: "NMPattern | None", groups: int) -> tuple[Site, Permutation]:
    """One entry of ``sites``: its keys, the site, and a permutation that fits it."""
    label = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
    if not isinstance(entry, dict):
        raise ValueError(f"{file}: site {label} is not a JSON object")
    missing = [k for k in _SITE_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{file}: site {label} is missing keys {', '.join(missing)}")
    try:
        _check_site_fields(entry)
        site = Site.from_json(entry)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{file}: site {label}: {err}") from None
    where = f"site {site.name} ({', '.join(site.consumers)})"
    raw = entry["permutation"]
    if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        raise ValueError(f"{file}: {where}: permutation must be a list of integers")
    if len(raw) != site.d_in:
        raise ValueError(f"{file}: {where}: permutation has length {len(raw)}, the site reads {site.d_in} channels")
    try:
        g, _ = site.structure(groups, pattern)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    try:
        perm = Permutation(torch.tensor(raw, dtype=torch.long), entry.get("permutation_groups", g))
        perm = check_perm_for_site(site, perm, groups)
    except ValueError as err:
        msg = str(err)
        raise ValueError(f"{file}: {msg if msg.startswith('site ') else f'{where}: {msg}'}") from None
    return site, perm


def check_plan(
    model: nn.Module,
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    pattern: "str | NMPattern | None" = None,
    groups: int | None = None,
) -> None:
    """Check a plan against a model in ORIGINAL coordinates; raise ``ValueError`` naming the layer.

    Every consumer exists and reads ``site.d_in`` channels; norms and producers exist and
    producers have the rows the fold permutes; head-tied permutations respect the ties;
    with an N:M ``pattern``, every consumer weight is N:M in its permuted layout.
    """
    pat = parse_pattern(pattern)
    for site in sites:
        perm = perms.get(site.name)
        _check_layers(model, site)
        rows = site.d_in
        if perm is not None and groups is not None:
            perm = check_perm_for_site(site, perm, groups)
        if site.head_tied:
            g, k = site.structure(groups or 1)
            rows = site.free_groups(groups or 1) * k
            if perm is not None:
                try:
                    site.untie(perm, groups or 1)
                except ValueError as err:
                    raise ValueError(f"site {site.name} ({', '.join(site.consumers)}): {err}") from None
        if site.payment == "fold":
            _check_producers(model, site, rows)
        if pat is not None:
            for name in site.consumers:
                w = get_module(model, name).weight.detach()
                stored = perm.apply_to_columns(w) if perm is not None else w
                bad = count_violations(stored, pat)
                if bad:
                    raise ValueError(
                        f"site {site.name}: layer {name} has {bad} blocks violating {pat} in its permuted layout; "
                        f"the weights do not match their permsparse.json"
                    )


def _check_layers(model: nn.Module, site: Site) -> None:
    """The consumers exist and read ``site.d_in`` channels; a gathering norm exists."""
    for name in site.consumers:
        try:
            lin = get_module(model, name)
        except ValueError:
            raise ValueError(f"site {site.name}: layer {name} does not exist in this model") from None
        weight = getattr(lin, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"site {site.name}: layer {name} is not a linear layer (no 2-D weight)")
        if weight.shape[1] != site.d_in:
            raise ValueError(
                f"site {site.name}: layer {name} reads {weight.shape[1]} input channels, the plan says {site.d_in}"
            )
    if site.payment == "gather_norm":
        try:
            norm = get_module(model, site.norm)
        except ValueError:
            raise ValueError(f"site {site.name}: norm {site.norm} does not exist in this model") from None
        weight = getattr(norm, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() != site.d_in:
            raise ValueError(f"site {site.name}: norm {site.norm} has {weight.numel()} channels, the site reads "
                             f"{site.d_in}")


def _check_producers(model: nn.Module, site: Site, rows: int) -> None:
    """A folded site's producers exist and have the ``rows`` output rows the fold permutes."""
    for prod in site.producers:
        try:
            mod = get_module(model, prod.module)
        except ValueError:
            raise ValueError(f"site {site.name}: producer {prod.module} does not exist in this model") from None
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"site {site.name}: producer {prod.module} has no 2-D weight")
        if weight.shape[0] < prod.row_offset + rows:
            raise ValueError(
                f"site {site.name}: producer {prod.module} has {weight.shape[0]} output rows; the fold "
                f"permutes rows {prod.row_offset}..{prod.row_offset + rows - 1}"
            )

"""Export and load pruned models with their permutation plan.

An export is a plain Hugging Face folder that any stock ``AutoModel*.from_pretrained``
loads unchanged (weights in ORIGINAL coordinates, ``W_eff = W ⊙ M[:, π⁻¹]``, stored as
safetensors), plus ``permsparse.json``: the pattern, score, groups, every permutation
site with its permutation, metrics and the versions that made it. :func:`load` reads
such a folder back, checks the plan against the weights and, by default, rewrites the
model into the permuted hardware-aligned form (:func:`permsparse.models.deploy.deploy`).

Writing is atomic: everything goes into a hidden temporary sibling folder,
``permsparse.json`` is written last and fsynced, and only a complete folder is renamed
to its final name. A crash at any point leaves either the previous folder, nothing, or
a hidden ``.{name}.tmp-*`` folder without ``permsparse.json``; never a folder at
``out_dir`` that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from permsparse.core.pattern import UNSTRUCTURED, NMPattern, count_violations, parse_pattern, pattern_str
from permsparse.core.permutation import Permutation
from permsparse.models.sites import Site, get_module

__all__ = [
    "FORMAT_VERSION",
    "PLAN_FILE",
    "atomic_write_text",
    "atomic_write_json",
    "export",
    "read_plan",
    "load",
    "check_plan",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PLAN_FILE = "permsparse.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REQUIRED_KEYS = ("format_version", "pattern", "score", "groups", "sites")
_SITE_KEYS = ("name", "consumers", "d_in", "payment", "permutation")


# -- atomic files --------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
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


@contextlib.contextmanager
def atomic_file(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success fsync it and rename it into place.

    Readers see the old file or the new one, never a partial file; on an exception the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared like any written file
    try:
        yield Path(tmp)
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # the body may have moved or removed it
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (Path, NMPattern, torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: "str | os.PathLike[str]", obj: Any, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``json.dumps(obj)`` (tensors, numpy values, paths allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


# -- helpers -------------------------------------------------------------------------------


def _deployed_modules(model: nn.Module) -> list[str]:
    from permsparse.models.deploy import GatheredOutput, PermutedLinear

    return [n for n, m in model.named_modules() if isinstance(m, (PermutedLinear, GatheredOutput))]


def _versions() -> dict[str, str]:
    import transformers

    from permsparse import __version__

    return {"permsparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _check_perm_for_site(site: Site, perm: Permutation, groups: int) -> Permutation:
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


def _check_model_dir(path: Path) -> None:
    """A Hugging Face folder with ``config.json`` and safetensors weights, or a clear error
    (pickle-only folders are refused without being read)."""
    from permsparse.models.loading import _folder_spec

    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected a permsparse export folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder: it has no config.json")
    _folder_spec(path)  # safetensors present, pickle-only folders refused unread


def _plan(
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    pattern: "str | NMPattern | None",
    score: str,
    groups: int,
    metrics: Mapping[str, Any] | None,
    model: nn.Module | None,
) -> dict:
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
            perm = _check_perm_for_site(site, perm, groups)
        entry = site.to_json()
        entry["permutation"] = perm.to_list()
        entry["permutation_groups"] = perm.groups
        entries.append(entry)
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or ([type(model).__name__] if model is not None else [])
    return {
        "format_version": FORMAT_VERSION,
        "pattern": pattern_str(pat),
        "score": score,
        "groups": int(groups),
        "model_type": getattr(config, "model_type", None),
        "architectures": list(archs),
        "sites": entries,
        "metrics": dict(metrics) if metrics is not None else {},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model holds plain dequantized floats but keeps a quantizer that makes
    ``save_pretrained`` refuse; forget it (the weights are unchanged)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        quantizer.remove_quantization_config(model)
        log.info("dropped the GGUF quantization config before saving (weights are dequantized floats)")


def export(
    model: nn.Module,
    out_dir: "str | os.PathLike[str]",
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    *,
    pattern: "str | NMPattern | None",
    score: str,
    groups: int,
    tokenizer: Any = None,
    metrics: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    config: Mapping[str, Any] | None = None,
    extra_files: "Mapping[str, str | os.PathLike[str]] | None" = None,
) -> Path:
    """Write a pruned model (original coordinates) and its permutation plan to ``out_dir``.

    Args:
        model: a Hugging Face model whose pruned weights are in original coordinates (not
            deployed: :func:`permsparse.models.deploy.deploy` output is refused).
        sites: the sites the plan covers (those pruned to ``pattern``).
        perms: site name → permutation; sites without one are stored with the identity.
        pattern: ``"2:4"``-style N:M pattern, or ``"unstructured50"``.
        score, groups: how the masks were chosen (recorded; ``groups`` also checks the
            permutations' group structure).
        tokenizer: saved beside the model when given (anything with ``save_pretrained``).
        metrics: JSON-serialisable numbers to record.
        overwrite: replace an existing ``out_dir`` (atomically: the old folder is moved
            aside, the new one renamed in, then the old one deleted).
        config: the run's configuration, recorded as ``config`` in ``permsparse.json``.
        extra_files: ``{name in the export: source path}`` copied into the folder (logs...).

    Returns:
        The path of the written folder.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ValueError: a deployed model, a plan that does not fit its sites, or weights
            that are not ``pattern`` in the permuted layout of their site (not pruned).
    """
    out = Path(out_dir).expanduser().absolute()
    deployed = _deployed_modules(model)
    if deployed:
        raise ValueError(
            f"refusing to export a deployed model ({len(deployed)} permuted modules, e.g. {deployed[0]}): "
            f"export writes weights in original coordinates; export the pruned model before deploy()"
        )
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} has no save_pretrained; export needs a Hugging Face model")
    plan = _plan(sites, perms, pattern, score, groups, metrics, model)
    if config is not None:
        plan["config"] = dict(config)
    extras = {}
    for name, src in (extra_files or {}).items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.name == PLAN_FILE:
            raise ValueError(f"extra file name {name!r} must be a relative path inside the export, not {PLAN_FILE}")
        if not Path(src).is_file():
            raise FileNotFoundError(f"extra file {src} (for {name}) does not exist")
        extras[rel] = Path(src)
    # The weights must match the plan: consumers exist with the right widths, and every
    # consumer is N:M in its permuted layout (what load() and deploy() will require).
    check_plan(model, sites, perms, pattern, groups)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; refusing to replace it")
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _drop_gguf_quantizer(model)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the export is an ordinary directory once renamed
    old: Path | None = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for rel, src in extras.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        # The plan goes last: its presence marks a complete export.
        with open(tmp / PLAN_FILE, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(plan, indent=2, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)  # move the old export aside (atomic rename)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)  # put the old one back
                raise
        else:
            os.replace(tmp, out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not any(old.iterdir()):
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("exported %s (%d sites, pattern %s) to %s", type(model).__name__, len(sites), plan["pattern"], out)
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# -- reading the plan ----------------------------------------------------------------------


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

    sites: list[Site] = []
    perms: dict[str, Permutation] = {}
    seen_consumers: dict[str, str] = {}
    for i, entry in enumerate(data["sites"]):
        label = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{file}: site {label} is not a JSON object")
        missing = [k for k in _SITE_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{file}: site {label} is missing keys {', '.join(missing)}")
        try:
            site = Site.from_json(entry)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{file}: site {label}: {err}") from None
        where = f"site {site.name} ({', '.join(site.consumers)})"
        if site.name in perms:
            raise ValueError(f"{file}: {where} appears twice")
        for c in site.consumers:
            if c in seen_consumers:
                raise ValueError(f"{file}: layer {c} belongs to two sites, {seen_consumers[c]} and {site.name}")
            seen_consumers[c] = site.name
        raw = entry["permutation"]
        if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            raise ValueError(f"{file}: {where}: permutation must be a list of integers")
        if len(raw) != site.d_in:
            raise ValueError(f"{file}: {where}: permutation has length {len(raw)}, the site reads {site.d_in} channels")
        try:
            g, _ = site.structure(groups, pattern)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
        perm_groups = entry.get("permutation_groups", g)
        try:
            perm = Permutation(torch.tensor(raw, dtype=torch.long), perm_groups)
            perm = _check_perm_for_site(site, perm, groups)
        except ValueError as err:
            msg = str(err)
            raise ValueError(f"{file}: {msg if msg.startswith('site ') else f'{where}: {msg}'}") from None
        sites.append(site)
        perms[site.name] = perm
    meta = {k: v for k, v in data.items() if k != "sites"}
    return meta, sites, perms


# -- checking a plan against weights, loading ------------------------------------------------


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
                get_module(model, site.norm)
            except ValueError:
                raise ValueError(f"site {site.name}: norm {site.norm} does not exist in this model") from None
        rows = site.d_in
        if perm is not None and groups is not None:
            perm = _check_perm_for_site(site, perm, groups)
        if site.head_tied:
            g, k = site.structure(groups or 1)
            rows = site.free_groups(groups or 1) * k
            if perm is not None:
                try:
                    site.untie(perm, groups or 1)
                except ValueError as err:
                    raise ValueError(f"site {site.name} ({', '.join(site.consumers)}): {err}") from None
        if site.payment == "fold":
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


def _model_class(config: Any, task: str | None):
    import transformers

    if task is not None:
        from permsparse.models.loading import TASKS

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
        return getattr(transformers, TASKS[task])
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)  # built-in classes only: never remote code
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    archs = " ".join(getattr(config, "architectures", None) or [])
    if archs.endswith("ForCausalLM"):
        return transformers.AutoModelForCausalLM
    if archs.endswith("ForImageClassification"):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def load(
    path: "str | os.PathLike[str]",
    deploy: bool = True,
    task: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Load an export written by :func:`export`, check its plan against its weights and
    (``deploy=True``) rewrite it into the permuted hardware-aligned form.

    Args:
        path: the export folder.
        deploy: apply :func:`permsparse.models.deploy.deploy`; otherwise the model stays in
            original coordinates (what a stock loader gives).
        task: force the model class (``"causal-lm"``, ``"image-classification"``,
            ``"encoder"``, ``"masked-lm"``); by default ``config.architectures`` decides.
        dtype: parameter dtype.

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: no such folder, or no ``permsparse.json``.
        ValueError: not a model folder, pickle-only weights (never unpickled), or a plan
            that does not match the weights (the message names the site and layer).
    """
    import transformers

    from permsparse.models.deploy import deploy as _deploy
    from permsparse.models.deploy import deployed_violations

    root = Path(path).expanduser()
    _check_model_dir(root)
    meta, sites, perms = read_plan(root)
    config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    cls = _model_class(config, task)
    model = cls.from_pretrained(root, dtype=dtype, use_safetensors=True, local_files_only=True)
    model.eval()
    groups = meta["groups"]
    pattern = parse_pattern(meta["pattern"])
    # Violations are checked after deploy in the stored layout when deploying.
    check_plan(model, sites, perms, None if deploy else pattern, groups)
    if deploy:
        _deploy(model, sites, perms)
        if pattern is not None:
            bad = {name: n for name, n in deployed_violations(model, sites, pattern).items() if n}
            if bad:
                worst = max(bad, key=bad.get)
                raise ValueError(
                    f"{root}: after deploying, {len(bad)} layers violate {pattern}, e.g. {worst} with "
                    f"{bad[worst]} violating blocks; the weights do not match their {PLAN_FILE}"
                )
    model.eval()
    return model

"""Export and load pruned models with their permutation plan.

An export is a plain Hugging Face folder that any stock ``AutoModel*.from_pretrained``
loads unchanged (weights in ORIGINAL coordinates, ``W_eff = W ⊙ M[:, π⁻¹]``, stored as
safetensors), plus ``permsparse.json`` (:mod:`permsparse.io.plan`): the pattern, score,
groups, every permutation site with its permutation, metrics, the run's configuration and
the versions that made it. :func:`load` reads such a folder back, checks the plan against
the weights and, by default, rewrites the model into the permuted hardware-aligned form
(:func:`permsparse.models.deploy.deploy`).

Writing is atomic (:func:`permsparse.io.atomic.atomic_dir`): everything goes into a hidden
temporary sibling folder, ``permsparse.json`` is written last, and only a complete folder
is renamed to its final name. A crash at any point leaves either the previous folder,
nothing, or a hidden ``.{name}.tmp-*`` folder without ``permsparse.json``; never a folder
at ``out_dir`` that looks complete but is not.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from permsparse.core.pattern import NMPattern, parse_pattern
from permsparse.core.permutation import Permutation
from permsparse.io.atomic import atomic_dir, atomic_write_json, fsync_tree
from permsparse.io.outputs import check_output_dir, protected_paths
from permsparse.io.plan import PLAN_FILE, build_plan, check_plan, read_plan
from permsparse.models.integrity import check_config_json, check_model_folder
from permsparse.models.loading import drop_gguf_quantizer, folder_spec, model_class
from permsparse.models.sites import Site

__all__ = ["export", "load", "from_pretrained"]

log = logging.getLogger(__name__)


def _deployed_modules(model: nn.Module) -> list[str]:
    from permsparse.models.deploy import GatheredOutput, PermutedLinear

    return [n for n, m in model.named_modules() if isinstance(m, (PermutedLinear, GatheredOutput))]


def _check_model_dir(path: Path) -> None:
    """A Hugging Face folder with ``config.json`` and safetensors weights, or a clear error
    (pickle-only folders are refused without being read)."""
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected a permsparse export folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder: it has no config.json")
    folder_spec(path)  # safetensors present, pickle-only folders refused unread


def _extra_files(extra_files: "Mapping[str, str | os.PathLike[str]] | None") -> dict[Path, Path]:
    extras = {}
    for name, src in (extra_files or {}).items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.name == PLAN_FILE:
            raise ValueError(f"extra file name {name!r} must be a relative path inside the export, not {PLAN_FILE}")
        if not Path(src).is_file():
            raise FileNotFoundError(f"extra file {src} (for {name}) does not exist")
        extras[rel] = Path(src)
    return extras


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
        overwrite: replace an existing ``out_dir`` that holds a previous export and nothing
            else (atomically: the old folder is moved aside, the new one renamed in, then the
            old one deleted). An empty ``out_dir`` is used without it; a folder of other
            files, the model's own folder and the current folder are never replaced
            (:mod:`permsparse.io.outputs`).
        config: the run's configuration, recorded as ``config`` in ``permsparse.json``.
        extra_files: ``{name in the export: source path}`` copied into the folder (logs...).

    Returns:
        The path of the written folder.

    Raises:
        FileExistsError: ``out_dir`` holds a previous export and ``overwrite`` is false.
        ValueError: a deployed model, a plan that does not fit its sites, weights that are
            not ``pattern`` in the permuted layout of their site (not pruned), or an
            ``out_dir`` that must not be written (see ``overwrite``).
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
    plan = build_plan(sites, perms, pattern, score, groups, metrics, model, config)
    extras = _extra_files(extra_files)
    # The weights must match the plan: consumers exist with the right widths, and every
    # consumer is N:M in its permuted layout (what load() and deploy() will require).
    check_plan(model, sites, perms, pattern, groups)
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    protect = protected_paths(source)
    check_output_dir(out, overwrite, protect)
    drop_gguf_quantizer(model)
    # An empty folder is used without overwrite (it is checked again once the export is written).
    with atomic_dir(out, overwrite=overwrite or out.is_dir()) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for rel, src in extras.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        fsync_tree(tmp)
        # What this export holds: a later overwrite replaces a folder of these files only.
        plan["files"] = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / PLAN_FILE, plan)  # last: its presence marks a complete export
        check_output_dir(out, overwrite, protect)  # the folder may have filled while this one was written
    log.info("exported %s (%d sites, pattern %s) to %s", type(model).__name__, len(sites), plan["pattern"], out)
    return out


def load(
    path: "str | os.PathLike[str]",
    deploy: bool = True,
    task: str | None = None,
    dtype: "torch.dtype | str" = torch.float32,
    device: "str | torch.device | None" = None,
    compile: "bool | str" = False,
    verify: bool = True,
) -> nn.Module:
    """Load an export written by :func:`export`, check its plan against its weights and
    (``deploy=True``) rewrite it into the permuted hardware-aligned form.

    The plan is validated field by field, against the model's layers and shapes, and once by
    what it computes: the stock model and the model with the plan deployed must give the same
    outputs on one small random input (:mod:`permsparse.io.verify`; ``verify=False`` skips
    that forward pass, e.g. for a model too large to run on the loading device).

    Args:
        path: the export folder.
        deploy: apply :func:`permsparse.models.deploy.deploy`; otherwise the model stays in
            original coordinates (what a stock loader gives).
        task: force the model class (``"causal-lm"``, ``"image-classification"``,
            ``"encoder"``, ``"masked-lm"``); by default ``config.architectures`` decides.
        dtype: parameter dtype; ``"auto"``: the checkpoint's (as in transformers).
        device: where the model is moved once loaded (``None``: it stays on the CPU).
        compile: the fast CUDA model (:func:`permsparse.models.fast.accelerate`): 2:4 layers on
            the cuSPARSELt kernels with a dense fallback where 2:4 loses, a static KV cache for
            ``generate``, and ``torch.compile(mode="reduce-overhead")`` (``True``), CUDA graphs
            only (``"cudagraphs"``) or another ``torch.compile`` mode. Needs ``deploy=True``,
            a CUDA ``device`` and fp16/bf16 (docs/deploy.md).

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: no such folder, or no ``permsparse.json``.
        ValueError: not a model folder, pickle-only weights (never unpickled), a plan
            that does not match the weights (the message names the site and layer), or
            one that does not compute what the stock model computes
            (:class:`permsparse.io.verify.PlanMismatchError`).
    """
    import transformers

    from permsparse.io.verify import check_plan_computes
    from permsparse.models.deploy import deploy as _deploy

    root = Path(path).expanduser()
    _check_model_dir(root)
    meta, sites, perms = read_plan(root)
    check_config_json(root)
    config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    cls = model_class(config, task)
    check_model_folder(root, cls)  # truncated weights or a config of another model: one line
    model = cls.from_pretrained(root, dtype=dtype, use_safetensors=True, local_files_only=True)
    model.eval()
    groups = meta["groups"]
    pattern = parse_pattern(meta["pattern"])
    # Violations are checked after deploy in the stored layout when deploying.
    where = f"{root / PLAN_FILE}"
    try:
        check_plan(model, sites, perms, None if deploy else pattern, groups)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if verify:
        check_plan_computes(model, sites, perms, keep_deployed=deploy, where=where)
    elif deploy:
        _deploy(model, sites, perms)
    if deploy and pattern is not None:
        _check_deployed_pattern(model, sites, pattern, root)
    if device is not None:
        model.to(device)
    model.eval()
    if compile is not False:
        from permsparse.models.fast import accelerate

        accelerate(model, sites, compile=compile, pattern=pattern)
    return model


def _check_deployed_pattern(model: nn.Module, sites, pattern, root: Path) -> None:
    """The deployed (stored-layout) weights are N:M, or the load is refused naming the worst layer."""
    from permsparse.models.deploy import deployed_violations

    bad = {name: n for name, n in deployed_violations(model, sites, pattern).items() if n}
    if bad:
        worst = max(bad, key=bad.get)
        raise ValueError(
            f"{root}: after deploying, {len(bad)} layers violate {pattern}, e.g. {worst} with "
            f"{bad[worst]} violating blocks; the weights do not match their {PLAN_FILE}"
        )


def from_pretrained(
    path: "str | os.PathLike[str]",
    deploy: bool = False,
    dtype: "torch.dtype | str" = "auto",
    device: "str | torch.device | None" = None,
    task: str | None = None,
    compile: "bool | str" = False,
) -> nn.Module:
    """A pruned model saved by :meth:`permsparse.PruneResult.save_pretrained` (or
    :func:`export`), in transformers' habits: the checkpoint's dtype by default, and in
    original coordinates unless ``deploy=True`` (the permuted hardware-aligned form);
    ``deploy=True, device="cuda", compile=True`` is the fast model (docs/deploy.md).
    :func:`load` with these defaults; see it for the checks and errors."""
    return load(path, deploy=deploy, task=task, dtype=dtype, device=device, compile=compile)

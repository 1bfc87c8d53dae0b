"""Is a model folder whole? One clear line for each way it is not, before transformers reads it.

transformers meets a corrupt ``config.json``, a truncated ``*.safetensors`` file or weights of
other shapes than the config says with an ``OSError``, a safetensors error or a multi-line
load report; :func:`check_model_folder` finds each of these first, reading only JSON and the
safetensors headers, and names the file. :func:`check_finite_weights` names the first layer
whose weights hold NaN or inf (a bad conversion, a diverged fine-tune), which would otherwise
surface much later as a score that cannot be masked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["check_config_json", "check_safetensors", "check_weight_shapes", "check_model_folder",
           "check_finite_weights"]

log = logging.getLogger(__name__)


def check_config_json(folder: "str | Path") -> dict:
    """The parsed ``config.json`` of ``folder``; ``ValueError`` naming the file and the place
    where it stops being JSON."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"restore the model's config.json") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; restore the model's config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(folder: "str | Path") -> dict[str, tuple[Path, list[int]]]:
    """Open the header of every ``*.safetensors`` file of ``folder`` (and the shards its index
    names); returns ``{tensor name: (file, shape)}``.

    Raises:
        ValueError: a truncated or corrupt file, or a shard the index names that is missing.
    """
    from safetensors import safe_open

    root = Path(folder)
    files = sorted(root.glob("*.safetensors"))
    for index in root.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            raise ValueError(f"{index} is not a valid safetensors index (JSON with a weight_map)") from None
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ValueError(f"{index} names shards that are missing: {', '.join(missing)}")
    shapes: dict[str, tuple[Path, list[int]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = (f, list(fh.get_slice(key).get_shape()))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a bad file
            text = " ".join(str(err).split())
            raise ValueError(f"{f} is truncated or corrupt ({text}); download or save the model again") from None
    return shapes


def check_weight_shapes(folder: "str | Path", model_cls: Any, config: Any,
                        shapes: dict[str, tuple[Path, list[int]]]) -> None:
    """Every stored tensor whose name the model of ``config`` has must have the shape the
    config gives it (the model is built on the meta device: no memory, no weights read)."""
    try:
        with torch.device("meta"):
            model = model_cls.from_config(config)
    except Exception as err:  # noqa: BLE001 - a model that cannot be built is the loader's to report
        log.debug("no shape check for %s: cannot build %s on the meta device (%s)", folder, model_cls, err)
        return
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    bad = []
    for key, (file, shape) in shapes.items():
        want = expected.get(key)
        if want is None and prefix:  # a base model's checkpoint in a model with a head, or the reverse
            want = expected.get(f"{prefix}.{key}", expected.get(key.removeprefix(f"{prefix}.")))
        if want is not None and want != shape:
            bad.append((key, file, shape, want))
    if bad:
        key, file, shape, want = bad[0]
        raise ValueError(f"{folder}: the weights do not match config.json: {key} is {shape} in {file.name}, the "
                         f"config makes it {want} ({len(bad)} tensor(s) differ); the config belongs to another model")


def check_model_folder(folder: "str | Path", model_cls: Any = None) -> None:
    """:func:`check_config_json`, :func:`check_safetensors` and, with ``model_cls`` (a
    transformers auto or model class), :func:`check_weight_shapes`."""
    check_config_json(folder)
    shapes = check_safetensors(folder)
    if model_cls is None or not shapes:
        return
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{Path(folder) / 'config.json'} is not a config transformers can read: "
                         f"{' '.join(str(err).split())}") from None
    check_weight_shapes(folder, model_cls, config, shapes)


def check_finite_weights(model: nn.Module, source: Any = "the model") -> None:
    """``ValueError`` naming the first parameter that holds NaN or inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            n = int((~torch.isfinite(param)).sum())
            raise ValueError(f"{source}: {name} holds {n} NaN or inf value(s); the weights are broken "
                             f"(a bad conversion or a diverged fine-tune) and cannot be pruned")

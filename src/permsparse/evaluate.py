"""Model evaluation: language-model perplexity on fixed token windows, top-1 accuracy of
image classifiers, and zero-shot accuracy through lm-evaluation-harness (optional
``eval`` extra)."""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from permsparse._optional import require

__all__ = ["perplexity", "top1_accuracy", "lm_eval_accuracy"]

logger = logging.getLogger(__name__)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def perplexity(
    model: Any,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    bf16: bool = False,
) -> float:
    """Perplexity ``exp(mean token NLL)`` of a causal LM over token windows.

    Each window of ``windows`` (``(n, T)`` int64) is scored independently, without
    context from its neighbours: the model predicts tokens ``1..T-1`` from the ones
    before, so every window contributes ``T-1`` tokens. With equal-length windows this
    equals the SparseGPT/Wanda formula (mean of per-window losses).

    Args:
        model: any Hugging Face causal LM (returns ``.logits``); its mode is left unchanged.
        windows: ``(n, T)`` token ids.
        batch_size: windows per forward pass.
        device: where to run; default the device of the model's parameters.
        progress: show a tqdm progress bar.
        params: tensors (``{"<module>.weight": W}``) to run the model with in place of its
            own (``torch.func.functional_call``; the model is left unchanged), e.g. the
            weights of a candidate plan.
        bf16: run the forward under bfloat16 autocast (the loss stays float32).
    """
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be (n >= 1, T >= 2) token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)

    total_nll = 0.0
    total_tokens = 0
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for begin in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
            batch = windows[begin : begin + batch_size].to(device=device, dtype=torch.long)
            # use_cache=False: no KV cache is needed for one full pass, and it saves memory.
            inputs = {"input_ids": batch, "use_cache": False}
            if params is None:
                logits = model(**inputs).logits
            else:
                logits = functional_call(model, dict(params), (), inputs, strict=False).logits
            # Float32 log-softmax: a bf16/fp16 one loses precision over a 50k vocabulary.
            shift_logits = logits[:, :-1, :].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
    mean_nll = total_nll / total_tokens
    if not math.isfinite(mean_nll):
        logger.warning("perplexity: mean NLL is %s (non-finite logits?)", mean_nll)
    ppl = math.exp(mean_nll) if not mean_nll > 700 else math.inf  # exp overflows past ~709; NaN stays NaN
    logger.info("perplexity %.3f over %d windows x %d tokens", ppl, windows.shape[0], windows.shape[1])
    return ppl


def top1_accuracy(
    model: Any,
    images: "torch.Tensor | Iterable[Mapping[str, torch.Tensor]]",
    labels: torch.Tensor | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """Top-1 accuracy of an image classifier (returns ``.logits``) on labelled images.

    Args:
        model: e.g. a ``ViTForImageClassification``; its mode is left unchanged.
        images: ``(N, C, H, W)`` model inputs with ``labels`` ``(N,)``; or batch dicts
            ``{"pixel_values", "labels"}`` (e.g. an image folder's lazy ``.batches(64)``,
            so that a large evaluation set never sits in memory whole).
        batch_size: images per forward pass (tensor input).
        device: where to run; default the device of the model's parameters.
        progress: show a tqdm progress bar.
    """
    if isinstance(images, torch.Tensor):
        if labels is None or images.shape[0] != labels.shape[0]:
            raise ValueError(f"need one label per image, got {None if labels is None else labels.shape[0]} labels "
                             f"for {images.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = [{"pixel_values": images[i : i + batch_size], "labels": labels[i : i + batch_size]}
                  for i in range(0, images.shape[0], batch_size)]
    device = torch.device(device) if device is not None else _model_device(model)
    correct = total = 0
    with torch.inference_mode():
        for batch in tqdm(images, desc="top-1", disable=not progress):
            logits = model(pixel_values=batch["pixel_values"].to(device)).logits
            correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
            total += int(batch["labels"].numel())
    if total == 0:
        raise ValueError("no labelled images to evaluate")
    acc = correct / total
    logger.info("top-1 %.4f over %d images", acc, total)
    return acc


# ---------------------------------------------------------------------------------------
# lm-evaluation-harness (optional extra: pip install 'permsparse[eval]')
# ---------------------------------------------------------------------------------------

def _import_lm_eval() -> tuple[Any, Any, Any]:
    """``(simple_evaluate, HFLM, TaskManager)``, imported lazily (lm-eval is an optional extra)."""
    require("lm_eval", "eval", "lm_eval_accuracy")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    return simple_evaluate, HFLM, TaskManager


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _task_manager(TaskManager: Any, tasks: list[str], include_path: str | None) -> Any:
    """A TaskManager that knows every name in ``tasks`` (a name may also be a task YAML file).

    Scanning lm-eval's ~15k built-in task configs takes ~10 s, so when ``include_path`` is
    given and holds every requested name as a plain task (not a group or tag, which may list
    built-in tasks), the built-ins are skipped.

    Raises:
        ValueError: a task name that is neither registered nor a task YAML file.
    """
    names = [t for t in tasks if not _is_task_file(t)]
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_subtasks for t in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        where = f"lm-eval's built-in tasks or {include_path!r}" if include_path else "lm-eval's built-in tasks"
        raise ValueError(f"unknown lm-eval task(s) {', '.join(hints)}: not found in {where}")
    return manager


def lm_eval_accuracy(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    num_fewshot: int = 0,
) -> dict[str, float]:
    """Accuracy of an in-memory Hugging Face causal LM on lm-evaluation-harness tasks.

    The model is wrapped in ``lm_eval.models.huggingface.HFLM`` as is (on its current
    device and dtype) and scored with ``lm_eval.simple_evaluate``. Log-likelihood
    (``multiple_choice``) tasks are the intended use, e.g. ``hellaswag``, ``piqa``,
    ``arc_easy``, ``winogrande``, or a local task YAML found under ``include_path``.

    Accuracy reported per task: ``acc_norm,none`` (choice log-likelihood normalised by the
    choice's length in bytes) when the task computes it, otherwise ``acc,none``. The
    returned dict holds one entry per row of lm-eval's results table that has either
    metric: each requested task, and for a group or tag its member tasks (and the group's
    aggregate). Rows without an accuracy (e.g. a generation task) are logged and left out.

    The model's train/eval mode, RNG states (python, numpy, torch) and the caller's
    tokenizer are left as they were. Nothing is downloaded for a local task whose dataset
    is local (e.g. ``dataset_path: json`` with local ``data_files``); built-in tasks
    download their datasets through ``datasets`` unless already cached.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (causal LM).
        tokenizer: its tokenizer.
        tasks: lm-eval task, group or tag names, or paths of task YAML files.
        include_path: a folder with extra task YAMLs (searched in addition to the built-ins).
        limit: evaluate only the first ``limit`` documents of each task (for quick checks).
        batch_size: sequences per forward pass.
        num_fewshot: in-context examples per prompt (0: zero-shot). A task whose YAML
            fixes ``num_fewshot: 0`` stays zero-shot.

    Returns:
        ``{task name: accuracy in [0, 1]}``.

    Raises:
        ImportError: lm-eval is not installed.
        ValueError: no tasks, an unknown task name, no tokenizer, bad ``limit``/
            ``batch_size``/``num_fewshot``, or no accuracy metric in any result.
    """
    tasks = _checked_tasks(tasks, tokenizer, limit, batch_size, num_fewshot)
    simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    include = str(include_path) if include_path is not None else None
    start = time.perf_counter()
    manager = _task_manager(TaskManager, tasks, include)  # validates names before touching the model
    with _model_left_as_is(model):
        # HFLM may set a pad token on the tokenizer it is given: hand it a copy.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              bootstrap_iters=0,  # no stderr: we only return the point estimate
                              log_samples=False)
    if out is None:  # only non-zero ranks of a distributed run get None
        return {}
    accuracies = _accuracies(out["results"], tasks)
    logger.info("lm-eval: %d task(s) in %.1f s", len(accuracies), time.perf_counter() - start)
    return accuracies


def _checked_tasks(tasks: "str | list[str]", tokenizer: Any, limit: int | None, batch_size: int,
                   num_fewshot: int) -> list[str]:
    """The task names as a list, once the arguments are known to be usable."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if tokenizer is None:
        raise ValueError("tokenizer is required (lm-eval would otherwise look it up by the model's name, maybe on the Hub)")
    return tasks


@contextlib.contextmanager
def _model_left_as_is(model: Any) -> Iterator[None]:
    """Leave the model's train/eval mode, its tied weights and the RNG states as they were."""
    was_training = getattr(model, "training", False)
    py_state, np_state = random.getstate(), np.random.get_state()
    # HFLM calls model.tie_weights(), which would re-tie an output head deliberately kept
    # separate from the (config-tied) embeddings: disable it on this instance meanwhile.
    has_dict = hasattr(model, "__dict__")
    had_own_tie = has_dict and "tie_weights" in vars(model)
    own_tie = vars(model).get("tie_weights") if had_own_tie else None
    try:
        if has_dict:
            model.tie_weights = lambda *args, **kwargs: None
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        # simple_evaluate seeds python/numpy/torch globally; keep the caller's RNG streams.
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if has_dict:
            if had_own_tie:
                model.tie_weights = own_tie
            else:
                vars(model).pop("tie_weights", None)
        if hasattr(model, "train"):
            model.train(was_training)


def _accuracies(results: Mapping[str, Mapping], tasks: list[str]) -> dict[str, float]:
    """``acc_norm`` where a result row has it, else ``acc``; rows with neither are logged and left out."""
    accuracies: dict[str, float] = {}
    for name, metrics in results.items():
        key = "acc_norm,none" if "acc_norm,none" in metrics else "acc,none" if "acc,none" in metrics else None
        if key is None or not isinstance(metrics[key], (int, float)):
            logger.warning("lm-eval task %r reports no accuracy (metrics: %s); left out", name, sorted(metrics))
            continue
        accuracies[name] = float(metrics[key])
        logger.info("lm-eval %s: %s = %.4f", name, key.split(",")[0], accuracies[name])
    if not accuracies:
        raise ValueError(f"none of the lm-eval tasks {tasks} reports an accuracy (acc or acc_norm)")
    return accuracies

"""``permsparse prune``: load, calibrate, prune, evaluate, export with a report."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from permsparse.cli.options import UsageError, given_values, options, resolve
from permsparse.cli.preflight import (
    RunIdentity,
    check_checkpoint,
    check_device,
    check_out,
    interrupt_hint,
    run_identity,
)
from permsparse.cli.recipe import load_recipe
from permsparse.config import DataConfig, PruneConfig, RunConfig
from permsparse.io.atomic import atomic_write_text

__all__ = ["cmd_prune", "run_configs", "Invocation"]

log = logging.getLogger("permsparse")


@dataclass
class _Workload:
    """What a model is calibrated on and measured by: token windows and perplexity for
    language models, labelled images and top-1 for image classifiers."""

    calib: object  # token windows (n, T) or a list of batch dicts
    metric: str  # "ppl" or "top1"
    measure: Callable | None  # model -> the metric on the evaluation set; None: nothing to evaluate on
    info: dict  # what the data was, for the run's metrics


@dataclass
class Invocation:
    """What a ``prune`` command line asks for."""

    model: str
    task: str  # a permsparse.models.loading.TASKS entry
    out: Path
    config: PruneConfig
    data: DataConfig
    run: RunConfig
    identity: str = ""  # what the run computes, hashed (preflight.run_identity)


def run_configs(args: argparse.Namespace) -> Invocation:
    """The configs of a ``prune`` command line: the defaults of what MODEL is, under the
    recipe, under the flags.

    Every path the run writes is checked here, before any model is read (see
    :mod:`permsparse.cli.preflight`).

    Raises:
        UsageError: no MODEL, a bad, occupied or unwritable --out, a bad recipe or value,
            --resume without --checkpoint, a --checkpoint that is not this run's, a device
            this machine does not have.
    """
    from permsparse.models.loading import model_task

    recipe = load_recipe(args.recipe) if args.recipe else {}
    model = args.model or recipe.get("model")
    recipe.pop("model", None)
    flags = given_values(args)
    if not model:
        raise UsageError("MODEL is required (a directory, hub id, .gguf file, smollm2-135m or digits-vit)")
    user = {**recipe, **flags}
    try:  # the output first: an occupied --out stops the run before any model is read
        run = RunConfig(**{k: v for k, v in user.items() if options()[k].section == "run"})
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    out = check_out(run.out, run.overwrite, str(model))
    task = model_task(model)
    try:
        config, data, run = resolve(task, recipe, flags)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if run.resume and not config.learn.checkpoint_path:
        raise UsageError("--resume needs --checkpoint PATH")
    check_device(config)
    identity = run_identity(str(model), config, data)
    check_checkpoint(config.learn.checkpoint_path, out, run.resume, identity)
    return Invocation(str(model), task, out, config, data, run, identity)


def cmd_prune(args: argparse.Namespace) -> int:
    """Under torchrun (``WORLD_SIZE`` > 1) every rank runs this; the work is sharded and
    only rank 0 evaluates and writes ``--out``."""
    from permsparse.train import distributed as dist

    started = dist.init_from_env()
    try:
        return _cmd_prune(args)
    finally:
        if started:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _workload(task: str, data: DataConfig, config: PruneConfig, model, preprocessor, progress: bool) -> _Workload:
    seed, batch_size = config.learn.seed, config.learn.batch_size
    if task == "image-classification":
        from permsparse.data.images import label_names, load_image_data
        from permsparse.evaluate import top1_accuracy

        size = int(getattr(model.config, "image_size", 224))
        images = load_image_data(data.calib, preprocessor, size, data.n_calib, seed, data.eval_images, progress,
                                 classes=label_names(model))
        info = {"calib": images.source, "n_calib": len(images.calib),
                "eval_images": images.eval.source if images.eval else None,
                "n_eval": len(images.eval) if images.eval else 0}
        if images.eval is None:
            log.warning("no labelled evaluation images (--eval-images DIR): top-1 is not measured")
            return _Workload(images.calib.batches(batch_size), "top1", None, info)
        ev = images.eval
        return _Workload(images.calib.batches(batch_size), "top1",
                         lambda m: top1_accuracy(m, ev.batches(64), progress=progress), info)
    from permsparse.data.text import load_text_windows
    from permsparse.evaluate import perplexity

    windows = load_text_windows(data.calib, preprocessor, data.window, data.n_calib, seed,
                                eval_tokens=data.eval_tokens)
    info = {"calib": windows.source, "n_calib": int(windows.calib.shape[0]), "window": data.window}
    return _Workload(windows.calib, "ppl", lambda m: perplexity(m, windows.eval, progress=progress), info)


def _cmd_prune(args: argparse.Namespace) -> int:
    inv = run_configs(args)
    try:
        return _prune_and_export(args, inv)
    except KeyboardInterrupt:
        learned = inv.config.permutation == "learned"
        raise KeyboardInterrupt(interrupt_hint(getattr(args, "argv", []), inv.config.learn.checkpoint_path,
                                               inv.run.resume, learned)) from None


def _prune_and_export(args: argparse.Namespace, inv: Invocation) -> int:
    from permsparse.api import prune
    from permsparse.models.loading import load_model
    from permsparse.train import distributed as dist

    name, task, out, config, data, run = inv.model, inv.task, inv.out, inv.config, inv.data, inv.run
    main_rank = dist.is_main()
    progress = not args.quiet and main_rank
    config.progress = progress
    evaluate = not run.no_eval and main_rank
    t_start = time.perf_counter()
    # --device cuda: the weights go to the GPU in bf16 as they are read (streamed runs keep them on the host).
    model, tokenizer = load_model(name, task=task, device=None if config.offload else config.device)
    work = _workload(task, data, config, model, tokenizer, progress)
    evaluate = evaluate and work.measure is not None
    metrics: dict[str, Any] = {"model": name, **work.info}
    if dist.world_size() > 1:
        metrics["world_size"] = dist.world_size()
    if evaluate:
        metrics[f"{work.metric}_dense"] = work.measure(model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = prune(model, tokenizer, config, work.calib, on_step=RunIdentity(inv.identity), resume=run.resume)
        if not main_rank:
            return 0  # every rank holds the same pruned model; rank 0 evaluates and writes it
        if result.history:  # every step, those a resumed run restored from its checkpoint included
            atomic_write_text(Path(tmp) / "steps.jsonl", "".join(json.dumps(h.to_json()) + "\n"
                                                                 for h in result.history))
        metrics["prune_seconds"] = time.perf_counter() - t0
        metrics["kept_plan"] = result.kept_plan
        metrics["guard"] = result.guard
        metrics.update(result.retained())
        if evaluate:
            metrics[work.metric] = work.measure(model)
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        metrics["total_seconds"] = time.perf_counter() - t_start
        summary = [{"model": name, "pattern": config.pattern, "score": config.score,
                    "permutation": config.permutation, "kept": result.kept_plan,
                    f"{work.metric}_dense": metrics.get(f"{work.metric}_dense"), work.metric: metrics.get(work.metric),
                    "prune_s": metrics["prune_seconds"], "peak_rss_mb": metrics["peak_rss_mb"]}]
        # What this run computed, in the schema --recipe reads: permsparse.json replays it.
        recorded = {**config.to_json(), "data": data.to_json()}
        title = f"permsparse: {name} {config.pattern} {config.score} + {config.permutation}"
        _write(result, model, tokenizer, out, run, title, summary, recorded, metrics, Path(tmp))
    from permsparse.cli.commands import print_table

    print_table(summary)
    print(f"wrote {out} (report: {out / 'report.md'})")
    return 0


def _write(result, model, tokenizer, out: Path, run: RunConfig, title: str, summary: list, recorded: dict,
           metrics: dict, tmp: Path) -> None:
    """The report beside the training steps in ``tmp``, then all of it inside the atomic export."""
    from permsparse.report import write_report

    write_report(tmp, title, summary, recorded, result.reports, result.history, result.guard, result.kept_plan)
    extras = {p.name: p for p in tmp.iterdir() if p.is_file() and not p.name.startswith(".")}
    # The export checks --out again (as preflight did): an empty folder or, with --overwrite,
    # a previous run; nothing else.
    result.save_pretrained(out, model, tokenizer, metrics=metrics, overwrite=run.overwrite, config=recorded,
                           extra_files=extras)

"""``permsparse eval`` and ``permsparse demo``, and the tables every command prints."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from permsparse.cli.options import UsageError

__all__ = ["cmd_eval", "cmd_demo", "print_table"]

log = logging.getLogger("permsparse")


def _eval_classifier(args: argparse.Namespace, path: Path, has_plan: bool) -> int:
    """Top-1 of an image classifier folder on ``--data`` (digits: its held-out test split)."""
    from permsparse.data.images import label_names, load_digits_set, open_image_folder
    from permsparse.evaluate import top1_accuracy
    from permsparse.io.export import load
    from permsparse.io.plan import read_plan
    from permsparse.models.loading import load_model

    if has_plan:
        model, processor = load(path, deploy=True), _image_processor(path)
        data = args.data or read_plan(path)[0].get("metrics", {}).get("eval_images") or "digits"
    else:
        model, processor = load_model(str(path), task="image-classification")
        data = args.data or "digits"
    size = int(getattr(model.config, "image_size", 224))
    base, _, split = str(data).partition(":")
    if base.lower() == "digits":
        images = load_digits_set(split or "test", processor, size)
    else:
        images = open_image_folder(data, processor, size, classes=label_names(model))
    acc = top1_accuracy(model, images.batches(max(args.batch_size, 64)), progress=not args.quiet)
    results = {"dir": str(path), "data": images.source, "n_images": len(images), "top1": acc}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table([{"metric": "top-1", "data": images.source, "images": len(images), "value": acc}])
    return 0


def _image_processor(path: Path):
    """The image processor saved beside a model, or ``None`` (plain resize and [-1, 1])."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        log.info("%s has no image processor; images are resized and scaled to [-1, 1]", path)
        return None


def cmd_eval(args: argparse.Namespace) -> int:
    from permsparse.data.text import load_text_windows
    from permsparse.evaluate import perplexity
    from permsparse.io.export import load
    from permsparse.models.loading import model_task

    path = Path(args.dir).expanduser()
    if not path.is_dir():
        raise UsageError(f"{args.dir} is not a directory")
    has_plan = (path / "permsparse.json").is_file()
    task = model_task(str(path))
    if task == "image-classification":
        return _eval_classifier(args, path, has_plan)
    args.data = args.data or "wikipedia"
    if has_plan:
        model = load(path, deploy=True)
    else:
        from permsparse.models.loading import load_model

        model, _ = load_model(str(path), task=task)
    from permsparse.models.loading import load_tokenizer

    tokenizer = load_tokenizer(path)
    results: dict = {"dir": str(path)}
    windows = load_text_windows(args.data, tokenizer, args.window, 1, 0, eval_tokens=args.eval_tokens)
    results["ppl"] = perplexity(model, windows.eval, batch_size=args.batch_size, progress=not args.quiet)
    if args.tasks:
        from permsparse.evaluate import lm_eval_accuracy

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results["tasks"] = lm_eval_accuracy(model, tokenizer, tasks, include_path=args.include_path,
                                            limit=args.limit, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        rows = [{"metric": "perplexity", "data": args.data, "value": results["ppl"]}]
        for task, acc in results.get("tasks", {}).items():
            rows.append({"metric": "accuracy", "data": task, "value": acc})
        print_table(rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from permsparse.cli.preflight import check_out
    from permsparse.demo import run_demo

    if args.out:  # before minutes of work: the export applies the same rule at the end
        check_out(args.out, args.overwrite, "")

    rows = run_demo(args.preset, out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    print_table(rows)
    return 0


def print_table(rows: Sequence[dict]) -> None:
    from permsparse.report import markdown_table

    print(markdown_table(rows, floatfmt=".4g"), end="")

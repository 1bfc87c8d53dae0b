"""``permsparse`` command line: the only module that reads argv or prints.

    permsparse prune MODEL --pattern 2:4 --score wanda --permutation learned --groups 4 \\
        --calib wikipedia --out DIR
    permsparse eval DIR [--data wikipedia] [--tasks TASK,...]
    permsparse demo [--preset quick|full]

Errors in what the user gave (a missing model, a short data file, an occupied --out,
a diverging run) print one clear line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("permsparse")

EXIT_USAGE = 2


class UsageError(Exception):
    """An error in the user's input: reported in one line, exit status 2."""


def _groups_arg(text: str) -> "int | str":
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"groups must be an integer or 'auto', got {text!r}") from None


def _add_prune_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--pattern", default="2:4", help="N:M pattern, N weights KEPT in every M inputs (2:4, 4:8), "
                   "or unstructured50 (per-row 50%%, the reference ceiling) [2:4]")
    g.add_argument("--score", default="wanda", choices=["magnitude", "wanda", "ria", "sparsegpt"],
                   help="pruning score [wanda]")
    g.add_argument("--permutation", default="learned", choices=["none", "heuristic", "learned"],
                   help="how input channels are permuted before masking [learned]")
    g.add_argument("--groups", type=_groups_arg, default=None,
                   help="permutation groups G per site, or auto: the fewest groups of at most 768 channels "
                   "(SmolLM2: 2; a 7B model: 16); G=1 is global [4; digits-vit on digits: 1]")
    g.add_argument("--heuristic", default="zigzag", choices=["zigzag", "zigzag+swap"],
                   help="heuristic search (also the learned run's warm start) [zigzag]")
    g.add_argument("--swap-seconds", type=float, default=1.0, help="time budget per site of zigzag+swap [1.0]")
    g.add_argument("--heuristic-power", type=float, default=None,
                   help="the heuristic keeps the most sum(score**p): 2 = the output error energy w^2*|x|^2 "
                   "(Wanda), 1 = the plain kept score of RIA/Apex [2]")
    g.add_argument("--sequential", action="store_true",
                   help="calibrate block by block on the outputs of already-pruned blocks")
    g.add_argument("--independent", action="store_true",
                   help="one permutation per layer (each paying a gather) instead of one per site")
    g.add_argument("--attn-out", default="fold", choices=["fold", "gather"],
                   help="o_proj: fold into v_proj rows (head-aligned) or gather [fold]")
    d = p.add_argument_group("calibration data")
    d.add_argument("--calib", default=None,
                   help="language models: wikipedia (embedded), a .txt file, or a datasets name (wikitext2, c4) "
                   "[wikipedia]; image classifiers: digits (embedded) or an image folder root/<class>/<images> [digits]")
    d.add_argument("--n-calib", type=int, default=None, help="calibration windows [128] or images [512]")
    d.add_argument("--eval-images", default=None,
                   help="image classifiers: a labelled image folder for top-1 (digits: its held-out test split)")
    d.add_argument("--window", type=int, default=512, help="tokens per window [512]")
    d.add_argument("--eval-tokens", type=int, default=32768, help="evaluation tokens (the last of the text) [32768]")
    t = p.add_argument_group("trainer (--permutation learned)")
    t.add_argument("--objective", default="e2e", choices=["e2e", "blockwise"],
                   help="end-to-end CE+KL, or per-block output MSE (memory flat in depth) [e2e]")
    t.add_argument("--init", default="heuristic", choices=["heuristic", "identity", "noise", "random"],
                   help="cost initialisation: heuristic warm start, identity-biased, zero + noise, or a random "
                   "permutation [heuristic]")
    t.add_argument("--epochs", type=float, default=None,
                   help="passes over the calibration windows [1; digits-vit on digits: see README, Vision]")
    t.add_argument("--batch-size", type=int, default=None, help="windows [4] or images [32] per step")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate on the costs")
    t.add_argument("--lr-end", type=float, default=None,
                   help="the lr falls linearly to this by the end of the run [0.002; 0: a constant lr]")
    t.add_argument("--margin", type=float, default=None, help="initial cost advantage of the start permutation")
    t.add_argument("--tau-start", type=float, default=None, help="initial Sinkhorn temperature")
    t.add_argument("--tau-end", type=float, default=None, help="final Sinkhorn temperature")
    t.add_argument("--tau-schedule", default=None, choices=["exponential", "linear", "cosine", "constant"],
                   help="how τ goes from --tau-start to --tau-end over the run [linear]")
    t.add_argument("--sinkhorn-iters", type=int, default=None, help="Sinkhorn iterations per step")
    t.add_argument("--alpha", type=float, default=None, help="weight of the distillation KL")
    t.add_argument("--steps-per-block", type=int, default=None, help="steps per block (blockwise objective)")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training at most; τ anneals by steps or time, whichever is further")
    t.add_argument("--noise", type=float, default=None, help="std of the initial cost noise")
    t.add_argument("--guard-batches", type=int, default=None, help="calibration batches the final guard compares on")
    t.add_argument("--snapshots", type=int, default=None,
                   help="hard plans taken evenly during training that the guard weighs beside the last one [3]")
    t.add_argument("--average", type=_decays, default=None,
                   help="decays (comma-separated) of running averages of the costs whose hard plans the guard "
                        "also weighs; 0: none [0.8,0.9]")
    t.add_argument("--tail-average", type=_tail_share, default=None,
                   help="the guard also weighs the plan of the costs averaged uniformly over the steps from this "
                        "share of the run on; off: none [0.5]")
    t.add_argument("--teacher-cache-gb", type=float, default=None,
                   help="keep the calibration pass's dense logits as the teacher when they fit in this many GiB "
                        "of host memory, instead of a teacher forward per step; 0: off [8]")
    t.add_argument("--no-bf16", action="store_true", help="run the model in float32 while learning")
    t.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("long runs (see README: Scaling)")
    r.add_argument("--checkpoint", default=None, help="resumable training state file (safetensors), written atomically")
    r.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints [50]")
    r.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    r.add_argument("--offload", action="store_true",
                   help="stream block by block: one block and its inputs on the compute device, the rest on CPU")
    r.add_argument("--device", default=None, help="compute device of --offload [cuda if available, else cpu]")
    r.add_argument("--spread-blocks", action="store_true",
                   help="--objective blockwise: learn each block against the dense model's inputs, so that "
                   "torchrun's processes split the blocks between them (README: Scaling)")


def _decays(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated decays such as 0.8,0.9, got {text!r}") from None
    return tuple(v for v in vals if v != 0.0)


def _tail_share(text: str) -> "float | str":
    if str(text).strip().lower() in ("off", "none"):
        return "off"
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1) or 'off', got {text!r}") from None
    if not 0.0 <= share < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1) or 'off', got {text!r}")
    return share


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="permsparse",
        description="Learnable channel permutations for accurate N:M-sparse Transformers.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # -q/-v are also accepted after the command (``permsparse prune ... -q``); SUPPRESS keeps
    # a flag given before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings only")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", parents=[common], help="prune a model, export it with its permutations and a report",
                       description="Prune MODEL to an N:M pattern, optionally learning channel permutations; "
                       "write a stock-loadable checkpoint plus permsparse.json and a report to --out.")
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face directory, a hub id, a .gguf file, or smollm2-135m (embedded)")
    p.add_argument("--out", default=None, help="output directory (required)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds a run")
    p.add_argument("--recipe", default=None, help="YAML or JSON file with any of these options (flags win)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity (top-1) before and after")
    _add_prune_options(p)

    e = sub.add_parser("eval", parents=[common],
                       help="perplexity (and lm-eval accuracy), or an image classifier's top-1, of an exported directory")
    e.add_argument("dir", help="directory written by permsparse prune (or any causal LM or image classifier directory)")
    e.add_argument("--data", default=None, help="text for perplexity (as --calib) [wikipedia]; for an image "
                   "classifier: digits or a labelled image folder [the run's --eval-images, else digits]")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--eval-tokens", type=int, default=32768)
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs the 'eval' extra)")
    e.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    e.add_argument("--limit", type=int, default=None, help="examples per lm-eval task")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", action="store_true", help="print the results as JSON")

    d = sub.add_parser("demo", parents=[common], help="dense / Wanda / heuristic / learned perplexity on the embedded default")
    d.add_argument("--preset", default="quick", choices=["quick", "full"],
                   help="quick: a few minutes on 2 CPU cores; full: the quality-table settings [quick]")
    d.add_argument("--out", default=None, help="also export the learned model and its report here")
    d.add_argument("--overwrite", action="store_true")
    return parser


# -- recipes -------------------------------------------------------------------------------


def load_recipe(path: str) -> dict:
    """Options from a YAML or JSON file; keys as the long flags (dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # a parse error of either format
        # YAML errors span several lines (with a caret drawing); keep the problem and where.
        mark = getattr(err, "problem_mark", None)
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"cannot parse recipe {path}: {what}{where}") from err
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _apply_recipe(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "recipe", None):
        recipe = load_recipe(args.recipe)
        prune_parser = parser._subparsers._group_actions[0].choices["prune"]  # noqa: SLF001
        known = {a.dest for a in prune_parser._actions}  # noqa: SLF001
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise UsageError(f"recipe {args.recipe}: unknown option(s) {', '.join(unknown)}")
        prune_parser.set_defaults(**recipe)
        args = parser.parse_args(argv)
    return args


# -- commands -------------------------------------------------------------------------------


def _prune_config(args: argparse.Namespace):
    from permsparse.config import LearnConfig
    from permsparse.config import PruneConfig

    learn_kw = {"objective": args.objective, "init": args.init, "epochs": args.epochs,
                "batch_size": args.batch_size, "seed": args.seed, "bf16": not args.no_bf16}
    learn_kw["checkpoint_path"] = getattr(args, "checkpoint", None)
    learn_kw["checkpoint_every"] = getattr(args, "checkpoint_every", 50)
    for name in ("lr", "lr_end", "margin", "tau_start", "tau_end", "tau_schedule", "sinkhorn_iters", "alpha", "steps_per_block",
                 "time_budget", "noise", "guard_batches", "snapshots",
                 "average", "tail_average", "teacher_cache_gb"):
        if getattr(args, name) is not None:
            learn_kw[name] = getattr(args, name)
    if learn_kw.get("tail_average") == "off":
        learn_kw["tail_average"] = None
    return PruneConfig(
        pattern=args.pattern, score=args.score, permutation=args.permutation, groups=args.groups,
        heuristic=args.heuristic, swap_seconds=args.swap_seconds, sequential=args.sequential,
        heuristic_power=PruneConfig.heuristic_power if args.heuristic_power is None else args.heuristic_power,
        sync=not args.independent, attn_out=args.attn_out, learn=LearnConfig(**learn_kw),
        progress=not args.quiet, offload=getattr(args, "offload", False), device=getattr(args, "device", None),
        spread_blocks=getattr(args, "spread_blocks", False),
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _check_out(out: str | None, overwrite: bool) -> Path:
    if not out:
        raise UsageError("--out DIR is required")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} already holds a run; pass --overwrite to replace it")
    return path


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


@dataclass
class _Workload:
    """What a model is calibrated on and measured by: token windows and perplexity for
    language models, labelled images and top-1 for image classifiers."""

    calib: object  # token windows (n, T) or a list of batch dicts
    metric: str  # "ppl" or "top1"
    measure: Callable | None  # model -> the metric on the evaluation set; None: nothing to evaluate on
    info: dict  # what the data was, for the run's metrics


def _fill_defaults(args: argparse.Namespace, task: str) -> None:
    """Flags left unset take the defaults of what is pruned (windows or images)."""
    defaults = {"calib": "wikipedia", "n_calib": 128, "batch_size": 4, "epochs": 1.0, "groups": 4}
    if task == "image-classification":
        from permsparse.data.digits_vit import DIGITS_PRUNE

        defaults = {"calib": "digits", "n_calib": 512, "batch_size": 32, "epochs": 1.0, "groups": 4}
        if str(args.calib or "digits").lower().startswith("digits"):
            defaults.update(DIGITS_PRUNE)  # tuned on the digits' validation split (README: Vision)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _workload(args: argparse.Namespace, task: str, model, preprocessor, progress: bool) -> _Workload:
    if task == "image-classification":
        from .evaluate import top1_accuracy
        from permsparse.data.images import label_names, load_image_data

        size = int(getattr(model.config, "image_size", 224))
        data = load_image_data(args.calib, preprocessor, size, args.n_calib, args.seed, args.eval_images, progress,
                               classes=label_names(model))
        info = {"calib": data.source, "n_calib": len(data.calib), "eval_images": data.eval.source if data.eval else None,
                "n_eval": len(data.eval) if data.eval else 0}
        if data.eval is None:
            log.warning("no labelled evaluation images (--eval-images DIR): top-1 is not measured")
            return _Workload(data.calib.batches(args.batch_size), "top1", None, info)
        ev = data.eval
        return _Workload(data.calib.batches(args.batch_size), "top1",
                         lambda m: top1_accuracy(m, ev.batches(64), progress=progress), info)
    from permsparse.data.text import load_text_windows
    from .evaluate import perplexity

    windows = load_text_windows(args.calib, preprocessor, args.window, args.n_calib, args.seed,
                                eval_tokens=args.eval_tokens)
    info = {"calib": windows.source, "n_calib": int(windows.calib.shape[0]), "window": args.window}
    return _Workload(windows.calib, "ppl", lambda m: perplexity(m, windows.eval, progress=progress), info)


def _cmd_prune(args: argparse.Namespace) -> int:
    from permsparse.train import distributed as dist
    from permsparse.io.export import export
    from permsparse.models.loading import load_model, model_task
    from permsparse.api import prune
    from .report import write_report

    if not args.model:
        raise UsageError("MODEL is required (a directory, hub id, .gguf file, smollm2-135m or digits-vit)")
    out = _check_out(args.out, args.overwrite)
    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint PATH")
    task = model_task(args.model)
    _fill_defaults(args, task)
    config = _prune_config(args)
    main_rank = dist.is_main()
    progress = not args.quiet and main_rank
    config.progress = progress
    evaluate = not args.no_eval and main_rank
    t_start = time.perf_counter()
    model, tokenizer = load_model(args.model, task=task)
    work = _workload(args, task, model, tokenizer, progress)
    evaluate = evaluate and work.measure is not None
    metrics: dict = {"model": args.model, **work.info}
    if dist.world_size() > 1:
        metrics["world_size"] = dist.world_size()
    if evaluate:
        metrics[f"{work.metric}_dense"] = work.measure(model)
    with tempfile.TemporaryDirectory() as tmp:
        steps_path = Path(tmp) / "steps.jsonl"
        t0 = time.perf_counter()
        result = prune(model, tokenizer, config, work.calib, metrics_path=steps_path, resume=args.resume)
        if not main_rank:
            return 0  # every rank holds the same pruned model; rank 0 evaluates and writes it
        metrics["prune_seconds"] = time.perf_counter() - t0
        metrics["kept_plan"] = result.kept_plan
        metrics["guard"] = result.guard
        metrics.update(result.retained())
        if evaluate:
            metrics[work.metric] = work.measure(model)
        metrics["peak_rss_mb"] = _peak_rss_mb()
        metrics["total_seconds"] = time.perf_counter() - t_start
        summary = [{"model": args.model, "pattern": config.pattern, "score": config.score,
                    "permutation": config.permutation, "kept": result.kept_plan,
                    f"{work.metric}_dense": metrics.get(f"{work.metric}_dense"), work.metric: metrics.get(work.metric),
                    "prune_s": metrics["prune_seconds"], "peak_rss_mb": metrics["peak_rss_mb"]}]
        # The report is written beside the steps first and travels inside the atomic export.
        write_report(tmp, f"permsparse: {args.model} {config.pattern} {config.score} + {config.permutation}",
                     summary, config.to_json(), result.reports, result.history, result.guard, result.kept_plan)
        extras = {p.name: p for p in Path(tmp).iterdir() if p.is_file() and not p.name.startswith(".")}
        # _check_out let through only --overwrite or an existing EMPTY folder; export
        # refuses any existing folder without overwrite=True, so pass it for the empty one.
        export(model, out, result.sites, result.perms, pattern=config.pattern, score=config.score,
               groups=result.groups, tokenizer=tokenizer, metrics=metrics, overwrite=args.overwrite or out.exists(),
               config=config.to_json(), extra_files=extras)
    _print_table(summary)
    print(f"wrote {out} (report: {out / 'report.md'})")
    return 0


def _eval_classifier(args: argparse.Namespace, path: Path, has_plan: bool) -> int:
    """Top-1 of an image classifier folder on ``--data`` (digits: its held-out test split)."""
    from .evaluate import top1_accuracy
    from permsparse.data.images import label_names, load_digits_set, open_image_folder
    from permsparse.io.export import load, read_plan
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
        _print_table([{"metric": "top-1", "data": images.source, "images": len(images), "value": acc}])
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
    from .evaluate import perplexity
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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    results: dict = {"dir": str(path)}
    windows = load_text_windows(args.data, tokenizer, args.window, 1, 0, eval_tokens=args.eval_tokens)
    results["ppl"] = perplexity(model, windows.eval, batch_size=args.batch_size, progress=not args.quiet)
    if args.tasks:
        from .evaluate import lm_eval_accuracy

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        results["tasks"] = lm_eval_accuracy(model, tokenizer, tasks, include_path=args.include_path,
                                            limit=args.limit, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        rows = [{"metric": "perplexity", "data": args.data, "value": results["ppl"]}]
        for task, acc in results.get("tasks", {}).items():
            rows.append({"metric": "accuracy", "data": task, "value": acc})
        _print_table(rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    rows = run_demo(args.preset, out=args.out, overwrite=args.overwrite, progress=not args.quiet)
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[dict]) -> None:
    from .report import markdown_table

    print(markdown_table(rows, floatfmt=".4g"), end="")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _apply_recipe(parser, argv)
    except UsageError as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    from permsparse.train.state import NonFiniteLossError

    commands = {"prune": cmd_prune, "eval": cmd_eval, "demo": cmd_demo}
    # TQDM_DISABLE only reaches tqdm imported after it is set; transformers' own bars
    # ("Loading weights", "Writing model shards") have their own switch.
    from transformers.utils import logging as hf_logging

    hf_bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        return commands[args.command](args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, ImportError, NonFiniteLossError) as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if args.quiet and hf_bars:
            hf_logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())

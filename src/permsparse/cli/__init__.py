"""``permsparse`` command line: the only package that reads argv or prints.

    permsparse prune MODEL --pattern 2:4 --score wanda --permutation learned --groups 4 \\
        --calib wikipedia --out DIR
    permsparse prune MODEL --recipe DIR/permsparse.json --out DIR2     # replays the run in DIR
    permsparse eval DIR [--data wikipedia] [--tasks TASK,...]
    permsparse demo [--preset quick|full]

``prune``'s options are generated from :mod:`permsparse.config` (see
:mod:`permsparse.cli.options`). Exit status: 0 done; 2 a usage error (a bad flag value, a
missing file the user named, an --out that holds a run, a bad recipe); 1 a failure at run
time (a diverging loss, out of memory, a full disk, an unexpected exception); 130
interrupted (Ctrl-C), with how to continue when a checkpoint was saved. Either way one line
on stderr, and the traceback too with ``-v``; nothing is half-written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import NoReturn, Sequence

from permsparse.cli.options import UsageError, add_options
from permsparse.config import DataConfig

__all__ = ["main", "build_parser", "UsageError", "EXIT_USAGE", "EXIT_FAILURE", "EXIT_INTERRUPTED"]

log = logging.getLogger("permsparse")

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: Exceptions that mean the user's input was wrong (exit 2); the library raises these for a
#: missing file, a bad value, an occupied output, an optional dependency not installed, a path
#: that cannot be read or written. Any other OSError (a full disk) is a failure at run time.
_USAGE_ERRORS = (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                 PermissionError, ImportError)
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line usage errors (exit 2 from :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="permsparse",
                     description="Learnable channel permutations for accurate N:M-sparse Transformers.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of errors")
    # -q/-v are also accepted after the command (``permsparse prune ... -q``); SUPPRESS keeps
    # a flag given before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, warnings only")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", parents=[common], help="prune a model, export it with its permutations and a report",
                       description="Prune MODEL to an N:M pattern, optionally learning channel permutations; "
                       "write a stock-loadable checkpoint plus permsparse.json and a report to --out. Defaults: "
                       "a recipe's values, then the flags, win over them.")
    p.add_argument("model", nargs="?", default=None,
                   help="a Hugging Face directory, a hub id, a .gguf file, smollm2-135m (embedded) or digits-vit")
    p.add_argument("--recipe", default=None,
                   help="YAML or JSON file with any of these options (flags win); an earlier run's "
                   "permsparse.json replays it")
    add_options(p)

    e = sub.add_parser("eval", parents=[common],
                       help="perplexity (and lm-eval accuracy), or an image classifier's top-1, of an exported directory")
    e.add_argument("dir", help="directory written by permsparse prune (or any causal LM or image classifier directory)")
    e.add_argument("--data", default=None, help=f"text for perplexity (as prune's --calib) [{DataConfig.calib}]; "
                   "for an image classifier: digits or a labelled image folder [the run's --eval-images, else digits]")
    e.add_argument("--window", type=int, default=DataConfig.window, help="tokens per window [%(default)s]")
    e.add_argument("--eval-tokens", type=int, default=DataConfig.eval_tokens,
                   help="evaluation tokens (the last of the text) [%(default)s]")
    e.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs the 'eval' extra)")
    e.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    e.add_argument("--limit", type=int, default=None, help="examples per lm-eval task")
    e.add_argument("--batch-size", type=int, default=4, help="windows (images: at least 64) per batch [%(default)s]")
    e.add_argument("--json", action="store_true", help="print the results as JSON")

    d = sub.add_parser("demo", parents=[common], help="dense / Wanda / heuristic / learned perplexity on the embedded default")
    d.add_argument("--preset", default="quick", choices=["quick", "full"],
                   help="quick: a few minutes on 2 CPU cores; full: the quality-table settings [%(default)s]")
    d.add_argument("--out", default=None, help="also export the learned model and its report here")
    d.add_argument("--overwrite", action="store_true")
    return parser


def _report(err: BaseException, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    print(_failure_line(err) if code == EXIT_FAILURE else f"permsparse: error: {_text(err)}", file=sys.stderr)
    return code


def _text(err: BaseException) -> str:
    """The error's message on one line; an OSError as ``what: path`` (not ``[Errno 13] ...``)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        paths = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{err.strerror}: {paths}"
    return " ".join(str(err).split())


def _failure_line(err: BaseException) -> str:
    """One line for a failure at run time, with a hint where there is one."""
    import torch

    from permsparse.train.state import NonFiniteLossError

    text = _text(err)
    if isinstance(err, NonFiniteLossError):
        return f"permsparse: error: {text}"
    if isinstance(err, OSError) and err.strerror:
        return f"permsparse: error: {text}"
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return (f"permsparse: error: out of memory ({text or type(err).__name__}); try a smaller --batch-size "
                f"or --n-calib, --teacher-cache-gb 0, or --offload")
    return f"permsparse: error: {type(err).__name__}: {text}"


def _run(args: argparse.Namespace) -> int:
    if args.quiet:  # for tqdm bars of modules imported from here on
        os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    from permsparse.cli.commands import cmd_demo, cmd_eval
    from permsparse.cli.prune import cmd_prune

    commands = {"prune": cmd_prune, "eval": cmd_eval, "demo": cmd_demo}
    # transformers' own bars ("Loading weights", "Writing model shards") have their own switch.
    hf_bars = hf_logging.is_progress_bar_enabled()
    if args.quiet:
        hf_logging.disable_progress_bar()
    try:
        return commands[args.command](args)
    finally:
        if args.quiet and hf_bars:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        return _report(err, EXIT_USAGE, verbose)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    args.argv = argv  # the command line as given, for the interrupt's "run it again with --resume"
    try:
        return _run(args)
    except _USAGE_ERRORS as err:
        return _report(err, EXIT_USAGE, args.verbose)
    except KeyboardInterrupt as err:  # Ctrl-C: no traceback (unless -v), and how to continue
        if args.verbose:
            traceback.print_exception(err, file=sys.stderr)
        hint = " ".join(str(err).split())
        print(f"permsparse: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - anything else is a failure at run time: one line, exit 1
        return _report(err, EXIT_FAILURE, args.verbose)

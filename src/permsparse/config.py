"""The configuration of a run, in one place: what to prune (:class:`PruneConfig`), how the
permutations are learned (:class:`LearnConfig`), what the command line calibrates and
evaluates on (:class:`DataConfig`) and where it writes (:class:`RunConfig`).

Every default, its choices and its help text are stated here once, in the fields'
``metadata`` (``help``, ``choices``; ``flag`` where the command-line flag is not the field
name; ``cli=False`` for a field without one): ``permsparse prune``'s options are generated
from these dataclasses. Defaults that depend on what is pruned are :data:`CLASSIFIER_DEFAULTS`
and :data:`DIGITS_PRUNE` (see :func:`workload_defaults`).

:meth:`PruneConfig.to_json` is the schema of a recipe and of ``config`` in ``permsparse.json``:
the fields of :class:`PruneConfig`, with :class:`LearnConfig` nested under ``learn`` (and, for
a command-line run, :class:`DataConfig` under ``data``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from permsparse.core.heuristics import HEURISTIC_POWER
from permsparse.core.pattern import parse_pattern
from permsparse.core.reconstruct import REFIT_METHODS
from permsparse.core.scores import SCORES
from permsparse.core.sinkhorn import TemperatureSchedule

__all__ = ["PruneConfig", "LearnConfig", "DataConfig", "RunConfig", "PERMUTATIONS", "INIT_CHOICES",
           "OBJECTIVES", "HEURISTICS", "ATTN_OUT", "TAU_SCHEDULES", "HIDDEN_LOSSES", "CLASSIFIER_DEFAULTS",
           "DIGITS_PRUNE", "workload_defaults"]

PERMUTATIONS = ("none", "heuristic", "learned")
#: ``LearnConfig.init`` values: heuristic warm start, identity-biased, zero cost plus noise,
#: a random starting permutation.
INIT_CHOICES = ("heuristic", "identity", "noise", "random")
OBJECTIVES = ("auto", "e2e", "blockwise")
HEURISTICS = ("zigzag", "zigzag+swap")
ATTN_OUT = ("fold", "gather")
TAU_SCHEDULES = ("exponential", "linear", "cosine", "constant")
#: ``LearnConfig.hidden_loss`` values: per-token 1 - cos, 1 - cos of the mean-pooled states,
#: normalised MSE (see :func:`permsparse.train.loss.hidden_loss`).
HIDDEN_LOSSES = ("cosine", "pooled-cosine", "nmse")

#: Image classifiers calibrate on labelled images, more of them per step than text windows.
CLASSIFIER_DEFAULTS: dict[str, Any] = {"calib": "digits", "n_calib": 512, "batch_size": 32}
#: Image classifiers calibrated on the embedded digits: the learned settings were chosen on
#: the digits' validation split, never on the test split (bench/results/vision.md).
DIGITS_PRUNE: dict[str, Any] = {"n_calib": 1024, "batch_size": 64, "epochs": 10.0, "groups": 1}


def workload_defaults(task: str, calib: str | None = None) -> dict[str, Any]:
    """Defaults, by field name, of what is pruned, for the options a run leaves unset: none
    for language models (the dataclass defaults), :data:`CLASSIFIER_DEFAULTS` for image
    classifiers, and :data:`DIGITS_PRUNE` over them when they calibrate on the digits."""
    if task != "image-classification":
        return {}
    out = dict(CLASSIFIER_DEFAULTS)
    if str(calib or out["calib"]).lower().startswith("digits"):
        out.update(DIGITS_PRUNE)
    return out


def _opt(default: Any = None, help: str = "", *, factory: Any = None, **meta: Any) -> Any:
    """A dataclass field whose metadata holds its help text (and ``choices``, ``flag``, ``cli``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _named(obj: Any, name: str) -> str:
    """A field as the user meets it: ``guard_batches (--guard-batches)``."""
    meta = next((f.metadata for f in fields(obj) if f.name == name), {})
    if meta.get("cli", True) is False:
        return name
    return f"{name} (--{meta.get('flag', name).replace('_', '-')})"


def _check_int(obj: Any, name: str, low: int) -> None:
    """``obj.name`` is an integer (not a bool) of at least ``low``."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_named(obj, name)} must be an integer >= {low}, got {value!r}")


def _check_float(obj: Any, name: str, low: float, *, above: bool = False, none_ok: bool = False,
                 inf_ok: bool = False) -> None:
    """``obj.name`` is a number ``>= low`` (``> low`` with ``above``), never NaN, and finite
    unless ``inf_ok``; ``None`` too with ``none_ok``."""
    value = getattr(obj, name)
    if value is None and none_ok:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if above else value >= low) and (inf_ok or math.isfinite(value))
    if not ok:
        rule = f"{'>' if above else '>='} {low:g}" + ("" if inf_ok else " and finite")
        raise ValueError(f"{_named(obj, name)} must be a number {rule}{' (or none)' if none_ok else ''}, "
                         f"got {value!r}")


def _check_device(device: str | None) -> None:
    """A device torch can name (``cpu``, ``cuda``, ``cuda:1``, ``mps``); whether it is present
    is a question for the machine the run starts on, not for the config."""
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device (--device) must name a torch device such as cpu, cuda or cuda:1; "
                         f"got {device!r}") from None


def _jsonable(value: Any) -> Any:
    """``asdict`` output as JSON holds it (tuples as lists), so that a config equals its read-back."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``cls(**data)`` with unknown keys named in a ``ValueError``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}")
    return cls(**data)


@dataclass
class LearnConfig:
    """Knobs of the trainer (the README's recommendations are the defaults)."""

    # auto: bench/results/defaults.md (SmolLM2: block-wise ahead of end to end, in less time and memory).
    objective: str = _opt("auto", "e2e (end to end): CE + KL on the model's output; blockwise: per-block output "
                          "MSE, each block fed by the pruned ones before it (memory flat in depth); auto: blockwise "
                          "for a causal LM of one block stack, e2e otherwise (encoders, classifiers, "
                          "vision-language) and with --checkpoint", choices=OBJECTIVES)
    init: str = _opt("heuristic", "cost initialisation: heuristic warm start, identity-biased, zero + noise, "
                     "or a random permutation", choices=INIT_CHOICES)
    # Training is bounded by --time-budget; epochs only cap it where steps are fast (a GPU).
    epochs: float = _opt(3.0, "passes over the calibration windows (images), at most")
    batch_size: int = _opt(4, "windows (images) per step")
    lr: float = _opt(0.02, "Adam learning rate on the costs")
    # Late steps at low τ refine the plan instead of jittering it: bench/results/quality.md.
    lr_end: float | None = _opt(0.002, "the lr falls linearly to this over the run, with τ; 0: a constant lr")
    margin: float = _opt(0.1, "initial cost advantage of the starting permutation")
    noise: float = _opt(0.01, "std of the initial cost noise")
    tau_start: float = _opt(1.0, "initial Sinkhorn temperature")
    tau_end: float = _opt(0.05, "final Sinkhorn temperature")
    # τ stays high longer, where most of the gain comes: bench/results/quality.md, sweep.md.
    tau_schedule: str = _opt("linear", "how τ goes from tau-start to tau-end over the run", choices=TAU_SCHEDULES)
    # No worse than 10 at half the Sinkhorn cost: bench/results/sweep.md.
    sinkhorn_iters: int = _opt(5, "Sinkhorn iterations per step")
    alpha: float = _opt(1.0, "weight of the distillation KL")
    # Only where the device computes bfloat16 natively: elsewhere 10x slower (permsparse.models.precision).
    bf16: bool = _opt(True, "bfloat16 autocast of the model's forward and backward while learning, on a GPU "
                      "or a CPU with AVX512-BF16 or AMX (float32 on other CPUs); --no-bf16 (bf16 false): "
                      "float32 everywhere", flag="no-bf16")
    steps_per_block: int = _opt(24, "steps per block (blockwise objective), at most")
    guard_batches: int = _opt(2, "end to end: calibration batches the final guard compares the plans on")
    # On few calibration windows a plan fitted to them wins a guard on them and loses on new
    # text (the quick demo: docs/results.md, "A guard on held-out batches").
    guard_holdout: bool = _opt(False, "the guard's batches (end to end: the last guard-batches; block-wise: each "
                               "block's first block-guard-batches) are held out of training, so it compares the "
                               "plans on text the trainer did not see")
    # Each block's guard ran on every batch: 5 block passes over all data per block, most of a
    # block-wise run (docs/results.md, "The block-wise default").
    block_guard_batches: int = _opt(8, "block-wise: calibration batches each block's guard compares the plans "
                                    "on; 0: all")
    # A plan that loses least under the plain mask need not lose least once the kept weights are
    # refitted (MiniLM: bench/results/encoder_defaults.md); the refit of the finalists is reused.
    guard_refit: bool = _opt(True, "end to end, when the kept weights are refitted (reconstruction, SparseGPT): "
                             "the guard also compares its finalists (the best learned plan and the heuristic) "
                             "refitted, as the model will have them; --no-guard-refit: by the plain mask only",
                             flag="no-guard-refit")
    # Under the plain mask the trainer learns a plan for W ⊙ M, but the model ships the refitted
    # weights, which recover more from other plans (MiniLM: docs/results.md, "The trainer sees the refit").
    refit_every: int = _opt(0, "end to end, when the kept weights are refitted (reconstruction): every this many "
                            "steps the weights the trainer permutes become the refit of its current plan (each "
                            "pruned entry: its best value were it kept again), so it learns the plan for the "
                            "refitted model, and the guard weighs every plan refitted; 0: off")
    # The training loss is noisy at low τ and a late plan can be worse than an earlier one.
    snapshots: int = _opt(3, "end to end: hard plans taken evenly during training that the guard weighs "
                          "beside the last one")
    # The last plan is one noisy draw, the averaged costs a consensus: bench/results/guard_averages.md.
    average: tuple[float, ...] = _opt(help="end to end: decays (comma-separated) of running averages of the "
                                      "costs whose hard plans the guard also weighs; 0: none",
                                      factory=lambda: (0.8, 0.9))
    # Polyak-Ruppert averaging with a burn-in; the held-out perplexity stops falling about
    # halfway: bench/results/guard.md, guard_averages.md.
    tail_average: float | None = _opt(0.5, "end to end: the guard also weighs the plan of the costs averaged "
                                      "uniformly from this share of the run on; off: none")
    # Saves the teacher forward of every step: bench/results/step.md.
    teacher_cache_gb: float = _opt(8.0, "end to end: keep the calibration pass's dense logits (float16, on the "
                                   "host) as the distillation teacher when they fit in this many GiB; 0: a "
                                   "teacher forward at every step")
    # The best model in a fixed wall time: bench/results/quality.md (defaults rows).
    time_budget: float | None = _opt(600.0, "seconds of training at most: the steps that fit (estimated from "
                                     "the first steps, kept in the checkpoint), at most those of --epochs; block-wise, "
                                     "what is left shared evenly over the blocks left, at most --steps-per-block "
                                     "each; 0: no budget")
    # The budget is the whole prune, which on cores without bfloat16 the 24 steps of every
    # block overran (docs/results.md, "A budget for the whole walk").
    prune_budget: float | None = _opt(840.0, "block-wise: seconds for the whole block-by-block walk (statistics, "
                                      "training, guard, refit): each block trains for what the blocks left leave "
                                      "it, their other work estimated from the blocks done; dropped where that "
                                      "work alone exceeds it (a large model); 0: no budget")
    # The one-group heuristic refits better than 4 groups', and learning within 4 groups of its layout keeps
    # the step's assignments small (docs/results.md, "Learning within groups of the one-group layout").
    base_groups: int = _opt(1, "block-wise: the heuristic at this many groups (1: one permutation of all "
                            "channels) is each block's heuristic plan and the layout the trainer learns within "
                            "--groups groups of; 0: off (the heuristic at --groups)")
    seed: int = _opt(0, "seed of the calibration sample, the batches and the cost noise")
    checkpoint_path: str | None = _opt(None, "end to end: resumable training state (one safetensors file), "
                                       "written atomically", flag="checkpoint")
    checkpoint_every: int = _opt(50, "steps between checkpoints (and one after the last step)")
    # Chosen on MiniLM's validation sentences: bench/results/encoder.md.
    hidden_loss: str = _opt("cosine", "end to end, models without logits (encoders): how the sparse model's last "
                            "hidden states are matched to the dense ones (per-token 1 - cos, 1 - cos of the "
                            "mean-pooled states, or normalised MSE)", choices=HIDDEN_LOSSES)
    # The same step in less device memory, for one more forward of the blocks: bench/results/memory.md.
    activation_checkpointing: bool = _opt(False, "end to end: keep only each decoder block's input and recompute "
                                          "the block (its activations and pruned weights) in the backward")

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("init", self.init, INIT_CHOICES)
        # Values that would run but make the result meaningless (a guard on no batches keeps
        # an arbitrary plan, a negative KL weight rewards drifting from the teacher) are refused.
        for name in ("lr", "epochs", "tau_start", "tau_end"):
            _check_float(self, name, 0.0, above=True)
        for name in ("margin", "noise", "alpha"):
            _check_float(self, name, 0.0)
        if self.time_budget == 0:  # 0 (a recipe or the CLI): no budget, the epochs decide
            self.time_budget = None
        _check_float(self, "time_budget", 0.0, above=True, none_ok=True)
        if self.prune_budget == 0:
            self.prune_budget = None
        _check_float(self, "prune_budget", 0.0, above=True, none_ok=True)
        _check_float(self, "teacher_cache_gb", 0.0, inf_ok=True)
        for name, low in (("batch_size", 1), ("sinkhorn_iters", 1), ("steps_per_block", 1), ("guard_batches", 1),
                          ("block_guard_batches", 0), ("refit_every", 0), ("snapshots", 0), ("checkpoint_every", 1),
                          ("base_groups", 0)):
            _check_int(self, name, low)
        if self.lr_end == 0:  # 0 (a recipe or the CLI): a constant lr
            self.lr_end = None
        _check_float(self, "lr_end", 0.0, above=True, none_ok=True)
        TemperatureSchedule(self.tau_start, self.tau_end, 2, self.tau_schedule)  # validates
        if isinstance(self.average, (int, float)):  # one decay given as a number (0: none)
            self.average = (self.average,) if self.average else ()
        self.average = tuple(float(d) for d in self.average)
        if any(not 0.0 < d < 1.0 for d in self.average) or len(set(self.average)) != len(self.average):
            raise ValueError(f"average must hold distinct decays in (0, 1), got {self.average}")
        if self.tail_average is not None and not 0.0 <= self.tail_average < 1.0:
            raise ValueError(f"tail_average must be in [0, 1) (None: none), got {self.tail_average}")
        if self.checkpoint_path is not None and not str(self.checkpoint_path).strip():
            raise ValueError("checkpoint_path (--checkpoint) must name a file, got an empty path")
        _check_choice("hidden_loss", self.hidden_loss, HIDDEN_LOSSES)


@dataclass
class PruneConfig:
    """What to prune and how; ``learn`` holds the trainer's knobs."""

    pattern: str = _opt("2:4", "N:M pattern, N weights KEPT in every M inputs (2:4, 4:8), or unstructured50 "
                        "(per-row 50%, the reference ceiling)")
    score: str = _opt("wanda", "pruning score", choices=SCORES)
    permutation: str = _opt("learned", "how input channels are permuted before masking", choices=PERMUTATIONS)
    groups: int | str = _opt(4, "permutation groups G per site (1: global), or auto: the fewest groups of at "
                             "most 768 channels (SmolLM2: 2; a 7B model: 16)")
    heuristic: str = _opt("zigzag", "heuristic search (also the learned run's warm start)", choices=HEURISTICS)
    swap_seconds: float = _opt(1.0, "time budget per site of zigzag+swap")
    heuristic_power: float = _opt(HEURISTIC_POWER, "the heuristic keeps the most sum(score**p): 2 = the output "
                                  "error energy w^2*|x|^2 (Wanda), 1 = the plain kept score of RIA/Apex")
    sequential: bool = _opt(False, "calibrate block by block on the outputs of the already-pruned blocks")
    # One permutation per layer prunes better than one per shared input (bench/results/quality.md);
    # --sync is the layout with the fewest gathers at run time.
    sync: bool = _opt(False, "one permutation per site of layers reading the same input (q/k/v, gate/up), paid "
                      "by one gather of the norm's output; default: one per layer, each paying a gather")
    # A free o_proj permutation beats the head-aligned fold (heuristic 2:4 ppl 100.0 vs 104.2 on SmolLM2).
    attn_out: str = _opt("gather", "o_proj: gather its input (any permutation) or fold into v_proj rows "
                         "(free at run time, head-aligned)", choices=ATTN_OUT)
    learn: LearnConfig = _opt(help="the trainer (permutation learned)", factory=LearnConfig)
    progress: bool = _opt(True, "progress bars (the command line: off with -q)", cli=False)
    offload: bool = _opt(False, "stream block by block: one block and its inputs on the compute device, the "
                         "rest on CPU")
    device: str | None = _opt(None, "compute device of the streamed blocks (None: cuda if available, else cpu)")
    # Each block learns against the DENSE model's inputs, so blocks are independent and
    # torch.distributed ranks take contiguous shares of them (see api._prune_blockwise).
    spread_blocks: bool = _opt(False, "blockwise objective: learn each block against the dense model's inputs, "
                               "so that torchrun's processes split the blocks between them")
    # Beyond the paper: once the permutation and the mask are fixed, the kept weights are refitted to the
    # dense layer's output on the calibration inputs (SparseGPT's OBS update, mask fixed, permuted layout).
    reconstruct: bool = _opt(True, "after the masks are fixed, update each layer's kept weights to reproduce "
                             "its dense output on the calibration inputs (OBS / least squares, as SparseGPT; the "
                             "sparsegpt score refits by itself, magnitude prunes without data); --no-reconstruct: "
                             "keep W * M", flag="no-reconstruct")
    # The exact masked least squares fits every layer closer than OBS's one pass (SmolLM2 learned 2:4:
    # perplexity 64.6 against 71.0, docs/results.md), at about the same cost.
    refit: str = _opt("lstsq", "how the kept weights are refitted: lstsq (exact masked least squares, conjugate "
                      "gradient) or obs (SparseGPT's one-pass OBS update)", choices=REFIT_METHODS)

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}: use one of {SCORES}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"unknown permutation {self.permutation!r}: use one of {PERMUTATIONS}")
        if self.groups != "auto" and not (isinstance(self.groups, int) and self.groups >= 1):
            raise ValueError(f"groups must be 'auto' or an integer >= 1, got {self.groups!r}")
        _check_choice("heuristic", self.heuristic, HEURISTICS)
        _check_choice("attn_out", self.attn_out, ATTN_OUT)
        _check_choice("refit", self.refit, REFIT_METHODS)
        _check_float(self, "heuristic_power", 0.0, above=True)
        _check_float(self, "swap_seconds", 0.0)
        _check_device(self.device)
        if isinstance(self.learn, Mapping):
            self.learn = _from_mapping(LearnConfig, self.learn, "learn")
        if self.spread_blocks and self.sequential:
            raise ValueError("spread_blocks feeds every block the dense model's inputs; sequential feeds it the "
                             "pruned blocks' outputs: choose one")
        if self.spread_blocks and self.permutation == "learned" and self.learn.objective == "e2e":
            raise ValueError("spread_blocks needs the block-wise objective (objective='blockwise'); the end-to-end "
                             "objective already shares its work over ranks by splitting batches")

    @property
    def refits(self) -> bool:
        """Whether the kept weights are refitted after the mask: ``reconstruct`` with a score that
        neither refits by itself (SparseGPT) nor prunes without data (magnitude)."""
        return self.reconstruct and self.score not in ("magnitude", "sparsegpt")

    @property
    def refit_method(self) -> str | None:
        """The refit the kept weights get (``refit``), None where :attr:`refits` is False."""
        return self.refit if self.refits else None

    @property
    def updates_weights(self) -> bool:
        """Whether pruning changes the kept weights (SparseGPT, or the refit), not only masks them."""
        return self.score == "sparsegpt" or self.refits

    @property
    def needs_hessian(self) -> bool:
        """Whether calibration must collect each layer's input Hessian (SparseGPT, reconstruction)."""
        return self.updates_weights

    def to_json(self) -> dict:
        """The fields, ``learn`` nested: the schema of a recipe and of ``permsparse.json``'s ``config``."""
        return _jsonable(asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PruneConfig":
        """The inverse of :meth:`to_json`; a ``data`` section (a command-line run's) is ignored.

        Raises:
            ValueError: an unknown key (named) or a bad value.
        """
        return _from_mapping(cls, {k: v for k, v in data.items() if k != "data"}, "config")


@dataclass
class DataConfig:
    """What the command line calibrates on and evaluates with (the library takes tensors)."""

    calib: str = _opt("wikipedia", "language models: wikipedia (embedded), a .txt file, or a datasets name "
                      "(wikitext2, c4); image classifiers: digits (embedded) or an image folder "
                      "root/<class>/<images>")
    n_calib: int = _opt(128, "calibration windows (images)")
    window: int = _opt(512, "tokens per window")
    eval_tokens: int = _opt(32768, "evaluation tokens (the last of the text)")
    eval_images: str | None = _opt(None, "image classifiers: a labelled image folder for top-1 (digits: its "
                                   "held-out test split)")

    def __post_init__(self) -> None:
        # A window of one token has no next token to predict; calibration needs a sample.
        for name, low in (("n_calib", 1), ("window", 2), ("eval_tokens", 1)):
            _check_int(self, name, low)

    def to_json(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class RunConfig:
    """Where a command-line run writes, and how: not part of what a run computes, so never
    recorded in ``permsparse.json``."""

    out: str | None = _opt(None, "output directory (required)")
    overwrite: bool = _opt(False, "replace --out if it holds a previous permsparse run (never a folder of other "
                           "files, the model's or the current folder)")
    resume: bool = _opt(False, "continue the training from --checkpoint if it exists")
    no_eval: bool = _opt(False, "skip the perplexity (top-1) before and after")

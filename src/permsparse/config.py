"""The configuration of a run, in one place: what to prune (:class:`PruneConfig`) and how the
permutations are learned (:class:`LearnConfig`). Every default is stated here once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from permsparse.core.heuristics import HEURISTIC_POWER
from permsparse.core.pattern import parse_pattern
from permsparse.core.scores import SCORES
from permsparse.core.sinkhorn import TemperatureSchedule

__all__ = ["PruneConfig", "LearnConfig", "PERMUTATIONS", "INIT_CHOICES"]

PERMUTATIONS = ("none", "heuristic", "learned")
#: ``LearnConfig.init`` values: heuristic warm start, identity-biased, zero cost plus noise,
#: a random starting permutation.
INIT_CHOICES = ("heuristic", "identity", "noise", "random")


@dataclass
class LearnConfig:
    """Knobs of the trainer (defaults: see the README's recommendations)."""

    objective: str = "e2e"  # "e2e" or "blockwise"
    init: str = "heuristic"  # "heuristic" (warm start), "identity", "noise" or "random"
    epochs: float = 1.0
    batch_size: int = 4
    lr: float = 0.02
    # The lr falls linearly from ``lr`` to this over the run, by the same progress as τ, so the
    # late steps at low τ refine the plan instead of jittering it; None: a constant lr.
    # SmolLM2 2:4, independent sites, 600 s (bench/results/quality.md): 73.2, 78.0 and 75.9
    # against 75.2, 76.6 and 79.5 at a constant lr (means 75.7 and 77.1, within the spread).
    lr_end: float | None = 0.002
    margin: float = 0.1  # initial cost advantage of the starting permutation
    noise: float = 0.01
    tau_start: float = 1.0
    tau_end: float = 0.05
    # Linear: τ stays high longer, and most of the gain comes while it is above ~0.3. SmolLM2 2:4,
    # one permutation per layer, 600 s (bench/results/quality.md): 79.6 against 85.4 exponential;
    # the sweep (16 steps, synchronised): 101.1 against 110.9.
    tau_schedule: str = "linear"
    sinkhorn_iters: int = 5  # bench/results/sweep.md: 5 no worse than 10 (97.1 vs 110.9) at half the Sinkhorn cost
    alpha: float = 1.0  # weight of the distillation KL
    bf16: bool = True  # autocast the model's forward and backward (CPU and CUDA)
    steps_per_block: int = 24  # block-wise objective
    guard_batches: int = 2
    # End to end: hard plans taken at 1/(n+1), 2/(n+1), ... of the run, which the guard weighs
    # beside the last one (the training loss is noisy at low τ and a late plan can be worse).
    snapshots: int = 3
    # End to end: also the hard plans of running averages of the costs (one per decay per step;
    # empty: none).
    # ~15 % of the channels change place at every step, late steps too (bench/results/quality.md):
    # the last plan is one noisy draw, the averaged costs the consensus of the last few steps.
    # SmolLM2 2:4: the 0.8 average won the guard in every full run with (0.8,) alone
    # (bench/results/quality.md); at the end of one run of the default trainer
    # (bench/results/guard_averages.md) the plans of decays 0.8 / 0.9 / 0.95 gave held-out
    # perplexity 74.8 / 72.8 / 74.1 (the last plan 77.9), and the guard picked 0.9.
    average: tuple[float, ...] = (0.8, 0.9)
    # End to end: also the hard plan of the uniform average of the costs over the steps from this
    # share of the run on (Polyak-Ruppert averaging with a burn-in; None: none). The held-out
    # perplexity stops falling about halfway (bench/results/guard.md), and the plans after that
    # are noisy draws around one level: their mean costs are a consensus of many more steps
    # than the 0.8 average's ~5 (guard_averages.md: 73.9 from half the run on, 76.6 from 3/4).
    tail_average: float | None = 0.5
    # End to end: keep the dense logits of the calibration pass (float16, on the host) as the
    # distillation teacher when they fit in this many GiB, instead of a teacher forward at every
    # step (SmolLM2, 2 cores, measured at the older 15 s step: 15.0 s against 15.6 s);
    # 0: always recompute.
    teacher_cache_gb: float = 8.0
    time_budget: float | None = None  # seconds of training; τ anneals by steps or time, whichever is further
    seed: int = 0
    checkpoint_path: str | None = None  # end to end: resumable state (one safetensors file), written atomically
    checkpoint_every: int = 50  # steps between checkpoints (and one after the last step)

    def __post_init__(self) -> None:
        if self.objective not in ("e2e", "blockwise"):
            raise ValueError(f"objective must be 'e2e' or 'blockwise', got {self.objective!r}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs <= 0:
            raise ValueError("lr, batch_size and epochs must be positive")
        if self.lr_end == 0:  # 0 (a recipe or the CLI): a constant lr
            self.lr_end = None
        if self.lr_end is not None and self.lr_end < 0:
            raise ValueError(f"lr_end must be positive (0 or None: a constant lr), got {self.lr_end}")
        TemperatureSchedule(self.tau_start, self.tau_end, 2, self.tau_schedule)  # validates
        if self.snapshots < 0:
            raise ValueError(f"snapshots must be >= 0, got {self.snapshots}")
        if isinstance(self.average, (int, float)):  # one decay given as a number (0: none)
            self.average = (self.average,) if self.average else ()
        self.average = tuple(float(d) for d in self.average)
        if any(not 0.0 < d < 1.0 for d in self.average) or len(set(self.average)) != len(self.average):
            raise ValueError(f"average must hold distinct decays in (0, 1), got {self.average}")
        if self.tail_average is not None and not 0.0 <= self.tail_average < 1.0:
            raise ValueError(f"tail_average must be in [0, 1) (None: none), got {self.tail_average}")
        if self.teacher_cache_gb < 0:
            raise ValueError(f"teacher_cache_gb must be >= 0, got {self.teacher_cache_gb}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")



@dataclass
class PruneConfig:
    """What to prune and how. ``pattern`` keeps N of every M (``"2:4"``) or is
    ``"unstructured50"`` (per-row 50%, the reference ceiling)."""

    pattern: str = "2:4"
    score: str = "wanda"
    permutation: str = "learned"
    groups: int | str = 4  # or "auto": see resolve_groups
    heuristic: str = "zigzag"  # or "zigzag+swap"
    swap_seconds: float = 1.0  # per site, for "zigzag+swap"
    heuristic_power: float = HEURISTIC_POWER  # the search keeps the most Σ score**power (2: output error energy)
    sequential: bool = False  # statistics block by block from the already-pruned blocks
    sync: bool = True  # one permutation per site of layers reading the same input
    attn_out: str = "fold"
    learn: LearnConfig = field(default_factory=LearnConfig)
    progress: bool = True
    offload: bool = False  # block by block: only the current block (and its inputs) on `device`, the rest on CPU
    device: str | None = None  # compute device of the streamed blocks [cuda if available, else cpu]
    # Block-wise: each block learns against the DENSE model's inputs, so blocks are independent
    # and torch.distributed ranks take contiguous shares of them (see _prune_blockwise).
    spread_blocks: bool = False

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}: use one of {SCORES}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"unknown permutation {self.permutation!r}: use one of {PERMUTATIONS}")
        if self.groups != "auto" and not (isinstance(self.groups, int) and self.groups >= 1):
            raise ValueError(f"groups must be 'auto' or an integer >= 1, got {self.groups!r}")
        if not self.heuristic_power > 0:
            raise ValueError(f"heuristic_power must be positive, got {self.heuristic_power}")
        if isinstance(self.learn, dict):
            self.learn = LearnConfig(**self.learn)
        if self.spread_blocks and self.sequential:
            raise ValueError("spread_blocks feeds every block the dense model's inputs; sequential feeds it the "
                             "pruned blocks' outputs: choose one")
        if self.spread_blocks and self.permutation == "learned" and self.learn.objective != "blockwise":
            raise ValueError("spread_blocks needs the block-wise objective (objective='blockwise'); the end-to-end "
                             "objective already shares its work over ranks by splitting batches")

    def to_json(self) -> dict:
        return asdict(self)



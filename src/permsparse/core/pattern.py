"""N:M patterns and masks.

Convention, stated once and used everywhere: ``NMPattern(n_kept=2, m=4)`` parsed from
``"2:4"`` *keeps* 2 weights in every run of 4 consecutive input channels of a row
(50% sparsity). Masks are boolean tensors where ``True`` means *kept*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = [
    "NMPattern",
    "nm_mask",
    "count_violations",
    "unstructured_mask",
    "check_finite",
]

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n_kept`` of every ``m`` consecutive input channels in each weight row."""

    n_kept: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n_kept, int) and isinstance(self.m, int)):
            raise ValueError(f"N:M pattern needs integers, got {self.n_kept!r}:{self.m!r}")
        if not 0 < self.n_kept < self.m:
            raise ValueError(
                f"invalid N:M pattern {self.n_kept}:{self.m}: need 0 < N < M "
                f"(N is the number of weights KEPT in every block of M)"
            )

    @classmethod
    def parse(cls, text: "str | NMPattern") -> "NMPattern":
        """Parse ``"2:4"`` (keep 2 of every 4). Accepts an ``NMPattern`` unchanged."""
        if isinstance(text, NMPattern):
            return text
        match = _PATTERN_RE.match(str(text))
        if match is None:
            raise ValueError(
                f"invalid N:M pattern {text!r}: expected 'N:M' such as '2:4' "
                f"(N weights kept in every block of M input channels)"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.n_kept / self.m

    def check_width(self, d_in: int, groups: int = 1, name: str = "weight") -> None:
        """Raise ``ValueError`` unless ``d_in`` splits into ``groups`` groups of whole M-blocks."""
        if d_in % self.m:
            raise ValueError(f"{name}: input width {d_in} is not divisible by M={self.m} of pattern {self}")
        if groups < 1 or d_in % (groups * self.m):
            raise ValueError(
                f"{name}: input width {d_in} is not divisible by groups*M = {groups}*{self.m}; "
                f"each of the {groups} permutation groups must hold whole blocks of {self.m}"
            )

    def __str__(self) -> str:
        return f"{self.n_kept}:{self.m}"


def check_finite(score: torch.Tensor, name: str = "score") -> None:
    """Raise ``ValueError`` if ``score`` holds NaN or inf (a silent wrong mask otherwise)."""
    if not torch.isfinite(score).all():
        bad = int((~torch.isfinite(score)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf); cannot build a mask from it")


def nm_mask(score: torch.Tensor, pattern: "NMPattern | str", validate: bool = True) -> torch.Tensor:
    """Boolean mask keeping the ``n_kept`` highest scores in every run of ``m`` columns.

    ``score`` is ``(d_out, d_in)``; blocks run along the input dimension. Ties break
    deterministically toward the lower column index (stable sort), so equal scores give
    the same mask on every run and device. ``validate=False`` skips the finiteness check,
    for callers that re-mask the same, already checked score many times (the trainer).
    """
    pattern = NMPattern.parse(pattern)
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (d_out, d_in), got shape {tuple(score.shape)}")
    d_out, d_in = score.shape
    pattern.check_width(d_in)
    if validate:
        check_finite(score)
    blocks = score.detach().reshape(d_out, d_in // pattern.m, pattern.m)  # (O, B, M)
    if pattern.m <= _RANK_MAX_M:
        return _mask_by_rank(blocks, pattern.n_kept).reshape(d_out, d_in)
    order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, order[..., : pattern.n_kept], True)
    return mask.reshape(d_out, d_in)


#: Up to this M the mask counts, for each column, the block-mates that beat it (M(M-1)
#: comparisons of 1/M-size slices) instead of sorting each tiny block, which is faster for
#: small M; the trainer re-masks every moved site at every step, so this is its hot path.
_RANK_MAX_M = 8


def _mask_by_rank(blocks: torch.Tensor, n_kept: int) -> torch.Tensor:
    """The stable-sort mask of ``(O, B, M)`` blocks: column ``i`` is kept when fewer than
    ``n_kept`` block-mates beat it (a higher score, or an equal one at a lower index)."""
    cols = blocks.unbind(-1)
    kept = []
    for i, ci in enumerate(cols):
        beaten = torch.zeros(ci.shape, dtype=torch.uint8, device=blocks.device)
        for j, cj in enumerate(cols):
            if j != i:
                beaten += (cj >= ci) if j < i else (cj > ci)
        kept.append(beaten < n_kept)
    return torch.stack(kept, -1)


def count_violations(weight_or_mask: torch.Tensor, pattern: "NMPattern | str") -> int:
    """Number of M-blocks holding more than ``n_kept`` non-zeros (0 means hardware-valid)."""
    pattern = NMPattern.parse(pattern)
    t = weight_or_mask.detach()
    d_out, d_in = t.shape
    pattern.check_width(d_in)
    nonzero = (t != 0).reshape(d_out, d_in // pattern.m, pattern.m).sum(-1)
    return int((nonzero > pattern.n_kept).sum())


def unstructured_mask(score: torch.Tensor, sparsity: float = 0.5) -> torch.Tensor:
    """Per-row unstructured mask pruning ``sparsity`` of each row: the ceiling no N:M mask beats."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    check_finite(score)
    d_out, d_in = score.shape
    n_keep = d_in - int(round(d_in * sparsity))
    order = torch.sort(score.detach(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(-1, order[:, :n_keep], True)
    return mask


#: Per-row 50 % sparsity: the ceiling no N:M mask reaches.
UNSTRUCTURED = "unstructured50"


def parse_pattern(pattern: "str | NMPattern | None") -> NMPattern | None:
    """``"2:4"`` → ``NMPattern``; ``"unstructured50"`` or ``None`` → ``None`` (per-row 50 %)."""
    if pattern is None or (isinstance(pattern, str) and pattern.strip().lower() == UNSTRUCTURED):
        return None
    return NMPattern.parse(pattern)


def pattern_str(pattern: "str | NMPattern | None") -> str:
    """The canonical text of a pattern: ``"2:4"`` or ``"unstructured50"``."""
    pat = parse_pattern(pattern)
    return UNSTRUCTURED if pat is None else str(pat)

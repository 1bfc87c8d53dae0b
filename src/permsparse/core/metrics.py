"""How much of a score a mask keeps: retained fraction and permutation efficacy."""

from __future__ import annotations

import torch

from permsparse.core.pattern import NMPattern, nm_mask, unstructured_mask
from permsparse.core.permutation import Permutation

__all__ = ["kept_score", "retained", "unstructured_kept", "efficacy"]


def kept_score(score: torch.Tensor, pattern: "NMPattern | str", perm: Permutation | None = None) -> float:
    """Total score the N:M mask keeps after permuting the columns by ``perm``."""
    s = score.detach().float()
    if perm is not None:
        s = perm.apply_to_columns(s)
    return float((s * nm_mask(s, pattern)).sum(dtype=torch.float64))


def retained(score: torch.Tensor, pattern: "NMPattern | str", perm: Permutation | None = None) -> float:
    """Fraction of the total score kept by the (permuted) N:M mask."""
    total = float(score.detach().float().sum(dtype=torch.float64))
    return kept_score(score, pattern, perm) / total if total > 0 else 0.0


def unstructured_kept(score: torch.Tensor, pattern: "NMPattern | str") -> float:
    """Score kept by per-row unstructured pruning at the same sparsity: the ceiling."""
    pattern = NMPattern.parse(pattern)
    s = score.detach().float()
    return float((s * unstructured_mask(s, pattern.sparsity)).sum(dtype=torch.float64))


def efficacy(score: torch.Tensor, pattern: "NMPattern | str", perm: Permutation) -> float:
    """(kept with ``perm`` − kept plain N:M) / (kept unstructured − kept plain N:M).

    0 means the permutation gained nothing, 1 that it reached the unstructured ceiling.
    """
    plain = kept_score(score, pattern)
    ceiling = unstructured_kept(score, pattern)
    if ceiling - plain <= 0:
        return 0.0
    return (kept_score(score, pattern, perm) - plain) / (ceiling - plain)

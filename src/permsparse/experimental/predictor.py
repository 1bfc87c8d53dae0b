"""A data-driven cost predictor: the paper's open question 2.

The paper learns a free lookup table ``C`` of ``k x k`` costs per site and group, so its
parameters grow with the square of the width. The predictor here instead *computes* the
costs from what is known about each input channel:

    C[n, i, j] = C0[n, i, j] + <phi(f[n, i]), psi[n, j // M]>

* ``f[n, i]`` are per-channel features read from the weights and activation statistics
  (:func:`channel_features`: the channel's share of the pruning score, its weight norm, its
  activation norm, how peaked its scores are), standardised within each group;
* ``phi`` is one small MLP shared by every site and group;
* ``psi[n, b]`` is a learnable embedding of N:M block ``b`` of group ``n``. Positions inside
  one block are interchangeable for an N:M mask, so the cost only has to say which *block*
  a channel goes to, not which slot;
* ``C0`` is the fixed starting cost (noise, minus a margin on the warm-start permutation),
  the same as the table's initial value, so both start from the same permutation.

``psi`` starts at zero, so the predictor starts exactly at ``C0``. Parameters per group
are ``(k / M) * dim`` instead of ``k²`` (for SmolLM2's 144-channel groups at 2:4 with
``dim=8``: 288 instead of 20,736), plus the shared MLP.

This module imports no transformers: features come from score and weight matrices.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["N_FEATURES", "channel_features", "CostPredictor"]

#: Features per channel (see :func:`channel_features`).
N_FEATURES = 4


def channel_features(scores: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """``(groups, k, N_FEATURES)`` features of every input channel, standardised per group.

    ``scores`` and ``weights`` are the ``(rows, d_in)`` score and weight matrices of the
    consumers of one site (already arranged so that columns are the permuted channels;
    see ``Site.tied_score`` for head-tied sites). Each consumer is normalised by its mean
    so that consumers weigh by their share, as in the heuristic. The features:

    0. log of the channel's total score (what the mask keeps or drops),
    1. log of the channel's weight column norm,
    2. log of score / |weight| summed over rows: the activation norm for Wanda-like
       scores (constant for magnitude, and then standardised to zero),
    3. log of the largest over the mean score in the column: a peaked column loses
       little when pruned next to a flat one.
    """
    s = torch.cat([x.float().abs() / x.float().abs().mean().clamp_min(1e-30) for x in scores], dim=0)
    w = torch.cat([x.float().abs() / x.float().abs().mean().clamp_min(1e-30) for x in weights], dim=0)
    if s.shape != w.shape:
        raise ValueError(f"scores {tuple(s.shape)} and weights {tuple(w.shape)} must have the same shape")
    d_in = s.shape[1]
    if groups < 1 or d_in % groups:
        raise ValueError(f"d_in={d_in} is not divisible by groups={groups}")
    tiny = 1e-12
    col_s = s.sum(0)
    feats = torch.stack(
        [
            (col_s + tiny).log(),
            (w.pow(2).sum(0) + tiny).log() / 2,
            ((col_s + tiny) / (w.sum(0) + tiny)).log(),
            ((s.amax(0) + tiny) / (s.mean(0) + tiny)).log(),
        ],
        dim=-1,
    ).reshape(groups, d_in // groups, N_FEATURES)
    mean = feats.mean(1, keepdim=True)
    std = feats.std(1, keepdim=True)
    # A constant feature (e.g. activation norm under magnitude scores) carries nothing: zero it.
    return torch.where(std > 1e-6, (feats - mean) / std.clamp_min(1e-6), torch.zeros_like(feats))


class CostPredictor(nn.Module):
    """Costs ``(N, k, k)`` for ``N`` stacked groups of ``k`` channels, predicted from features.

    Args:
        features: ``(N, k, F)`` per-channel features (:func:`channel_features`), fixed.
        base: ``(N, k, k)`` starting cost (fixed; the predictor adds to it).
        m: the pattern's block length ``M``.
        dim: embedding width of the MLP output and of the block embeddings.
        hidden: hidden width of the shared MLP.
        mlp: an MLP to share with other predictors (one per group size, one MLP for all).
    """

    def __init__(
        self,
        features: torch.Tensor,
        base: torch.Tensor,
        m: int,
        dim: int = 8,
        hidden: int = 32,
        mlp: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        n, k, f = features.shape
        if base.shape != (n, k, k):
            raise ValueError(f"base cost must be {(n, k, k)}, got {tuple(base.shape)}")
        if k % m:
            raise ValueError(f"groups of {k} channels are not divisible by M={m}")
        self.m = m
        self.register_buffer("features", features.float().contiguous())
        self.register_buffer("base", base.float().contiguous())
        self.mlp = mlp if mlp is not None else make_mlp(f, hidden, dim, generator)
        # Zero: the predictor starts exactly at ``base``; the MLP still gets gradient
        # through psi after the first step.
        self.psi = nn.Parameter(torch.zeros(n, k // m, dim))

    def forward(self) -> torch.Tensor:
        phi = self.mlp(self.features)  # (N, k, D)
        psi = self.psi.repeat_interleave(self.m, dim=1)  # (N, k, D): slot j -> its block j // M
        # / D: an optimiser step of about lr on every psi entry then moves a predicted cost
        # about as far as it moves one entry of a table (a sum of D such moves otherwise:
        # every channel's cost jumps past the warm start's margin after one step).
        return self.base + torch.einsum("nid,njd->nij", phi, psi) / psi.shape[-1]


def make_mlp(n_in: int, hidden: int, dim: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """The shared feature MLP, initialised from ``generator`` (reproducible)."""
    mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, dim))
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            bound = layer.in_features ** -0.5
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
            layer.bias.zero_()
    return mlp

"""A layer-level learner: one site's permutation fitted by gradient descent on its retained score.

**Finding** (bench/results/core.md, a 256 x 256 layer with log-normal column scales, 2:4,
G = 1): learned from noise, :func:`fit_to_score` reaches 66.4 % efficacy, against 50.1 % for
the plain linearisation of the retained score (``surrogate="linear"``) and 66.9 % for 10 s
of greedy swaps. No better than the heuristic search, at several times its cost; ``prune``
does not use it (the trainer learns from the model's loss instead, :mod:`permsparse.train`).
"""

from __future__ import annotations

import torch
from torch import nn

from permsparse.core.heuristics import insertion_gain
from permsparse.core.metrics import kept_score
from permsparse.core.pattern import NMPattern, nm_mask
from permsparse.core.permutation import Permutation
from permsparse.core.permuter import init_cost, permute_columns, straight_through
from permsparse.core.sinkhorn import TemperatureSchedule, hard_assignment, sinkhorn

__all__ = ["LearnablePermuter", "fit_to_score"]


class LearnablePermuter(nn.Module):
    """Learnable group-wise permutation of ``d_in`` channels for one site.

    Args:
        d_in: channels permuted (the site's input width).
        groups: ``G``; the permutation moves channels only within ``G`` contiguous groups.
        init: ``"noise"`` (zero cost plus noise: uniform soft permutation),
            ``"identity"`` (identity-biased), or ``"permutation"`` (warm start from ``warm_start``).
        margin: how much cheaper the initial assignment is than any other, in cost units.
            With Adam the hard permutation cannot move before about ``margin / lr`` steps,
            so keep the two in proportion.
        noise: standard deviation of the initial noise (breaks ties).
        warm_start: the permutation to start from when ``init="permutation"``.
        generator: for reproducible noise.
    """

    def __init__(
        self,
        d_in: int,
        groups: int = 4,
        init: str = "identity",
        margin: float = 0.5,
        noise: float = 0.01,
        warm_start: Permutation | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.d_in, self.groups = d_in, groups
        cost = init_cost(d_in, groups, init, margin, noise, warm_start, generator)
        self.cost = nn.Parameter(cost)  # (G, k, k)

    @property
    def group_size(self) -> int:
        return self.d_in // self.groups

    def soft(self, tau: float, n_iters: int = 20) -> torch.Tensor:
        """Soft (doubly stochastic) permutation matrices ``(G, k, k)``."""
        return sinkhorn(self.cost, tau, n_iters)

    def hard(self) -> Permutation:
        """The hard permutation: linear assignment on ``-C``, batched over groups."""
        return Permutation.from_local(hard_assignment(self.cost))

    def forward(self, tau: float, n_iters: int = 20) -> tuple[torch.Tensor, Permutation, torch.Tensor]:
        """Straight-through matrices, their hard permutation and the soft entropy.

        Returns ``(P_st, hard, entropy)`` with ``P_st`` of shape ``(G, k, k)``: the value of
        the hard permutation and the gradient of the soft one (:meth:`soft`).
        """
        st = straight_through(self.cost, tau, n_iters, exact=True)
        return st.matrices, Permutation.from_local(st.local), st.entropy.mean()


def fit_to_score(
    score: torch.Tensor,
    pattern: "NMPattern | str",
    groups: int = 4,
    steps: int = 800,
    lr: float = 0.005,
    tau_start: float = 1.0,
    tau_end: float = 0.01,
    n_iters: int = 20,
    init: str = "noise",
    warm_start: Permutation | None = None,
    straight_through: bool = False,
    seed: int = 0,
    surrogate: str = "insertion",
) -> tuple[Permutation, list[float]]:
    """Learn one layer's permutation by gradient descent on its retained score alone.

    A layer-level check of the learnable machinery (the trainer learns from the model's
    loss instead). ``P`` is soft (or straight-through) and the loss linear in it:

    * ``surrogate="insertion"`` (default): ``-Σ gain ⊙ P`` with
      :func:`permsparse.core.heuristics.insertion_gain` at the current hard permutation, the
      exact value of putting each channel in each slot given its block-mates;
    * ``surrogate="linear"``: ``-Σ (S P ⊙ M)`` with the mask of the current permuted score
      (a channel is worth its score in a kept slot and nothing in a pruned one), whose
      fixed points are poorer (bench/results/core.md).

    The hard permutation with the highest retained score seen is returned (the warm start
    counts as seen), with the history of retained fractions per step.
    """
    if surrogate not in ("insertion", "linear"):
        raise ValueError(f"surrogate must be 'insertion' or 'linear', got {surrogate!r}")

    pattern = NMPattern.parse(pattern)
    pattern.check_width(score.shape[1], groups)
    gen = torch.Generator().manual_seed(seed)
    permuter = LearnablePermuter(score.shape[1], groups, init=init, warm_start=warm_start, generator=gen)
    opt = torch.optim.Adam(permuter.parameters(), lr=lr)
    schedule = TemperatureSchedule(tau_start, tau_end, steps)
    s = score.detach().float()
    s_norm = s / s.mean().clamp_min(1e-12)  # scale-free: lr means the same for every layer
    total = float(s.sum(dtype=torch.float64))
    best = warm_start if warm_start is not None else Permutation.identity(s.shape[1], groups)
    best_kept = kept_score(s, pattern, best)
    history = []
    for step in range(steps):
        tau = schedule(step)
        if straight_through:
            p, hard, _ = permuter(tau, n_iters)
        else:
            p, hard = permuter.soft(tau, n_iters), permuter.hard()
        if surrogate == "insertion":
            gain = insertion_gain(s_norm, hard, pattern).float()
            gain = gain / gain.std().clamp_min(1e-12)  # scale-free: lr means the same for every layer
            loss = -(gain * p).sum()
        else:
            sp = permute_columns(s_norm, p)
            with torch.no_grad():
                mask = nm_mask(sp, pattern)
            loss = -(sp * mask).sum() / s.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        kept = kept_score(s, pattern, hard)
        history.append(kept / total)
        if kept > best_kept:
            best, best_kept = hard, kept
    return best, history

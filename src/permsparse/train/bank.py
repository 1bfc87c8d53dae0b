"""The permutation bank (every site's cost) and the weights it gives the model.

:class:`PermutationBank` stacks the costs of all sites by group size, so that Sinkhorn and
the assignment run once per size instead of once per site. :func:`sparse_weights` builds
``W_eff = (W P ⊙ M) Pᵀ`` for every pruned layer from the bank's hard permutations and the
stand-ins of its soft ones (the gradient path to the costs: the soft matrices are recomputed
in the backward, never kept); :func:`hard_params` the same at hard plans.
"""

from __future__ import annotations

from typing import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from permsparse.config import LearnConfig
from permsparse.core.pattern import NMPattern, check_finite
from permsparse.core.permutation import Permutation
from permsparse.core.permuter import hard_permuted_prune, init_cost, unpermuted_mask
from permsparse.core.sinkhorn import EntropySink, hard_assignment, soft_entropy, soft_gradient
from permsparse.models.precision import bf16_on
from permsparse.models.sites import Site

__all__ = ["PermutationBank", "make_bank", "sparse_weights", "weights_by_block", "hard_params", "step_weights", "plan_with",
           "moved_share"]

#: LearnConfig.init -> the bank's init.
_BANK_INIT = {"heuristic": "permutation", "identity": "identity", "noise": "noise", "random": "random"}


class PermutationBank(nn.Module):
    """The costs of many sites, stacked by group size so that Sinkhorn and the assignment
    run once per group size instead of once per site."""

    def __init__(
        self,
        sites: Sequence[Site],
        groups: int,
        pattern: NMPattern,
        start: Mapping[str, Permutation] | None = None,
        init: str = "identity",
        margin: float = 0.1,
        noise: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.sites = list(sites)
        self.groups = groups
        self._slot: dict[str, tuple[str, int, int]] = {}  # site -> (size key, offset, free groups)
        chunks: dict[str, list[torch.Tensor]] = {}
        for site in self.sites:
            _, k = site.structure(groups, pattern)
            free_g = site.free_groups(groups)
            warm = None
            how = init
            if init == "random":  # start from a random (tie-respecting) permutation, as committed as a warm start
                warm = site.random_permutation(groups, gen)
                how = "permutation"
            elif init == "permutation":
                warm = start[site.name] if start and site.name in start else Permutation.identity(site.d_in, site.structure(groups)[0])
            if warm is not None and site.head_tied:
                warm = site.untie(warm, groups)
            cost = init_cost(free_g * k, free_g, how, margin, noise, warm, gen)
            key = str(k)
            offset = sum(c.shape[0] for c in chunks.get(key, []))
            chunks.setdefault(key, []).append(cost)
            self._slot[site.name] = (key, offset, free_g)
        self.costs = nn.ParameterDict({key: nn.Parameter(torch.cat(c)) for key, c in chunks.items()})
        self._ties = {s.name: s.tie_index(groups) for s in self.sites}
        self._tied = {n: not torch.equal(t, torch.arange(len(t))) for n, t in self._ties.items()}
        self._sink = EntropySink()
        self.assign_stats: dict[str, int] = {}  # groups solved each way, summed over the forwards
        self._order: dict[str, list[str]] = {}  # per size, the sites in stacking order
        for name, (key, off, _) in sorted(self._slot.items(), key=lambda kv: (kv[1][0], kv[1][1])):
            self._order.setdefault(key, []).append(name)

    def cost_tensors(self) -> dict[str, torch.Tensor]:
        """The current cost ``(N, k, k)`` per group size."""
        return dict(self.costs.items())

    def hard(self) -> dict[str, Permutation]:
        """The hard permutation of every site."""
        with torch.no_grad():
            local = {key: hard_assignment(c) for key, c in self.cost_tensors().items()}
        return {s.name: self._site_perm(s, local) for s in self.sites}

    def _site_perm(self, site: Site, local: Mapping[str, torch.Tensor]) -> Permutation:
        key, off, n = self._slot[site.name]
        return Permutation.from_local(local[key][off : off + n][self._ties[site.name]])

    def forward(self, tau: float, n_iters: int = 10,
                entropy: bool = True) -> tuple[dict[str, tuple[torch.Tensor, Permutation]], float]:
        """Per site the stand-in of its soft permutation matrices (value zero: only their
        gradient is used, see :func:`~permsparse.core.sinkhorn.soft_gradient`) and its hard
        permutation; and the mean entropy of the soft matrices. ``entropy=False`` skips the
        forward Sinkhorn that measures it (NaN instead): the backward leaves it in
        :attr:`entropy`."""
        p_st: dict[str, torch.Tensor] = {}
        local: dict[str, torch.Tensor] = {}
        self._sink = EntropySink()
        for key, cost in self.cost_tensors().items():
            local[key] = hard_assignment(cost, self.assign_stats)
            p_st[key] = soft_gradient(cost, tau, n_iters, self._sink)
        ent = float("nan")
        if entropy:
            sink = EntropySink()
            for cost in self.cost_tensors().values():
                soft_entropy(cost, tau, n_iters, sink)
            ent = sink.value
        # One split per size, not a slice per site: a slice's backward writes its gradient into a
        # zero tensor the size of the whole stack, once per site (SmolLM2, 210 sites: ~3 s a step).
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for key, names in self._order.items():
            sizes = [self._slot[n][2] for n in names]
            pieces[key] = dict(zip(names, torch.split(p_st[key], sizes)))
        out: dict[str, tuple[torch.Tensor, Permutation]] = {}
        for site in self.sites:
            piece = pieces[self._slot[site.name][0]][site.name]
            if self._tied[site.name]:  # head-tied groups copy their free group (untied: no gather)
                piece = piece[self._ties[site.name]]
            out[site.name] = (piece, self._site_perm(site, local))
        return out, ent

    @property
    def entropy(self) -> float:
        """Mean row entropy of the soft matrices of the last :meth:`forward`, once its backward
        ran (NaN before)."""
        value = self._sink.value
        return float("nan") if value is None else value


def make_bank(
    sites: Sequence[Site],
    groups: int,
    pattern: NMPattern,
    start: Mapping[str, Permutation] | None,
    cfg: LearnConfig,
    scores: Mapping[str, torch.Tensor],
) -> PermutationBank:
    """The bank ``cfg`` asks for, after checking every score once (the steps re-mask them
    without checking them again)."""
    for s in sites:
        for c in s.consumers:
            check_finite(scores[c], f"score of {c}")
    return PermutationBank(sites, groups, pattern, start, _BANK_INIT[cfg.init], cfg.margin, cfg.noise, cfg.seed)


def _relative(name: str, prefix_strip: str) -> str:
    return name[len(prefix_strip) :] if prefix_strip and name.startswith(prefix_strip) else name


def sparse_weights(
    bank_out: Mapping[str, tuple[torch.Tensor, Permutation]],
    sites: Sequence[Site],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    prefix_strip: str = "",
    mask_cache: dict | None = None,
    grad_dtype: torch.dtype | None = None,
    columns: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"<consumer>.weight": W_eff}`` for every consumer, names relative to ``prefix_strip``.

    ``mask_cache`` (a dict kept across steps) reuses each mask while its site's hard
    permutation is unchanged, which late in training is most sites at most steps.
    ``columns``: per consumer, the column gather that brings ``W_eff`` back to the model's
    columns, where ``weights`` and ``scores`` are given in a base layout's (its inverse).
    """
    params = {}
    for site in sites:
        p_st, perm = bank_out[site.name]
        for name in site.consumers:
            mask = None
            if mask_cache is not None:
                hit = mask_cache.get(name)
                if hit is not None and hit[0] == perm:
                    mask = hit[1]
                else:
                    mask = unpermuted_mask(scores[name], perm, pattern, validate=False).to(weights[name].device)
                    mask_cache[name] = (perm, mask)
            w_eff = hard_permuted_prune(weights[name], scores[name], perm, p_st, pattern, mask, grad_dtype)
            if columns is not None and name in columns:
                w_eff = w_eff.index_select(1, columns[name])
            params[f"{_relative(name, prefix_strip)}.weight"] = w_eff
    return params


def weights_by_block(
    bank_out: Mapping[str, tuple[torch.Tensor, Permutation]],
    sites: Sequence[Site],
    blocks: Collection[str],
    build: Callable[[Sequence[Site], str], dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], dict[str, Callable[[], dict[str, torch.Tensor]]]]:
    """:func:`sparse_weights` split for :func:`~permsparse.train.recompute.recomputed_blocks`:
    ``(weights of the sites outside ``blocks``, {block: its builder})``; ``build(sites, prefix)``
    is ``sparse_weights`` of those sites with that ``prefix_strip``."""
    by_block: dict[str, list[Site]] = {}
    rest = []
    for s in sites:
        if s.block and s.block in blocks:
            by_block.setdefault(s.block, []).append(s)
        else:
            rest.append(s)
    builders = {b: (lambda ss=ss, b=b: build(ss, f"{b}.")) for b, ss in by_block.items()}
    return build(rest, ""), builders


def hard_params(
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    prefix_strip: str = "",
) -> dict[str, torch.Tensor]:
    """``{"<consumer>.weight": W ⊙ M[:, π⁻¹]}`` for hard ``perms`` (no gradient)."""
    params = {}
    with torch.no_grad():
        for site in sites:
            perm = perms[site.name]
            for name in site.consumers:
                mask = unpermuted_mask(scores[name], perm, pattern, validate=False)
                w = weights[name]
                params[f"{_relative(name, prefix_strip)}.weight"] = w * mask.to(w.device, w.dtype)
    return params


def step_weights(weights: Mapping[str, torch.Tensor], cfg: LearnConfig) -> Mapping[str, torch.Tensor]:
    """The weights a training step builds ``W_eff`` from. Under bfloat16 autocast every linear
    casts its weight to bfloat16 anyway, so casting once here gives the same forward and
    spares the per-step casts and float32 gathers (SmolLM2, 2 cores: ~1 s a step)."""
    if not weights or not bf16_on(cfg.bf16, next(iter(weights.values())).device):
        return weights
    return {c: w.to(torch.bfloat16) for c, w in weights.items()}


def plan_with(bank: PermutationBank, params: Mapping[str, torch.Tensor]) -> dict[str, Permutation]:
    """The hard plan of ``bank`` with its parameters replaced by ``params`` (restored after)."""
    saved = {k: p.detach().clone() for k, p in bank.named_parameters()}
    with torch.no_grad():
        for k, p in bank.named_parameters():
            p.copy_(params[k])
    try:
        return bank.hard()
    finally:
        with torch.no_grad():
            for k, p in bank.named_parameters():
                p.copy_(saved[k])


def moved_share(prev: Mapping[str, Permutation] | None, cur: Mapping[str, Permutation]) -> float:
    """Share of all channels whose position differs between two plans (0 when ``prev`` is None)."""
    if prev is None:
        return 0.0
    moved = sum(int((prev[n].indices != p.indices).sum()) for n, p in cur.items())
    return moved / max(sum(p.d_in for p in cur.values()), 1)

"""Heuristic permutation search maximising the retained score (baselines and warm starts).

* :func:`zigzag_permutation`: RIA-style channel reallocation: sort the channels of each
  group by importance, deal them zig-zag over the blocks so that important channels do
  not share a block, then refine with linear assignment, one block position at a time.
* :func:`swap_search`: Apex / TETRIS-style greedy channel swaps between blocks, batched
  and bounded by a time budget.

Both take a score in original coordinates ``(d_out, d_in)`` (for a site with several
consumers, the consumers' scores stacked along rows) and return a :class:`Permutation`.
"""

from __future__ import annotations

import logging
import time

import torch
from scipy.optimize import linear_sum_assignment

from permsparse.core.pattern import NMPattern, check_finite
from permsparse.core.permutation import Permutation

__all__ = ["zigzag_permutation", "swap_search", "insertion_gain", "sum_of_max"]

log = logging.getLogger(__name__)

#: The heuristic search maximises the kept ``Σ score**power``; 2 is the output error energy of
#: Wanda's ``|w|·‖x‖`` (results: bench/results/heuristic.md).
HEURISTIC_POWER = 2.0


def _prepare(score: torch.Tensor, pattern: "NMPattern | str", groups: int) -> tuple[torch.Tensor, NMPattern]:
    pattern = NMPattern.parse(pattern)
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (d_out, d_in), got shape {tuple(score.shape)}")
    pattern.check_width(score.shape[1], groups)
    check_finite(score)
    return score.detach().float(), pattern


def zigzag_permutation(
    score: torch.Tensor,
    pattern: "NMPattern | str",
    groups: int = 1,
    refine_rounds: int = 1,
    chunk: int = 64,
) -> Permutation:
    """RIA-style zig-zag allocation plus ``refine_rounds`` rounds of linear assignment.

    Per group, the result never keeps less score than the identity (it falls back to it).
    The score may live on a GPU: the sorting and the gains are computed where it is, only
    each assignment's ``(B, B)`` gain matrix goes to the host for scipy.
    """
    s, pattern = _prepare(score, pattern, groups)
    dev = s.device
    d_out, d_in = s.shape
    k, m = d_in // groups, pattern.m
    n_blocks = k // m
    local = []
    for g in range(groups):
        sg = s[:, g * k : (g + 1) * k]  # (O, k)
        order = torch.argsort(sg.sum(0), descending=True, stable=True)
        rank = torch.arange(k, device=dev)
        rnd, pos = rank // n_blocks, rank % n_blocks
        block = torch.where(rnd % 2 == 0, pos, n_blocks - 1 - pos)
        layout = torch.empty(k, dtype=torch.long, device=dev)
        layout[block * m + rnd] = order  # slot (block, round) holds the channel of that rank
        for _ in range(refine_rounds):
            for slot in range(m):
                layout = _reassign_slot(sg, layout, slot, pattern, chunk)
        # The zig-zag deal is a heuristic and can lose to the identity (mostly on small or
        # structured scores); the refinement never lowers the score, so keep the better.
        identity = torch.arange(k, device=dev)
        if _layout_kept(sg, layout, pattern) < _layout_kept(sg, identity, pattern):
            layout = identity
        local.append(layout.cpu())
    return Permutation.from_local(torch.stack(local))


def _layout_kept(sg: torch.Tensor, layout: torch.Tensor, pattern: NMPattern) -> float:
    """Score kept by the N:M mask of one group ``sg`` ``(O, k)`` laid out as ``layout``."""
    d_out, k = sg.shape
    blocks = sg[:, layout].view(d_out, k // pattern.m, pattern.m)  # (O, B, M)
    return float(torch.topk(blocks, pattern.n_kept, dim=-1).values.sum(dtype=torch.float64))


def _reassign_slot(sg: torch.Tensor, layout: torch.Tensor, slot: int, pattern: NMPattern, chunk: int) -> torch.Tensor:
    """Take the channel at ``slot`` out of every block and put them back by linear assignment.

    With the block's other ``M-1`` columns sorted per row as ``r_1 >= r_2 >= ...``, adding a
    column ``x`` keeps ``top_{n-1}(r) + max(x, r_n)``, so the gain of channel ``c`` in block
    ``b`` is a constant of ``b`` plus ``Σ_rows max(x_c, r_n(b))``.
    """
    m, n = pattern.m, pattern.n_kept
    n_blocks = layout.numel() // m
    blocks = layout.view(n_blocks, m)
    others = torch.cat([blocks[:, :slot], blocks[:, slot + 1 :]], dim=1)  # (B, M-1)
    cand = blocks[:, slot]  # (B,) channels to re-place
    rest = sg[:, others]  # (O, B, M-1)
    r_sorted = torch.sort(rest, dim=-1, descending=True).values
    base = r_sorted[..., : n - 1].sum(dim=(0, 2))  # (B,)
    r_n = r_sorted[..., n - 1]  # (O, B)
    gain = sum_of_max(sg[:, cand], r_n, chunk)  # (C, B)
    gain += base.double().unsqueeze(0)
    rows, cols = linear_sum_assignment(gain.cpu().numpy(), maximize=True)  # channel rows[i] -> block cols[i]
    new = blocks.clone()
    new[torch.from_numpy(cols).to(new.device), slot] = cand[torch.from_numpy(rows).to(new.device)]
    return new.reshape(-1)


def sum_of_max(x: torch.Tensor, t: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``out[c, j] = Σ_rows max(x[:, c], t[:, j])`` in float64, ``chunk`` columns of ``x`` at a time
    (the ``(rows, chunk, J)`` intermediate bounds the memory)."""
    out = torch.empty(x.shape[1], t.shape[1], dtype=torch.float64, device=x.device)
    for c0 in range(0, x.shape[1], chunk):
        out[c0 : c0 + chunk] = torch.maximum(x[:, c0 : c0 + chunk].unsqueeze(2), t.unsqueeze(1)).sum(0).double()
    return out


def insertion_gain(score: torch.Tensor, perm: Permutation, pattern: "NMPattern | str", chunk: int = 64) -> torch.Tensor:
    """``(G, k, k)``: ``gain[g, c, j]`` = score kept in slot ``j``'s block if channel ``c`` sat in slot ``j``,
    the block's other channels staying (up to a constant per slot).

    With the block's other ``M-1`` values in a row sorted as ``r_1 >= r_2 >= ...``, putting
    ``x`` in the slot keeps ``top_{n-1}(r) + max(x, r_n)``, so only ``Σ_rows max(x, r_n)``
    depends on the channel. It is the exact first-order value of moving one channel, with
    the competition inside the block that the plain ``S P ⊙ M`` linearisation ignores (a
    channel placed in a pruned slot may still be kept if it beats a block-mate), and the
    gradient that :func:`permsparse.experimental.layer_learner.fit_to_score` descends by default.
    """
    s, pattern = _prepare(score, pattern, perm.groups)
    n, m = pattern.n_kept, pattern.m
    d_out, d_in = s.shape
    g, k = perm.groups, perm.group_size
    sp = perm.apply_to_columns(s).view(d_out, d_in // m, m)
    vals, order = sp.sort(-1, descending=True)
    rank = order.argsort(-1)  # each slot's rank within its block
    # The n-th largest of the *other* slots: value at rank n (0-based) for a slot among the
    # top n, at rank n-1 otherwise.
    r_n = torch.where(rank < n, vals[..., n : n + 1], vals[..., n - 1 : n]).reshape(d_out, d_in)
    out = torch.empty(g, k, k, dtype=torch.float64, device=s.device)
    for j in range(g):
        cols = slice(j * k, (j + 1) * k)
        out[j] = sum_of_max(s[:, cols], r_n[:, cols], chunk)
    return out


def _block_kept(vals: torch.Tensor, n: int) -> torch.Tensor:
    """Kept score of blocks: ``vals`` is ``(..., O, M)``; sum over rows of the top ``n``."""
    return torch.topk(vals, n, dim=-1).values.sum(dim=(-1, -2))


def swap_search(
    score: torch.Tensor,
    pattern: "NMPattern | str",
    groups: int = 1,
    start: Permutation | None = None,
    time_budget: float = 10.0,
    max_swaps: int | None = None,
    candidates: int = 2048,
    patience: int = 20,
    seed: int = 0,
) -> Permutation:
    """Greedy channel swaps between blocks of the same group while they raise the kept score.

    Each round samples ``candidates`` channel pairs, evaluates every swap exactly, and
    applies the best improving swaps that touch disjoint blocks. Stops after
    ``time_budget`` seconds, ``max_swaps`` swaps, or ``patience`` rounds without a gain.
    """
    s, pattern = _prepare(score, pattern, groups)
    d_out, d_in = s.shape
    m, n = pattern.m, pattern.n_kept
    k = d_in // groups
    perm = start if start is not None else Permutation.identity(d_in, groups)
    if perm.d_in != d_in:
        raise ValueError(f"start permutation has {perm.d_in} channels, score has {d_in}")
    if start is not None:
        # Swaps stay inside groups, so a start that crosses them cannot give a valid result:
        # fail now rather than after the whole time budget.
        try:
            Permutation(start.indices, groups)
        except ValueError as err:
            raise ValueError(f"start permutation does not respect groups={groups}: {err}") from err
    layout = perm.indices.clone()  # position -> channel
    gen = torch.Generator().manual_seed(seed)
    st = s.T.contiguous()  # (d_in, O): rows of st are channels
    n_blocks = d_in // m
    block_val = _block_kept(st[layout].view(n_blocks, m, d_out).transpose(1, 2), n)  # (B,)
    t0, swaps, idle = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < time_budget and idle < patience:
        if max_swaps is not None and swaps >= max_swaps:
            break
        i = torch.randint(0, d_in, (candidates,), generator=gen)
        j = (i // k) * k + torch.randint(0, k, (candidates,), generator=gen)  # same group
        keep = (i // m) != (j // m)
        i, j = i[keep], j[keep]
        if i.numel() == 0:
            idle += 1
            continue
        bi, bj = i // m, j // m
        # Rebuild both blocks with the two positions exchanged and score them.
        pos_i = bi.unsqueeze(1) * m + torch.arange(m)  # (C, M) positions of block i
        pos_j = bj.unsqueeze(1) * m + torch.arange(m)
        ch_i, ch_j = layout[pos_i].clone(), layout[pos_j].clone()
        ci, cj = layout[i], layout[j]
        ch_i[pos_i == i.unsqueeze(1)] = cj
        ch_j[pos_j == j.unsqueeze(1)] = ci
        new_i = _block_kept(st[ch_i].transpose(1, 2), n)  # (C,)
        new_j = _block_kept(st[ch_j].transpose(1, 2), n)
        delta = (new_i + new_j) - (block_val[bi] + block_val[bj])
        order = torch.argsort(delta, descending=True)
        touched: set[int] = set()
        applied = 0
        tol = 1e-6 * float(block_val.abs().mean())
        for idx in order.tolist():
            if delta[idx] <= tol:
                break
            b1, b2 = int(bi[idx]), int(bj[idx])
            if b1 in touched or b2 in touched:
                continue
            touched.update((b1, b2))
            p1, p2 = int(i[idx]), int(j[idx])
            layout[p1], layout[p2] = layout[p2].clone(), layout[p1].clone()
            block_val[b1], block_val[b2] = new_i[idx], new_j[idx]
            applied += 1
            swaps += 1
            if max_swaps is not None and swaps >= max_swaps:
                break
        idle = 0 if applied else idle + 1
    log.debug("swap search: %d swaps in %.2fs", swaps, time.perf_counter() - t0)
    return Permutation(layout, groups)

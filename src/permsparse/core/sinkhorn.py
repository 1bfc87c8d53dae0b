"""Log-domain Sinkhorn, temperature schedules, hard assignment and permutation entropy.

Everything works on a batch of ``G`` square ``k x k`` matrices, one per permutation group.
Soft permutation: ``P = sinkhorn(-C / τ)``; hard permutation: the linear assignment that
maximises ``Σ_j -C[π_j, j]``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from permsparse.core.assignment import solve_assignments

__all__ = [
    "log_sinkhorn",
    "sinkhorn_scaling",
    "sinkhorn_detached",
    "sinkhorn",
    "soft_gradient",
    "soft_entropy",
    "EntropySink",
    "hard_assignment",
    "solver_threads",
    "host_cores",
    "permutation_entropy",
    "TemperatureSchedule",
]


def log_sinkhorn(log_alpha: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """Project ``exp(log_alpha)`` toward the doubly-stochastic matrices; returns ``log P``.

    Alternates row and column normalisation with ``logsumexp`` so that nothing
    over- or underflows, even for ``|log_alpha|`` of ``1e7`` (costs of ``1e4`` at
    ``τ = 1e-3``). ``log_alpha`` is ``(..., k, k)``. The last step normalises columns.
    """
    if log_alpha.shape[-1] != log_alpha.shape[-2]:
        raise ValueError(f"Sinkhorn needs square matrices, got shape {tuple(log_alpha.shape)}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    log_p = log_alpha
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p


@torch.no_grad()
def sinkhorn_scaling(log_alpha: torch.Tensor, n_iters: int = 20) -> torch.Tensor:
    """``log P`` by matrix scaling (one ``exp``, then batched matrix-vector products).

    Several times faster than :func:`log_sinkhorn` for large ``k``; the rows are shifted
    by their maximum first (a row scaling, absorbed by the result), and where an entry
    underflows so far that a column vanishes the log-domain iteration takes over.
    Gradient-free: see :func:`sinkhorn_detached`.
    """
    shifted = log_alpha - log_alpha.amax(dim=-1, keepdim=True)
    kernel = shifted.exp()  # (..., k, k), max 1 per row
    v = torch.ones(kernel.shape[:-1], dtype=kernel.dtype, device=kernel.device)
    for _ in range(n_iters):
        u = 1.0 / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        v = 1.0 / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
    log_p = shifted + torch.log(u).unsqueeze(-1) + torch.log(v).unsqueeze(-2)
    if not torch.isfinite(log_p).all():
        return log_sinkhorn(log_alpha, n_iters)
    return log_p


def sinkhorn_detached(log_alpha: torch.Tensor, n_iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft permutation with a cheap gradient: ``(P, log P)``.

    ``P`` is the Sinkhorn result in value; its gradient treats the row and column
    normalisers as constants (``∂P/∂log_alpha = P`` elementwise) instead of
    differentiating through every iteration. The dropped terms are nearly row and column
    constants, which change neither the soft nor the hard permutation; memory and time
    no longer grow with the iteration count.
    """
    log_p = sinkhorn_scaling(log_alpha.detach(), n_iters)
    soft = torch.exp(log_p + (log_alpha - log_alpha.detach()))
    return soft, log_p


class EntropySink:
    """Where :func:`soft_gradient` leaves the mean row entropy of the soft permutations it
    recomputed (``None`` until its backward ran)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None

    def add(self, entropy: torch.Tensor) -> None:
        self.total += float(entropy.sum())
        self.count += entropy.numel()


def _row_entropy(soft: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Mean row entropy of each soft matrix ``(N, k, k)`` -> ``(N,)``, normalised to ``[0, 1]``."""
    return -(soft * log_p).sum(-1).mean(-1) / math.log(max(soft.shape[-1], 2))


@torch.no_grad()
def soft_entropy(cost: torch.Tensor, tau: float, n_iters: int = 20, sink: EntropySink | None = None,
                 chunk_bytes: int = 1 << 30) -> EntropySink:
    """The mean row entropy of ``sinkhorn(-cost / τ)`` (as :func:`sinkhorn_detached` computes
    it) added into ``sink``, a chunk of groups at a time; no gradient."""
    sink = sink if sink is not None else EntropySink()
    per = _chunk(cost, chunk_bytes)
    for a in range(0, cost.shape[0], per):
        log_p = sinkhorn_scaling(-cost[a : a + per].detach() / tau, n_iters)
        sink.add(_row_entropy(log_p.exp(), log_p))
    return sink


def _chunk(cost: torch.Tensor, chunk_bytes: int) -> int:
    """Groups per chunk so that one ``(n, k, k)`` temporary stays within ``chunk_bytes``."""
    return max(1, chunk_bytes // max(cost[0].numel() * cost.element_size(), 1))


class _SoftGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost: torch.Tensor, tau: float, n_iters: int, sink: EntropySink | None,
                chunk: int) -> torch.Tensor:
        ctx.save_for_backward(cost)
        ctx.tau, ctx.n_iters, ctx.sink, ctx.chunk = tau, n_iters, sink, chunk
        return cost.new_zeros(()).expand(cost.shape)  # no memory: the value is never read

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (cost,) = ctx.saved_tensors
        tau = ctx.tau
        out = torch.empty_like(cost)
        with torch.no_grad():
            for a in range(0, cost.shape[0], ctx.chunk):
                # The steps of sinkhorn_detached's graph, in its order: the same gradient.
                log_p = sinkhorn_scaling(-cost[a : a + ctx.chunk] / tau, ctx.n_iters)
                soft = log_p.exp()
                if ctx.sink is not None:
                    ctx.sink.add(_row_entropy(soft, log_p))
                out[a : a + ctx.chunk] = -((grad[a : a + ctx.chunk] * soft) / tau)
        return out, None, None, None, None


def soft_gradient(cost: torch.Tensor, tau: float, n_iters: int = 20, sink: EntropySink | None = None,
                  chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """A stand-in ``(N, k, k)`` for the soft permutations ``sinkhorn(-cost / τ)`` that carries
    only their gradient: its value is zero (a broadcast scalar, no memory) and its backward
    recomputes the soft matrices from ``cost`` to give :func:`sinkhorn_detached`'s gradient
    (``∂L/∂C = -(∂L/∂P ⊙ P) / τ``). Nothing of the Sinkhorn is kept between forward and backward
    (at LLaMA-2-7B width, two float32 copies of every cost), and the Sinkhorn runs once per step,
    in the backward, a chunk of ``chunk_bytes`` per temporary at a time; ``sink`` receives the
    soft matrices' mean row entropy there.

    For a straight-through trainer whose forward reads only the hard permutation (the bank's
    ``W_eff``); :func:`permsparse.core.permuter.straight_through` builds the dense matrices.
    """
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return _SoftGradient.apply(cost, tau, n_iters, sink, _chunk(cost, chunk_bytes))


def sinkhorn(cost: torch.Tensor, tau: float, n_iters: int = 20) -> torch.Tensor:
    """Soft permutation ``P = sinkhorn(-cost / tau)`` of shape ``(..., k, k)``."""
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return log_sinkhorn(-cost / tau, n_iters).exp()


def hard_assignment(cost: torch.Tensor, stats: dict | None = None) -> torch.Tensor:
    """Hard permutation per group minimising total cost: local indices ``(G, k)`` (host).

    ``result[g, j]`` is the original channel placed at position ``j`` (so
    ``W_g[:, result[g]] == W_g @ P_g``). The assignment of ``sinkhorn(-C/τ)`` equals
    the assignment of ``-C`` for every ``τ`` and iteration count, because Sinkhorn only
    adds row and column constants to ``log P``; so no Sinkhorn is run here. Exact:
    :func:`~permsparse.core.assignment.solve_assignments` (a certificate on the cost's device,
    scipy's Jonker-Volgenant-type solver on host threads for the rest); ``stats`` counts the
    groups each way.
    """
    c = cost.detach()
    if c.dim() == 2:
        c = c.unsqueeze(0)
    if c.dim() != 3 or c.shape[-1] != c.shape[-2]:
        raise ValueError(f"cost must be (G, k, k), got shape {tuple(cost.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("cost holds NaN or inf; cannot solve the assignment")
    # scipy's solver releases the GIL, so the groups are solved on all host cores at once:
    # at LLaMA-2-7B widths the assignments are most of a GPU training step
    # (bench/results/gpu_block.md).
    threads = _THREADS or host_cores()
    return solve_assignments(c, _solver_pool(threads) if threads > 1 else None, stats)


_THREADS: int | None = None  # set by solver_threads; None: one per host core
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)


@contextmanager
def solver_threads(n: int) -> Iterator[None]:
    """Solve the hard assignments on ``n`` host threads inside the ``with`` block (default
    outside it: one per core this process may use; 1: one after another on the caller's thread)."""
    global _THREADS
    if n < 1:
        raise ValueError(f"solver threads must be >= 1, got {n}")
    before, _THREADS = _THREADS, n
    try:
        yield
    finally:
        _THREADS = before


def host_cores() -> int:
    """The CPU cores this process may use (its affinity where the OS says, else all)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def _solver_pool(threads: int) -> ThreadPoolExecutor:
    """One pool of ``threads`` host threads for the assignments, made again when the count
    changes; a forked child (whose copy of the pool has no threads) makes its own."""
    global _POOL
    if _POOL is None or _POOL[:2] != (os.getpid(), threads):
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="permsparse-assign"))
    return _POOL[2]


def permutation_entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean row entropy of soft permutations, normalised to ``[0, 1]`` (0 = hard, 1 = uniform)."""
    k = p.shape[-1]
    if k < 2:
        return p.new_zeros(())
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (..., k)
    return ent.mean() / math.log(k)


@dataclass(frozen=True)
class TemperatureSchedule:
    """Anneals ``τ`` from ``start`` (soft, exploring) to ``end`` (near hard) over ``steps``.

    ``kind``: ``"exponential"`` (geometric, the default), ``"linear"``, ``"cosine"`` or
    ``"constant"`` (stays at ``start``).
    """

    start: float = 1.0
    end: float = 0.01
    steps: int = 100
    kind: str = "exponential"

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.end > 0):
            raise ValueError(f"temperatures must be > 0, got start={self.start}, end={self.end}")
        if self.kind not in ("exponential", "linear", "cosine", "constant"):
            raise ValueError(
                f"unknown temperature schedule {self.kind!r}: use exponential, linear, cosine or constant"
            )

    def __call__(self, step: int) -> float:
        if self.kind == "constant" or self.steps <= 1:
            return self.start
        return self.at(step / (self.steps - 1))

    def at(self, t: float) -> float:
        """Temperature at fraction ``t`` in ``[0, 1]`` of the run."""
        if self.kind == "constant":
            return self.start
        t = min(max(t, 0.0), 1.0)
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** t
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * t))

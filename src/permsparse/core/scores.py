"""Pruning scores (magnitude, Wanda, RIA) and a SparseGPT pruner.

A score has the weight's shape ``(d_out, d_in)``; higher means more important. Scores
move with the weight under a column permutation, so they are computed once in original
coordinates. Activation statistics come as per-input-channel sums of squares
``Σ_t x_tj²`` accumulated over calibration tokens (see :class:`ColumnStats`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from permsparse.core.pattern import NMPattern, check_finite
from permsparse.core.permutation import Permutation

__all__ = [
    "SCORES",
    "ColumnStats",
    "gram",
    "magnitude",
    "wanda",
    "ria",
    "compute_score",
    "SparseGPT",
]

log = logging.getLogger(__name__)

SCORES = ("magnitude", "wanda", "ria", "sparsegpt")


def _full_precision(x: torch.Tensor):
    """No autocast around the Hessian's products: a calibration pass under bfloat16 autocast would
    take them in bfloat16, whose rounding leaves a low-rank ``XᵀX`` indefinite beyond the refit's
    damping (the refit's conjugate gradient then diverges to NaN)."""
    return torch.autocast(x.device.type, enabled=False)


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``xᵀ x`` for ``x`` of shape ``(T, d)``, from its upper block triangle: each of ``blocks``
    block rows is one product with the columns from its diagonal on, and the rest is its
    transpose. About (blocks + 1) / (2 blocks) of the multiply-adds of ``x.T @ x`` (on a 2-core
    AVX2 host, 74 ms against 113 ms for 4,096 x 1,536, 12 against 18 ms at 576 wide), the
    calibration Hessians' share of a block-by-block prune there."""
    d = x.shape[1]
    step = -(-d // blocks)
    if blocks <= 1 or d < 256:  # too narrow for the split to pay for its extra calls
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for i in range(0, d, step):
        row = x[:, i:i + step].T @ x[:, i:]  # (step, d - i): the diagonal block and those right of it
        out[i:i + step, i:] = row
        out[i + step:, i:i + step] = row[:, step:].T
    return out


@dataclass
class ColumnStats:
    """Accumulates per-input-channel statistics of a linear layer's input, batch by batch.

    ``sq_sum[j] = Σ_t x_tj²`` (Wanda, RIA) and, when ``hessian=True``, ``H = 2/n Σ_t x_t x_tᵀ``
    (SparseGPT, reconstruction). ``sq_sum`` is accumulated in float64 on the host. Inputs on the
    host accumulate ``X Xᵀ`` in float64 there too (each batch's product taken in float32);
    inputs on an accelerator accumulate it in float32 where they are (as SparseGPT does),
    because a 7B model's Hessians are ~10^15
    multiply-adds per calibration pass: minutes on a GPU, most of an hour on host cores.
    :meth:`to_host` moves it to the host once calibration is done.
    """

    d_in: int
    hessian: bool = False
    n_tokens: int = 0
    sq_sum: torch.Tensor = field(init=False)
    xxt: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sq_sum = torch.zeros(self.d_in, dtype=torch.float64)
        # ``xxt`` is allocated by the first batch, where that batch lives (see add_batch).

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``(..., d_in)``."""
        if x.device.type == "cpu":
            self.add_terms(self.batch_terms(x))
            return
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features, stats expect {self.d_in}")
        x = x.detach().reshape(-1, self.d_in)  # (T, d_in)
        self.n_tokens += x.shape[0]
        x = x.float()
        self.sq_sum += (x * x).sum(0, dtype=torch.float64).cpu()
        if self.hessian:  # in place: no d_in x d_in temporary on the accelerator
            if self.xxt is None:
                self.xxt = torch.zeros(self.d_in, self.d_in, dtype=x.dtype, device=x.device)
            with _full_precision(x):
                self.xxt.addmm_(x.T.to(self.xxt), x.to(self.xxt))

    def batch_terms(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """What host inputs ``x`` add, ``(tokens, Σ x², Xᵀ X)`` in float64, for :meth:`add_terms`:
        layers that read one tensor (q/k/v, gate/up) compute it once (see ``stat_hooks``)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features, stats expect {self.d_in}")
        x = x.detach().reshape(-1, self.d_in)
        x64 = x.to(torch.float64)
        # One batch's product in float32 (half the time of float64 on host cores; its rounding,
        # ~1e-7 of the entries, is far below the float32 H the refit solves with), summed in float64.
        xtx = None
        if self.hessian:
            x32 = x.float()
            with _full_precision(x32):
                xtx = gram(x32).to(torch.float64)
        return x.shape[0], (x64 * x64).sum(0), xtx

    def add_terms(self, terms: tuple[int, torch.Tensor, torch.Tensor | None]) -> None:
        """Add one batch's :meth:`batch_terms`."""
        n, sq, xtx = terms
        self.n_tokens += n
        self.sq_sum += sq
        if self.hessian:
            if xtx is None:
                raise ValueError("these terms were computed without the Hessian")
            if self.xxt is None:
                self.xxt = torch.zeros(self.d_in, self.d_in, dtype=xtx.dtype, device=xtx.device)
            self.xxt += xtx.to(self.xxt.device)

    def to_host(self) -> "ColumnStats":
        """Move the Hessian accumulator to the host (keeping its dtype); returns ``self``."""
        if self.xxt is not None and self.xxt.device.type != "cpu":
            self.xxt = self.xxt.cpu()
        return self

    def merge(self, other: "ColumnStats") -> None:
        """Add another accumulator's statistics (for sharded calibration)."""
        if other.d_in != self.d_in:
            raise ValueError(f"cannot merge statistics of {other.d_in} input channels into {self.d_in}")
        if self.hessian and not other.hessian:
            raise ValueError(
                "cannot merge statistics collected without the Hessian (hessian=False) into ones "
                "with it: the merged Hessian would miss those tokens"
            )
        self.n_tokens += other.n_tokens
        self.sq_sum += other.sq_sum
        if self.hessian and other.xxt is not None:
            if self.xxt is None:
                self.xxt = other.xxt.clone()
            else:
                self.xxt += other.xxt.to(self.xxt)

    @property
    def col_norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel (float32)."""
        return self.sq_sum.sqrt().float()

    @property
    def H(self) -> torch.Tensor:
        """SparseGPT's Hessian ``2/n X Xᵀ`` (float32)."""
        if not self.hessian:
            raise ValueError("these statistics were collected without the Hessian (hessian=False)")
        if self.xxt is None:  # no batch yet
            return torch.zeros(self.d_in, self.d_in)
        return (2.0 / max(self.n_tokens, 1) * self.xxt).float()


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.detach().abs().float()


def wanda(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: ``|W_ij| * ||X_j||_2``."""
    _check_norm(weight, col_norm)
    return weight.detach().abs().float() * col_norm.float().to(weight.device).unsqueeze(0)


def ria(weight: torch.Tensor, col_norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA: relative importance ``|W|/Σ_row|W| + |W|/Σ_col|W|`` times ``||X_j||_2 ** alpha``."""
    _check_norm(weight, col_norm)
    a = weight.detach().abs().float()
    rel = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12) + a / a.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return rel * col_norm.float().to(weight.device).pow(alpha).unsqueeze(0)


def compute_score(name: str, weight: torch.Tensor, stats: ColumnStats | None = None) -> torch.Tensor:
    """Score by name. ``sparsegpt`` uses Wanda's score to choose permutations (its mask is
    chosen inside :class:`SparseGPT`, which also updates the kept weights)."""
    if name == "magnitude":
        score = magnitude(weight)
    elif name in ("wanda", "ria", "sparsegpt"):
        if stats is None:
            raise ValueError(f"score {name!r} needs calibration statistics")
        score = ria(weight, stats.col_norm) if name == "ria" else wanda(weight, stats.col_norm)
    else:
        raise ValueError(f"unknown score {name!r}: use one of {SCORES}")
    check_finite(score, f"{name} score")
    return score


def _check_norm(weight: torch.Tensor, col_norm: torch.Tensor) -> None:
    if col_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"activation norms of shape {tuple(col_norm.shape)} do not match the weight's "
            f"{weight.shape[1]} input channels"
        )


def _inverse_hessian_factor(H: torch.Tensor, dead: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of the damped inverse Hessian (``H`` is changed in place): dead
    inputs get a unit diagonal, and ``percdamp`` of the mean diagonal keeps it well conditioned."""
    H[dead, dead] = 1.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


class SparseGPT:
    """OBS pruning with the inverse Hessian, N:M aware; updates the kept weights.

    Lifecycle as in the reference implementation: accumulate ``H`` (via
    :class:`ColumnStats` with ``hessian=True``), call :meth:`prune` once. With a
    permutation, pruning happens in permuted coordinates (so the N:M blocks are those of
    the deployed layout) and the result is returned in original coordinates.
    """

    def __init__(self, hessian: torch.Tensor, percdamp: float = 0.01, blocksize: int = 128) -> None:
        if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
            raise ValueError(f"Hessian must be square, got {tuple(hessian.shape)}")
        self.H = hessian.detach().double()
        self.percdamp, self.blocksize = percdamp, blocksize

    @torch.no_grad()
    def prune(
        self,
        weight: torch.Tensor,
        pattern: "NMPattern | str | None",
        perm: Permutation | None = None,
        sparsity: float = 0.5,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(new_weight, kept_mask)`` in original coordinates.

        ``pattern=None`` prunes ``sparsity`` unstructured (per block of columns, as the
        reference does); otherwise N:M along the (permuted) input dimension. ``mask``: a
        kept mask fixed beforehand (original coordinates, e.g. chosen by Wanda under a learned
        permutation); then only the kept weights are updated to compensate for the pruned
        ones (OBS reconstruction), and the mask is returned unchanged.
        """
        d_out, d_in = weight.shape
        if self.H.shape[0] != d_in:
            raise ValueError(f"Hessian is {self.H.shape[0]}x{self.H.shape[0]}, weight has {d_in} inputs")
        pat = NMPattern.parse(pattern) if pattern is not None else None
        if pat is not None:
            pat.check_width(d_in)
        blocksize = self.blocksize
        if pat is not None and blocksize % pat.m:
            blocksize = max(pat.m, blocksize - blocksize % pat.m)

        W = weight.detach().to("cpu", torch.float64).clone()
        H = self.H.clone()
        fixed = None if mask is None else ~mask.detach().to("cpu", torch.bool)  # pruned, original coordinates
        if fixed is not None and fixed.shape != W.shape:
            raise ValueError(f"mask of shape {tuple(fixed.shape)} for a weight of shape {tuple(W.shape)}")
        if perm is not None:
            W = perm.apply_to_columns(W)
            H = H[perm.indices][:, perm.indices]
            fixed = perm.apply_to_columns(fixed) if fixed is not None else None
        dead = torch.diag(H) == 0
        if fixed is None:  # a fixed mask decides alone what is kept
            W[:, dead] = 0.0
        Hinv = _inverse_hessian_factor(H, dead, self.percdamp)

        pruned = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            dinv = torch.diag(Hinv1)
            if fixed is not None:
                mask1 = fixed[:, i1:i2].clone()
            elif pat is None:
                err = W1**2 / dinv.unsqueeze(0) ** 2
                thresh = torch.sort(err.flatten()).values[int(err.numel() * sparsity)]
                mask1 = err <= thresh
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                if fixed is None and pat is not None and i % pat.m == 0:
                    err = W1[:, i : i + pat.m] ** 2 / dinv[i : i + pat.m].unsqueeze(0) ** 2
                    n_pruned = pat.m - pat.n_kept
                    drop = torch.topk(err, n_pruned, dim=1, largest=False).indices
                    mask1.scatter_(1, i + drop, True)
                w = W1[:, i]
                q = w.clone()
                q[mask1[:, i]] = 0.0
                Q1[:, i] = q
                e = (w - q) / Hinv1[i, i]
                W1[:, i:] -= e.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = e
            W[:, i1:i2] = Q1
            pruned[:, i1:i2] = mask1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        kept = ~pruned
        if perm is not None:
            inv = perm.inverse()
            W, kept = inv.apply_to_columns(W), inv.apply_to_columns(kept)
        return W.to(weight.dtype).to(weight.device), kept.to(weight.device)

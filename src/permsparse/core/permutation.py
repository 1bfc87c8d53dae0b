"""Group-wise channel permutations.

A :class:`Permutation` of ``d_in`` channels split into ``groups`` contiguous groups of
``k = d_in / groups``: position ``j`` of the permuted tensor holds original channel
``indices[j]``, and ``indices[j]`` lies in the same group as ``j``.

    W x == W[:, π] x[π]        (apply_to_columns / apply_to_activations)

Folding into a producer whose output feeds the permuted input: ``W_prod[π, :]``
(apply_to_rows), plus its bias ``b[π]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Permutation"]


@dataclass(frozen=True, eq=False)
class Permutation:
    """An index permutation of ``d_in`` channels that moves channels only within groups."""

    indices: torch.Tensor  # (d_in,) long, on CPU
    groups: int = 1

    def __post_init__(self) -> None:
        idx = torch.as_tensor(self.indices).detach().to("cpu", torch.long).reshape(-1)
        object.__setattr__(self, "indices", idx)
        self.validate()

    # -- construction ------------------------------------------------------------------
    @classmethod
    def identity(cls, d_in: int, groups: int = 1) -> "Permutation":
        return cls(torch.arange(d_in), groups)

    @classmethod
    def random(cls, d_in: int, groups: int = 1, generator: torch.Generator | None = None) -> "Permutation":
        k = _group_size(d_in, groups)
        local = torch.stack([torch.randperm(k, generator=generator) for _ in range(groups)])  # (G, k)
        return cls.from_local(local)

    @classmethod
    def from_local(cls, local: torch.Tensor) -> "Permutation":
        """From per-group indices ``(G, k)`` with values in ``[0, k)``."""
        local = torch.as_tensor(local, dtype=torch.long)
        g, k = local.shape
        offsets = torch.arange(g).unsqueeze(1) * k
        return cls((local + offsets).reshape(-1), g)

    @classmethod
    def from_matrices(cls, hard: torch.Tensor) -> "Permutation":
        """From hard permutation matrices ``(G, k, k)`` with ``W_g P_g == W_g[:, π_g]``.

        ``P[i, j] = 1`` means column ``j`` of the result is original column ``i``.
        """
        local = hard.detach().argmax(dim=-2)  # (G, k): for each result column j, its source row
        return cls.from_local(local)

    # -- properties --------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.indices.numel()

    @property
    def group_size(self) -> int:
        return self.d_in // self.groups

    @property
    def local(self) -> torch.Tensor:
        """Per-group indices ``(G, k)`` with values in ``[0, k)``."""
        k = self.group_size
        return self.indices.reshape(self.groups, k) - torch.arange(self.groups).unsqueeze(1) * k

    def is_identity(self) -> bool:
        return bool(torch.equal(self.indices, torch.arange(self.d_in)))

    def validate(self) -> None:
        """Raise ``ValueError`` unless this is a permutation that respects its groups."""
        d_in, g = self.indices.numel(), self.groups
        if g < 1 or d_in == 0 or d_in % g:
            raise ValueError(f"permutation of {d_in} channels cannot be split into {g} equal groups")
        if not torch.equal(torch.sort(self.indices).values, torch.arange(d_in)):
            raise ValueError(f"indices of length {d_in} are not a permutation of 0..{d_in - 1}")
        k = d_in // g
        if not torch.equal(self.indices // k, torch.arange(d_in) // k):
            raise ValueError(f"permutation moves channels across its {g} groups of {k}")

    # -- algebra -----------------------------------------------------------------------
    def inverse(self) -> "Permutation":
        inv = torch.empty_like(self.indices)
        inv[self.indices] = torch.arange(self.d_in)
        return Permutation(inv, self.groups)

    def compose(self, then: "Permutation") -> "Permutation":
        """The permutation that applies ``self`` first and ``then`` second.

        ``x[self][then] == x[self.compose(then)]``. Groups: ``gcd`` of the two counts, the
        finest grouping whose groups contain the groups of both (for nested groupings,
        such as 4 and 1, that is the coarser of the two).
        """
        if then.d_in != self.d_in:
            raise ValueError(f"cannot compose permutations of {self.d_in} and {then.d_in} channels")
        return Permutation(self.indices[then.indices], math.gcd(self.groups, then.groups))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Permutation) and torch.equal(self.indices, other.indices)

    def __hash__(self) -> int:
        return hash(tuple(self.indices.tolist()))

    def __repr__(self) -> str:
        return f"Permutation(d_in={self.d_in}, groups={self.groups}, identity={self.is_identity()})"

    # -- application -------------------------------------------------------------------
    def _idx(self, t: torch.Tensor) -> torch.Tensor:
        return self.indices.to(t.device)

    def apply_to_columns(self, weight: torch.Tensor) -> torch.Tensor:
        """``W[:, π]``: permute the input channels of a ``(d_out, d_in)`` weight."""
        _check_dim(weight.shape[-1], self.d_in, "weight columns")
        return weight.index_select(-1, self._idx(weight))

    def apply_to_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., π]``: permute the last (feature) dimension of activations."""
        _check_dim(x.shape[-1], self.d_in, "activation features")
        return x.index_select(-1, self._idx(x))

    def apply_to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``W[π, ...]``: permute a producer's output rows (or a bias / norm weight vector)."""
        _check_dim(weight.shape[0], self.d_in, "producer rows")
        return weight.index_select(0, self._idx(weight))

    def to_matrices(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Hard permutation matrices ``(G, k, k)`` with ``W_g @ P_g == W_g[:, π_g]``."""
        g, k = self.groups, self.group_size
        mats = torch.zeros(g, k, k, dtype=dtype)
        mats.scatter_(1, self.local.unsqueeze(1), 1.0)  # mats[g, local[g, j], j] = 1
        return mats

    def to_list(self) -> list[int]:
        return self.indices.tolist()


def _group_size(d_in: int, groups: int) -> int:
    if groups < 1 or d_in % groups:
        raise ValueError(f"d_in={d_in} is not divisible by groups={groups}")
    return d_in // groups


def _check_dim(got: int, want: int, what: str) -> None:
    if got != want:
        raise ValueError(f"{what}: size {got} does not match the permutation's {want} channels")

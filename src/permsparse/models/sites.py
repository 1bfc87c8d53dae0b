"""Permutation sites: which linear layers share one input permutation, and how it is paid.

A :class:`Site` is a set of linear layers (``consumers``) that read the very same input,
plus the way the permutation of that input is paid for at run time (DESIGN.md §3):

* ``gather_norm``: the producer is a norm whose output feeds only these consumers; the
  deployable form gathers the norm's output (``norm(x)[..., π]``).
* ``gather``: each consumer gathers its own input (residual-stream readers, or layers the
  registry does not know).
* ``fold``: the producers' output rows are permuted instead (free at run time). Through
  attention (``o_proj`` fed by ``v_proj``) a fold needs a permutation that keeps head
  boundaries and is the same for every query head of a KV group: such sites have one
  permutation group per head, tied across the heads of a KV group.

:func:`find_sites` reads them from the per-family table
(:data:`permsparse.models.families.REGISTRY`, matched by ``config.model_type`` and block
class) or, for anything else, from a traced forward (:mod:`permsparse.models.trace`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from permsparse.core.pattern import NMPattern
from permsparse.core.permutation import Permutation
from permsparse.models.families import REGISTRY, BlockTemplate, match_blocks
from permsparse.models.trace import HEADS, block_of, shared_input_layers

__all__ = [
    "Producer",
    "Site",
    "PAYMENTS",
    "find_sites",
    "trace_sites",
    "get_module",
    "set_module",
    "unhandled_layers",
    "nothing_to_prune",
]

log = logging.getLogger(__name__)

PAYMENTS = ("gather_norm", "gather", "fold")


@dataclass(frozen=True)
class Producer:
    """A module whose output rows ``[row_offset, row_offset + d_in)`` are the site's input."""

    module: str
    row_offset: int = 0


@dataclass(frozen=True)
class Site:
    """Linear layers sharing one input permutation, and how the permutation is paid for."""

    name: str
    consumers: tuple[str, ...]
    d_in: int
    payment: str
    norm: str | None = None
    producers: tuple[Producer, ...] = ()
    head_dim: int | None = None  # set for folds through attention
    kv_of_head: tuple[int, ...] | None = None  # query head -> KV head (ties the heads' permutations)
    block: str = ""  # the block this site belongs to (for block-wise work)

    def __post_init__(self) -> None:
        if self.payment not in PAYMENTS:
            raise ValueError(f"site {self.name}: unknown payment {self.payment!r}; use one of {PAYMENTS}")
        if self.payment == "gather_norm" and not self.norm:
            raise ValueError(f"site {self.name}: payment 'gather_norm' needs the norm module")
        if self.payment == "fold" and not self.producers:
            raise ValueError(f"site {self.name}: payment 'fold' needs producers")

    # -- group structure ---------------------------------------------------------------
    @property
    def head_tied(self) -> bool:
        return self.head_dim is not None

    def structure(self, groups: int, pattern: "NMPattern | str | None" = None) -> tuple[int, int]:
        """``(G, k)`` of this site's permutation for a requested number of groups.

        Head-tied sites ignore ``groups``: one group per head, of ``head_dim`` channels.
        """
        if self.head_tied:
            g, k = self.d_in // self.head_dim, self.head_dim
        else:
            if groups < 1 or self.d_in % groups:
                raise ValueError(f"site {self.name}: input width {self.d_in} is not divisible by groups={groups}")
            g, k = groups, self.d_in // groups
        if pattern is not None:
            pat = NMPattern.parse(pattern)
            if self.d_in % pat.m:  # no choice of groups can help: say which patterns fit
                fits = [m for m in range(2, 33) if self.d_in % m == 0]
                raise ValueError(
                    f"site {self.name} ({', '.join(self.consumers)}): input width {self.d_in} is not a multiple of "
                    f"M={pat.m} of pattern {pat}, whatever the groups; patterns whose M divides {self.d_in} fit "
                    f"(M = {', '.join(map(str, fits)) or 'none up to 32'})"
                )
            if k % pat.m:
                raise ValueError(
                    f"site {self.name} ({', '.join(self.consumers)}): groups of {k} channels are not "
                    f"divisible by M={pat.m} of pattern {pat}; choose groups so that d_in/groups is a multiple of M"
                )
        return g, k

    @property
    def n_free(self) -> int | None:
        """Number of independent head permutations (KV heads) for head-tied sites."""
        return None if self.kv_of_head is None else len(set(self.kv_of_head))

    def tie_index(self, groups: int) -> torch.Tensor:
        """For each permutation group, the index of the free (learnable) group it copies."""
        g, _ = self.structure(groups)
        if self.kv_of_head is None:
            return torch.arange(g)
        return torch.tensor(self.kv_of_head, dtype=torch.long)

    def free_groups(self, groups: int) -> int:
        return int(self.tie_index(groups).max()) + 1

    def expand(self, free: Permutation, groups: int) -> Permutation:
        """A permutation over the free groups, copied onto every tied group."""
        g, k = self.structure(groups)
        local = free.local[self.tie_index(groups)]  # (G, k)
        return Permutation.from_local(local)

    def untie(self, perm: Permutation, groups: int) -> Permutation:
        """The free groups of a tied permutation; raises if the ties are broken."""
        g, k = self.structure(groups)
        if perm.d_in != self.d_in or perm.groups != g:
            raise ValueError(
                f"site {self.name}: permutation has d_in={perm.d_in}, groups={perm.groups}; expected {self.d_in}, {g}"
            )
        tie = self.tie_index(groups)
        n_free = int(tie.max()) + 1
        first = [int((tie == j).nonzero()[0]) for j in range(n_free)]
        local = perm.local
        free = Permutation.from_local(local[first])
        if not torch.equal(local, free.local[tie]):
            raise ValueError(
                f"site {self.name}: the permutation differs between query heads of one KV group, "
                f"so it cannot be folded into {', '.join(p.module for p in self.producers)}"
            )
        return free

    def tied_score(self, score: torch.Tensor, groups: int) -> torch.Tensor:
        """Stack a ``(rows, d_in)`` score so that tied groups share columns: ``(rows·r, n_free·k)``.

        A permutation found for the result, expanded with :meth:`expand`, is the best
        tied permutation of the original.
        """
        if self.kv_of_head is None:
            return score
        g, k = self.structure(groups)
        tie = self.tie_index(groups)
        n_free = int(tie.max()) + 1
        heads = score.reshape(score.shape[0], g, k)  # (O, G, k)
        cols = []
        for j in range(n_free):
            members = (tie == j).nonzero().flatten()
            cols.append(torch.cat([heads[:, h] for h in members.tolist()], dim=0))  # (O·r, k)
        return torch.cat(cols, dim=1)

    def random_permutation(self, groups: int, generator: torch.Generator | None = None) -> Permutation:
        """A random permutation that respects this site's groups and ties."""
        g, k = self.structure(groups)
        free = Permutation.random(self.free_groups(groups) * k, self.free_groups(groups), generator)
        return self.expand(free, groups)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "consumers": list(self.consumers),
            "d_in": self.d_in,
            "payment": self.payment,
            "norm": self.norm,
            "producers": [[p.module, p.row_offset] for p in self.producers],
            "head_dim": self.head_dim,
            "kv_of_head": list(self.kv_of_head) if self.kv_of_head is not None else None,
            "block": self.block,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Site":
        return cls(
            name=d["name"],
            consumers=tuple(d["consumers"]),
            d_in=int(d["d_in"]),
            payment=d["payment"],
            norm=d.get("norm"),
            producers=tuple(Producer(m, int(o)) for m, o in d.get("producers", [])),
            head_dim=d.get("head_dim"),
            kv_of_head=tuple(d["kv_of_head"]) if d.get("kv_of_head") is not None else None,
            block=d.get("block", ""),
        )


# -- module access -------------------------------------------------------------------------


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"model has no module {name!r}") from err


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(get_module(model, parent) if parent else model, child, module)


def _linear_in(module: nn.Module, name: str) -> int:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"{name} is not a linear layer (no 2-D weight)")
    return weight.shape[1]


# -- what cannot be pruned -----------------------------------------------------------------


def unhandled_layers(model: nn.Module, exclude: Sequence[str] = HEADS) -> dict[str, int]:
    """Type name -> count of the modules with a 2-D weight that are not ``nn.Linear`` (nor
    embeddings): layers the tool cannot prune, e.g. GPT-2's transformers ``Conv1D``, whose
    weight is stored ``(d_in, d_out)``. Output heads (``exclude``) are left dense anyway."""
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or name.rsplit(".", 1)[-1] in exclude:
            continue
        weight = module._parameters.get("weight")  # noqa: SLF001 - its own weight, not a child's
        if weight is not None and weight.dim() == 2:
            found[type(module).__name__] = found.get(type(module).__name__, 0) + 1
    return found


def nothing_to_prune(model: nn.Module, exclude: Sequence[str] = HEADS) -> str | None:
    """Why ``model`` has nothing to prune, naming the layer types it could not handle, when it
    holds no ``nn.Linear`` outside its output heads; ``None`` when it holds some."""
    if any(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] not in exclude for n, m in model.named_modules()):
        return None
    return _nothing_message(model, exclude)


def _nothing_message(model: nn.Module, exclude: Sequence[str]) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    types = unhandled_layers(model, exclude)
    what = (", ".join(f"{t} ({n})" for t, n in sorted(types.items())) if types
            else "none with a 2-D weight outside the output heads")
    return (f"nothing to prune in this {kind} model: no nn.Linear layer outside the output heads "
            f"({', '.join(exclude)}); its weight layers are of types the tool cannot handle: {what}")


# -- finding the sites ---------------------------------------------------------------------


def find_sites(
    model: nn.Module,
    sync: bool = True,
    attn_out: str = "fold",
    example_inputs: dict | None = None,
) -> list[Site]:
    """All permutation sites of ``model``, in forward order.

    Args:
        sync: share one permutation among layers that read the same input (the paper's
            choice). ``False`` gives every consumer its own site paid by its own gather.
        attn_out: ``"fold"`` (into ``v`` rows, head-tied) or ``"gather"`` (free groups).
        example_inputs: inputs for the generic fallback's traced forward, for model types
            not in :data:`REGISTRY`.
    """
    if attn_out not in ("fold", "gather"):
        raise ValueError(f"attn_out must be 'fold' or 'gather', got {attn_out!r}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    templates = REGISTRY.get(model_type)
    if templates is None:
        log.info("model type %r is not in the registry; tracing shared inputs instead", model_type)
        if example_inputs is None:
            raise ValueError(
                f"model type {model_type!r} is not in the registry ({', '.join(sorted(REGISTRY))}); "
                "pass example_inputs so that the generic fallback can trace which layers share an input"
            )
        sites = trace_sites(model, example_inputs)
    else:
        sites = []
        for block_name, block, template in match_blocks(model, templates):
            sites.extend(_block_sites(model, block_name, block, template))
        if not sites:
            raise ValueError(f"found no Transformer blocks in this {model_type} model")
    if attn_out == "gather":
        sites = [
            replace(s, payment="gather", producers=(), head_dim=None, kv_of_head=None) if s.head_tied else s
            for s in sites
        ]
    if not sync:
        sites = _split(sites)
    return sites


def _split(sites: Sequence[Site]) -> list[Site]:
    out = []
    for s in sites:
        if len(s.consumers) == 1 or s.payment == "fold":
            out.append(s)
            continue
        for c in s.consumers:
            out.append(Site(f"{s.name}.{c.rsplit('.', 1)[-1]}", (c,), s.d_in, "gather", block=s.block))
    return out


def _block_sites(model: nn.Module, block_name: str, block: nn.Module, template: BlockTemplate) -> list[Site]:
    sites = []
    for spec in template.sites:
        consumers = tuple(f"{block_name}.{c}" for c in spec.consumers)
        widths = {_linear_in(get_module(model, c), c) for c in consumers}
        if len(widths) != 1:
            raise ValueError(f"{block_name}.{spec.name}: consumers read inputs of different widths {sorted(widths)}")
        d_in = widths.pop()
        producers = tuple(Producer(f"{block_name}.{m}", third * d_in) for m, third in spec.producers)
        head_dim = kv_of_head = None
        if spec.through_attention:
            n_heads, n_kv, head_dim = template.heads(block)
            if n_heads * head_dim != d_in or n_heads % n_kv:
                raise ValueError(
                    f"{block_name}.{spec.name}: {n_heads} heads x {head_dim} does not match input width {d_in}"
                )
            per_kv = n_heads // n_kv
            kv_of_head = tuple(h // per_kv for h in range(n_heads))
        sites.append(
            Site(
                name=f"{block_name}.{spec.name}",
                consumers=consumers,
                d_in=d_in,
                payment=spec.payment,
                norm=f"{block_name}.{spec.norm}" if spec.norm else None,
                producers=producers,
                head_dim=head_dim,
                kv_of_head=kv_of_head,
                block=block_name,
            )
        )
    return sites


def trace_sites(model: nn.Module, example_inputs: dict, exclude: Sequence[str] = HEADS) -> list[Site]:
    """Generic fallback: linear layers that receive the very same input tensor in a traced
    forward share a site, paid by gathers. Reports the layers it cannot handle."""
    return [Site(f"{names[0]}.site", names, _linear_in(get_module(model, names[0]), names[0]), "gather",
                 block=block_of(names[0]))
            for names in shared_input_layers(model, example_inputs, exclude)]

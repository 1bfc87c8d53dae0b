"""The deployable form: weights in permuted, hardware-aligned N:M layout.

:func:`deploy` rewrites a model in place so that every consumer of a permuted site holds
``W[:, π]`` (N:M along its stored input dimension) and the permutation is paid for as
the site says: a gather fused into the norm, a gather at the consumer, or folded into the
producers' output rows. The function is unchanged. On CUDA, 2:4 weights can then be
put on the cuSPARSELt kernels (:func:`to_semi_structured`; the fast model with CUDA graphs and
a per-shape dense fallback is :func:`permsparse.models.fast.accelerate`).

Gathers of synchronised sites (q/k/v, gate/up) are paid once, at the norm's output
(:class:`GatheredOutput`), not once per consumer. In eager mode that is one ``index_select``
kernel per site after the norm's kernels; under ``torch.compile`` inductor fuses it into the
norm's kernel as an indirect load (one kernel ``..._index_select_mean_mul_pow_rsqrt...`` for
norm and gather, as many kernels as the norm alone: tests/test_deploy_fast.py).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from permsparse.core.pattern import NMPattern, count_violations
from permsparse.core.permutation import Permutation
from permsparse.models.sites import Site, get_module, set_module
from permsparse.models.sparse24 import Sparse24Linear

__all__ = ["PermutedLinear", "GatheredOutput", "deploy", "count_gathers", "deployed_violations", "to_semi_structured"]

log = logging.getLogger(__name__)


class PermutedLinear(nn.Module):
    """A linear layer whose weight is stored with permuted input channels.

    ``weight`` is ``W[:, π]``; ``input_perm`` (``π``) is gathered from the input when the
    producer does not already deliver permuted features (``None`` otherwise).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_perm: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        if input_perm is not None:
            self.register_buffer("input_perm", input_perm.to(weight.device, torch.long), persistent=False)
        else:
            self.input_perm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)  # (..., d_in) gather
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gather={self.input_perm is not None}"


class GatheredOutput(nn.Module):
    """Wraps a norm so that its output comes out permuted: ``norm(x)[..., π]``."""

    def __init__(self, module: nn.Module, perm: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("perm", perm.to(torch.long), persistent=False)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs).index_select(-1, self.perm)


def _permute_rows_(module: nn.Module, perm: Permutation, offset: int) -> None:
    """Permute output rows ``[offset, offset + d)`` of a producer (weight and bias) in place."""
    idx = perm.indices.to(module.weight.device) + offset
    rows = slice(offset, offset + perm.d_in)
    with torch.no_grad():
        module.weight[rows] = module.weight.index_select(0, idx)
        if getattr(module, "bias", None) is not None:
            module.bias[rows] = module.bias.index_select(0, idx)


def deploy(model: nn.Module, sites: Sequence[Site], perms: Mapping[str, Permutation]) -> nn.Module:
    """Rewrite ``model`` in place into the permuted deployable form; returns it.

    Sites without an entry in ``perms``, or with the identity, are left as they are.
    """
    for site in sites:
        perm = perms.get(site.name)
        if perm is None or perm.is_identity():
            continue
        if perm.d_in != site.d_in:
            raise ValueError(f"site {site.name}: permutation has {perm.d_in} channels, the site reads {site.d_in}")
        gather_here = site.payment == "gather"
        for name in site.consumers:
            lin = get_module(model, name)
            weight = perm.apply_to_columns(lin.weight.detach())
            bias = lin.bias.detach() if getattr(lin, "bias", None) is not None else None
            gather = perm.indices if gather_here else None
            if isinstance(lin, PermutedLinear) and lin.input_perm is not None:
                raise ValueError(f"{name} is already deployed with a gather; deploy a model only once")
            set_module(model, name, PermutedLinear(weight, bias, gather))
        if site.payment == "gather_norm":
            norm = get_module(model, site.norm)
            set_module(model, site.norm, GatheredOutput(norm, perm.indices.to(_device_of(norm))))
        elif site.payment == "fold":
            # Through attention the producer (v) has one copy per KV head, not per query head.
            rows = site.untie(perm, perm.groups) if site.head_tied else perm
            for producer in site.producers:
                _permute_rows_(get_module(model, producer.module), rows, producer.row_offset)
    return model


def count_gathers(model: nn.Module) -> int:
    """Gathers the deployed form pays at run time: one per norm output gathered for a site,
    one per layer that gathers its own input (folded sites pay none)."""
    return sum(isinstance(m, GatheredOutput)
               or (isinstance(m, (PermutedLinear, Sparse24Linear)) and m.input_perm is not None)
               for m in model.modules())


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def deployed_violations(model: nn.Module, sites: Sequence[Site], pattern: "NMPattern | str") -> dict[str, int]:
    """Violating N:M blocks of every consumer weight as stored in the deployed model."""
    return {name: count_violations(get_module(model, name).weight, pattern) for s in sites for name in s.consumers}


def to_semi_structured(model: nn.Module, sites: Sequence[Site]) -> int:
    """Put deployed 2:4 weights on the cuSPARSELt kernels (:class:`Sparse24Linear`, CUDA only).

    Returns the number of layers converted. Needs fp16/bf16 weights on a CUDA device with
    sparse tensor cores; raises ``RuntimeError`` elsewhere. Every input runs the 2:4 kernel
    (no dense fallback; :func:`permsparse.models.fast.accelerate` chooses one per shape).
    The layers' outputs are row-major, so attention keeps its fused fp16 kernels (why that
    matters: :mod:`permsparse.models.sparse24`).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("semi-structured 2:4 kernels need a CUDA device")
    n = 0
    for s in sites:
        for name in s.consumers:
            try:
                set_module(model, name, Sparse24Linear.from_linear(get_module(model, name)))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            n += 1
    return n

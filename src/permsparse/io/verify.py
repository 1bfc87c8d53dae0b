"""The plan of an export checked against its model once, by what it computes.

Field checks (:func:`permsparse.io.plan.read_plan`) and shape checks
(:func:`permsparse.io.plan.check_plan`) cannot see a plan that names another norm of the
same width, drops a consumer or a producer: such a plan deploys into a model that runs, but
computes something else. :func:`check_plan_computes` runs the stock model and the model with
the plan deployed on one small random input and refuses the load unless their outputs agree
within the rounding of the parameters' dtype. With ``deploy=False`` the plan is deployed,
compared and undone exactly (permutations move values, they do not round them), so the
caller keeps the stock model, bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from permsparse.core.permutation import Permutation
from permsparse.models.deploy import GatheredOutput, PermutedLinear, deploy
from permsparse.models.sites import Site, get_module, set_module

__all__ = ["PlanMismatchError", "probe_inputs", "relative_difference", "tolerance", "check_plan_computes"]

log = logging.getLogger(__name__)

#: Relative difference (Frobenius norm) between deployed and stock outputs that rounding alone
#: reaches, by parameter dtype; a plan that does not fit moves the outputs by far more.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
PROBE_TOKENS = 16


class PlanMismatchError(ValueError):
    """The plan deploys into a model that computes something other than the stock model."""


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def probe_inputs(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """One small random input of the kind ``model`` reads: token ids, or an image of the
    configured size (vision-language models get text only)."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = int(getattr(config, "image_size", 224))
        channels = int(getattr(config, "num_channels", 3))
        pixels = torch.randn(1, channels, size, size, generator=g)
        return {"pixel_values": pixels.to(param.device, param.dtype)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0) or 100
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=g).to(param.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float()
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.detach().float()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||a||`` (Frobenius), ``inf`` where either holds NaN or inf."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def _inverse(indices: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(indices)
    inv[indices] = torch.arange(indices.numel(), device=indices.device)
    return inv


def _deploy_site_reversibly(model: nn.Module, site: Site, perm: Permutation) -> Callable[[], None]:
    """Deploy one site; return what puts the stock layers back exactly. The stock consumers
    give up their weights while deployed, so that memory grows by one site at most."""
    stock = {name: get_module(model, name) for name in site.consumers}
    grad = {name: module.weight.requires_grad for name, module in stock.items()}
    deploy(model, [site], {site.name: perm})
    for module in stock.values():
        module.weight = None  # the deployed copy holds the values (permuted)

    def undo() -> None:
        inv = _inverse(perm.indices)
        for name, module in stock.items():
            deployed = get_module(model, name)
            assert isinstance(deployed, PermutedLinear)
            module.weight = nn.Parameter(deployed.weight.detach().index_select(1, inv.to(deployed.weight.device)),
                                         requires_grad=grad[name])
            set_module(model, name, module)
        if site.payment == "gather_norm":
            wrapped = get_module(model, site.norm)
            assert isinstance(wrapped, GatheredOutput)
            set_module(model, site.norm, wrapped.module)
        elif site.payment == "fold":
            rows = site.untie(perm, perm.groups) if site.head_tied else perm
            for producer in site.producers:
                _unpermute_rows_(get_module(model, producer.module), rows, producer.row_offset)

    return undo


def _unpermute_rows_(module: nn.Module, perm: Permutation, offset: int) -> None:
    """The inverse of :func:`permsparse.models.deploy` on a producer's output rows."""
    rows = slice(offset, offset + perm.d_in)
    idx = perm.indices.to(module.weight.device) + offset
    with torch.no_grad():
        module.weight.index_copy_(0, idx, module.weight[rows].clone())
        if getattr(module, "bias", None) is not None:
            module.bias.index_copy_(0, idx, module.bias[rows].clone())


def check_plan_computes(model: nn.Module, sites: Sequence[Site], perms: Mapping[str, Permutation], *,
                        keep_deployed: bool, where: Any = "the plan") -> float:
    """Compare the stock ``model`` with the plan deployed on one random input; returns the
    relative difference. ``keep_deployed``: leave ``model`` deployed (as
    :func:`permsparse.models.deploy.deploy` does), else restore the stock model exactly.

    Raises:
        PlanMismatchError: the outputs differ by more than :data:`TOLERANCE` of the
            parameters' dtype (or are not finite).
    """
    active = [(s, perms[s.name]) for s in sites if s.name in perms and not perms[s.name].is_identity()]
    dtype = next(model.parameters()).dtype
    inputs = probe_inputs(model)
    reached: set[str] = set()
    hooks = [get_module(model, c).register_forward_pre_hook(lambda *_, c=c: reached.add(c))
             for s, _ in active for c in s.consumers]
    try:
        stock = _output(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    missed = [s.name for s, _ in active if not reached.intersection(s.consumers)]
    if missed:  # e.g. a vision tower under a text-only probe: checked by fields and shapes only
        log.info("%s: %d permuted sites are not reached by the probe input (e.g. %s)", where, len(missed), missed[0])
    if keep_deployed:
        deploy(model, [s for s, _ in active], {s.name: p for s, p in active})
        deployed = _output(model, inputs)
    else:
        undo: list[Callable[[], None]] = []
        try:
            for site, perm in active:
                undo.append(_deploy_site_reversibly(model, site, perm))
            deployed = _output(model, inputs)
        finally:
            for step in reversed(undo):
                step()
    diff = relative_difference(stock, deployed)
    log.debug("%s: deployed vs stock outputs differ by %.3g (relative; tolerance %g)", where, diff, tolerance(dtype))
    if not diff <= tolerance(dtype):
        raise PlanMismatchError(
            f"{where} does not fit this model: with the plan deployed its outputs differ from the stock model's by "
            f"{diff:.3g} (relative; rounding in {str(dtype).replace('torch.', '')} stays under {tolerance(dtype):g}); "
            f"the plan was edited or belongs to another model")
    return diff

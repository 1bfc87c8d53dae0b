"""The generic fallback for model types the registry does not know.

Linear layers that receive the very same input tensor in one traced forward read the same
input, so they share a permutation site; with nothing known about their producers, every
such site pays by gathers (DESIGN.md §3). :func:`permsparse.models.sites.trace_sites`
turns the groups found here into sites.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

__all__ = ["HEADS", "shared_input_layers", "block_of"]

log = logging.getLogger(__name__)

HEADS = ("lm_head", "classifier", "score")  # output heads are left dense, as in Wanda and SparseGPT


def block_of(name: str) -> str:
    """The block holding layer ``name``: its innermost ancestor that is a ``ModuleList``
    entry (``...layers.3``), else its parent module."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return name.rpartition(".")[0]


def _trace(model: nn.Module, example_inputs: dict, exclude: Sequence[str]) -> tuple[dict, list[int], list[str]]:
    """Run one forward with pre-hooks on the linear layers: ``(readers of each input
    tensor by id, the ids in forward order, the layers that cannot be handled)``."""
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    keep_alive: list[torch.Tensor] = []  # ids are only unique while the tensors live
    handles = []
    skipped: list[str] = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                skipped.append(f"{name} (input is not a tensor)")
                return
            key = id(x)
            if key not in seen:
                seen[key] = []
                order.append(key)
                keep_alive.append(x)
            if name not in seen[key]:
                seen[key].append(name)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude:
            handles.append(module.register_forward_pre_hook(hook(name)))
        elif type(module).__name__ == "Conv1D":
            skipped.append(f"{name} (transformers Conv1D; weight is (d_in, d_out), not handled)")
    try:
        with torch.no_grad():
            model(**example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen, order, skipped


def shared_input_layers(
    model: nn.Module, example_inputs: dict, exclude: Sequence[str] = HEADS
) -> list[tuple[str, ...]]:
    """The linear layers reading each distinct input tensor of a traced forward, in forward
    order. Layers called more than once per forward, or fed something other than a tensor,
    are left out and logged; so are ``exclude``'s output heads (left dense)."""
    seen, order, skipped = _trace(model, example_inputs, exclude)
    counts: dict[str, int] = {}
    for names in seen.values():
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    groups = []
    for key in order:
        names = [n for n in seen[key] if counts[n] == 1]
        for n in seen[key]:
            if counts[n] > 1 and f"{n} (called more than once per forward)" not in skipped:
                skipped.append(f"{n} (called more than once per forward)")
        if names:
            groups.append(tuple(names))
    for s in skipped:
        log.warning("generic fallback could not handle %s", s)
    return groups

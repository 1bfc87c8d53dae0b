"""Activation checkpointing of the decoder blocks for the end-to-end objective.

The end-to-end step keeps, for the backward, every block's activations and every pruned
layer's ``W_eff`` (at LLaMA-2-7B width and 4 x 2048 tokens about 1.4 GiB per block, 45 GiB for
32 blocks: bench/results/memory.md). With :func:`recomputed_blocks` each block runs under
``torch.utils.checkpoint`` (non-reentrant) and builds its own ``W_eff`` inside: the forward
keeps only each block's input, and the backward runs the block again, one block at a time.
The recomputation gives the same values (the same kernels on the same inputs), so the
gradients, and the plans the trainer reaches, are those of the plain step; the price is one
more forward of the blocks.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

__all__ = ["recomputed_blocks", "no_cache_kwargs"]


@contextmanager
def recomputed_blocks(model: nn.Module, weights_of: Mapping[str, Callable[[], dict[str, torch.Tensor]]]
                      ) -> Iterator[None]:
    """Inside the ``with``, calling ``model`` runs each block named in ``weights_of`` under
    activation checkpointing with the weights ``weights_of[name]()`` returns (names relative to
    the block, as ``functional_call`` takes them), built anew at the forward and at the
    recomputation. The blocks' own ``forward`` is back when the ``with`` ends."""
    patched: list[tuple[nn.Module, object]] = []
    try:
        for name, build in weights_of.items():
            block = model.get_submodule(name)
            patched.append((block, block.__dict__.get("forward")))
            block.forward = _checkpointed(block, build)
        yield
    finally:
        for block, before in reversed(patched):
            _set_forward(block, before)


def _checkpointed(block: nn.Module, build: Callable[[], dict[str, torch.Tensor]]) -> Callable:
    own = block.__dict__.get("forward")

    def run(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    def inner(*args, **kwargs):
        # functional_call calls the module, whose forward is ``run`` during the step (and the
        # class's own after it, when the backward recomputes): the block's own forward here.
        current = block.__dict__.get("forward")
        _set_forward(block, own)
        try:
            return functional_call(block, build(), args, kwargs, strict=False)
        finally:
            _set_forward(block, current)

    return run


def _set_forward(block: nn.Module, forward: object) -> None:
    if forward is None:
        block.__dict__.pop("forward", None)
    else:
        block.forward = forward


def no_cache_kwargs(model: nn.Module) -> dict:
    """``{"use_cache": False}`` for a model whose forward takes it (a causal LM would otherwise
    keep every block's keys and values in a cache that training never reads, and a
    checkpointed block would append to it again when recomputed); else ``{}``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}

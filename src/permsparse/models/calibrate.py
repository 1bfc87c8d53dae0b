"""Calibration: stream batches through the model with hooks and collect per-layer statistics.

Two modes, as in Wanda's and SparseGPT's reference code:

* one-shot (:func:`collect_stats`): every statistic from the dense model in one pass;
* sequential (:func:`run_blocks`): block by block, each block fed by the outputs of the
  already-processed (pruned) blocks before it; the caller's callback prunes a block
  between its statistics pass and the pass that produces the next block's inputs.
  With ``dense=True`` the next block's inputs are produced *before* the callback, so
  every block sees the dense model's inputs (what spreading blocks over ranks needs).

Memory holds one block's cached inputs plus the statistics, whatever the depth.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from permsparse.core.scores import ColumnStats
from permsparse.models.precision import bf16_on
from permsparse.models.sites import get_module

__all__ = [
    "collect_stats",
    "BlockInputs",
    "capture_block_inputs",
    "run_blocks",
    "block_output",
    "stat_hooks",
    "with_hidden",
    "hidden_of",
]

log = logging.getLogger(__name__)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_inputs(batch: "torch.Tensor | dict", device: torch.device) -> dict:
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {"input_ids": batch.to(device)}


class stat_hooks:
    """Context manager: forward pre-hooks on ``layers`` that feed :class:`ColumnStats`."""

    def __init__(self, model: nn.Module, layers: Sequence[str], hessian: bool = False,
                 stats: dict[str, ColumnStats] | None = None) -> None:
        self.model, self.layers, self.hessian = model, list(layers), hessian
        self.stats = stats if stats is not None else {}
        self.handles: list = []
        # The last host input and its terms: q/k/v (gate/up) are called one after the other on
        # one tensor, whose Xᵀ X (most of a calibration pass on CPU) is then computed once.
        self._last: tuple[torch.Tensor, tuple] | None = None

    def _add(self, st: ColumnStats, x: torch.Tensor) -> None:
        if x.device.type != "cpu":
            st.add_batch(x)
            return
        last = self._last
        if last is None or last[0] is not x or (st.hessian and last[1][2] is None):
            self._last = (x, st.batch_terms(x))
        st.add_terms(self._last[1])

    def __enter__(self) -> dict[str, ColumnStats]:
        for name in self.layers:
            lin = get_module(self.model, name)
            st = self.stats.setdefault(name, ColumnStats(lin.weight.shape[1], hessian=self.hessian))

            def hook(module: nn.Module, args: tuple, st: ColumnStats = st) -> None:
                self._add(st, args[0])

            self.handles.append(lin.register_forward_pre_hook(hook))
        return self.stats

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._last = None
        # Hessians accumulated on an accelerator wait on the host until each layer is refitted.
        for st in self.stats.values():
            st.to_host()


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable["torch.Tensor | dict"],
    layers: Sequence[str],
    hessian: bool = False,
    progress: bool = True,
    on_output: Callable[[int, object], None] | None = None,
    bf16: bool = False,
) -> dict[str, ColumnStats]:
    """One-shot statistics of the inputs of ``layers`` over the calibration ``batches``.

    ``on_output(i, output)`` sees the model's output for batch ``i`` (e.g. to keep the
    dense logits as the distillation teacher instead of recomputing them later).
    ``bf16``: run the pass under bfloat16 autocast (the statistics still accumulate in
    float64); the learned path uses it, whose student runs in bfloat16 too."""
    device = _device(model)
    batches = list(batches)
    bf16 = bf16_on(bf16, device)  # only where the device computes it natively
    with stat_hooks(model, layers, hessian) as stats, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for i, batch in enumerate(tqdm(batches, desc="calibrate", disable=not progress, leave=False)):
            out = model(**_as_inputs(batch, device))
            if on_output is not None:
                on_output(i, out)
    _warn_unreached(stats)
    return stats


def _warn_unreached(stats: dict[str, ColumnStats]) -> None:
    """One warning for the layers no calibration input reached (e.g. a vision-language
    model's vision tower calibrated on text only): they are scored by magnitude."""
    empty = [name for name, st in stats.items() if st.n_tokens == 0]
    if empty:
        log.warning("%d of %d layers received no calibration input (%s%s); they are pruned by weight magnitude. "
                    "Calibrate with inputs that reach them (e.g. images for a vision tower) for activation-aware "
                    "scores", len(empty), len(stats), ", ".join(empty[:3]), ", ..." if len(empty) > 3 else "")


@dataclass
class BlockInputs:
    """The positional and keyword arguments one block received, per calibration batch.

    ``outputs``: the dense block's hidden-state outputs on these inputs, when
    :func:`run_blocks` already computed them (``dense`` or ``keep_outputs``), so a caller that needs
    them as targets does not hold a second copy."""

    args: list[tuple]
    kwargs: list[dict]
    outputs: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.args)


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class _StopForward(Exception):
    """Raised by the capture hook to end a forward once the block's inputs are kept."""


def _to(x, device):
    """``x`` (tensors in nested tuples, lists and dicts) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Iterable["torch.Tensor | dict"], progress: bool = True,
    stop: bool = False, device: torch.device | None = None, keep_on: torch.device | None = None,
) -> BlockInputs:
    """Run the model once per batch and keep what ``block`` receives (hidden states,
    masks, position embeddings); the cache object is dropped (no KV caching needed).

    ``stop``: end each forward at ``block`` (nothing after it runs, so it needs no memory);
    ``device``: where the batches go (default: the model's first parameter);
    ``keep_on``: where the kept inputs are stored (default: where they were produced)."""
    device = device or _device(model)
    got = BlockInputs([], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kw = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        args, kw = _detach(args), _detach(kw)
        if keep_on is not None:
            args, kw = _to(args, keep_on), _to(kw, keep_on)
        got.args.append(args)
        got.kwargs.append(kw)
        if stop:
            raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
        for batch in tqdm(list(batches), desc="capture inputs", disable=not progress, leave=False):
            # The hook raises _StopForward once the block's inputs are captured: the rest of
            # the model need not run.
            with contextlib.suppress(_StopForward):
                model(**_as_inputs(batch, device), **extra)
    finally:
        handle.remove()
    return got


def _move_outside_(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that is not inside one of ``blocks``."""
    inside = {id(m) for b in blocks for m in b.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for k, p in list(mod._parameters.items()):  # noqa: SLF001
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for k, b in list(mod._buffers.items()):  # noqa: SLF001
            if b is not None and b.device != device:
                mod._buffers[k] = b.to(device)  # noqa: SLF001


def block_output(out) -> torch.Tensor:
    """The hidden states a block returns (blocks return a tensor or a tuple led by it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same block call with new hidden states (first positional or ``hidden_states=``)."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first_inputs(model: nn.Module, blocks: list[nn.Module], batches: Iterable["torch.Tensor | dict"],
                  progress: bool, offload_to: torch.device | None) -> BlockInputs:
    """The first block's inputs. Offloading, the blocks stay on CPU and the layers before the
    first block visit ``offload_to`` for the capture (which stops at the first block)."""
    if offload_to is None:  # the forward ends at the first block: the rest would run for nothing
        return capture_block_inputs(model, blocks[0], batches, progress, stop=True)
    cpu = torch.device("cpu")
    for b in blocks:
        b.to(cpu)
    _move_outside_(model, blocks, offload_to)
    try:
        return capture_block_inputs(model, blocks[0], batches, progress, stop=True, device=offload_to, keep_on=cpu)
    finally:
        _move_outside_(model, blocks, cpu)


def _next_inputs(block: nn.Module, inputs: BlockInputs, dense: bool) -> BlockInputs:
    """The next block's inputs: this block's outputs (the dense ones already computed when
    ``dense``, else those of the block as it is now, i.e. pruned)."""
    if dense:
        outs = inputs.outputs
    else:
        with torch.no_grad():
            outs = [block_output(block(*a, **k)) for a, k in zip(inputs.args, inputs.kwargs)]
    calls = [with_hidden(a, k, o) for a, k, o in zip(inputs.args, inputs.kwargs, outs)]
    return BlockInputs([a for a, _ in calls], [k for _, k in calls])


def run_blocks(
    model: nn.Module,
    blocks: Sequence[tuple[str, nn.Module]],
    batches: Iterable["torch.Tensor | dict"],
    layers_of_block: Callable[[str], Sequence[str]],
    on_block: Callable[[str, nn.Module, dict[str, ColumnStats], BlockInputs], None],
    hessian: bool = False,
    progress: bool = True,
    offload: bool = False,
    device: "torch.device | str | None" = None,
    owned: Callable[[str], bool] | None = None,
    dense: bool = False,
    keep_outputs: bool = False,
) -> None:
    """Sequential calibration over a chain of blocks.

    For each block: collect the statistics of its layers on its cached inputs, call
    ``on_block(name, block, stats, inputs)`` (which prunes it, or learns its permutations),
    then run the (now pruned) block to produce the next block's inputs.

    ``dense=True`` runs each block *before* ``on_block`` (its outputs are handed over as
    ``inputs.outputs``), so every block is fed by the dense blocks before it even though
    ``on_block`` prunes them. ``owned(name)``: only those blocks get statistics and
    ``on_block``; the others are only run forward (with ``dense=True``, to reach the
    owned ones), and the walk stops after the last owned block. ``keep_outputs=True`` hands
    the dense outputs over too without ``dense`` (the statistics pass computes them anyway: a
    caller that learns against them is spared a second pass of the block); the next block is
    still fed the block as ``on_block`` left it.

    ``offload=True`` streams: the model stays on CPU; the layers before the first block
    visit ``device`` for the capture (which stops at the first block), then each block in
    turn is moved to ``device`` with its cached inputs, processed, and moved back; between
    blocks the cached inputs live on CPU. Device memory holds one block, its inputs and
    its working set, whatever the depth.
    """
    mine = [owned is None or owned(name) for name, _ in blocks]
    if not any(mine):
        return
    if owned is not None and not dense:
        raise ValueError("run_blocks: owned= needs dense=True (pruned blocks that are not owned would be skipped)")
    last = max(i for i, m in enumerate(mine) if m)
    cpu = torch.device("cpu")
    if offload:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = _first_inputs(model, [b for _, b in blocks], batches, progress, device if offload else None)
    n = len(blocks)
    bar = tqdm(blocks[: last + 1], desc=f"block 1/{n}", disable=not progress)
    for i, (name, block) in enumerate(bar):
        bar.set_description(f"block {i + 1}/{n}")
        bar.set_postfix_str(name if mine[i] else f"{name} (forward only)")
        if offload:
            block.to(device)
            inputs = BlockInputs(_to(inputs.args, device), _to(inputs.kwargs, device))
        # One pass: the statistics (owned blocks) and, where asked, the dense outputs.
        keep = dense or (keep_outputs and mine[i])
        hooks = stat_hooks(model, layers_of_block(name), hessian) if mine[i] else contextlib.nullcontext({})
        outs: list[torch.Tensor] = []
        with torch.no_grad(), hooks as stats:
            for args, kwargs in zip(inputs.args, inputs.kwargs):
                y = block(*args, **kwargs)
                if keep:
                    outs.append(block_output(y).detach())
                del y  # the block's whole output (attention weights, cache) is not kept
        if keep:
            inputs.outputs = outs
        if mine[i]:
            on_block(name, block, stats, inputs)
        if i < last:
            inputs = _next_inputs(block, inputs, dense)
        if offload:
            block.to(cpu)
            if i < last:
                inputs = BlockInputs(_to(inputs.args, cpu), _to(inputs.kwargs, cpu))
            if device.type == "cuda":
                torch.cuda.empty_cache()

"""Data parallelism over ``torch.distributed`` (gloo on CPU, nccl on GPU).

Every rank holds the whole (frozen) model and the same costs. Each global calibration
batch of ``batch_size`` windows is split into ``world`` equal shards; a rank runs its
shard, and the cost gradients are all-reduced (sum / world) before the optimizer step.
CE and KL are means over tokens, so with equal shards the mean of the per-rank
gradients is the gradient of the global mean loss: the update is the single-process
one (up to float summation order). Calibration statistics (sums) are all-reduced so
every rank scores with the global statistics. Only rank 0 writes files.

In block-wise mode the blocks themselves can be spread over the ranks instead
(:func:`block_owners`): each rank learns its contiguous share of blocks, then the
results are gathered (:func:`all_gather_object`) and each pruned block's weights are
broadcast from the rank that owns it (:func:`broadcast_`).

Without an initialised process group every helper is the single-process identity, so
the same code path (and the same command) runs in one process.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Mapping

import torch

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "is_main",
    "init_from_env",
    "shard_batch",
    "all_reduce_mean_",
    "all_reduce_grads_",
    "all_reduce_stats_",
    "mean_float",
    "any_flag",
    "barrier",
    "block_owners",
    "all_gather_object",
    "broadcast_",
]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(timeout_minutes: float = 120.0) -> bool:
    """Initialise the process group from torchrun's environment (``WORLD_SIZE`` > 1);
    gloo without CUDA, nccl with it (each rank on ``cuda:LOCAL_RANK``). Returns whether
    this call initialised it (the caller then destroys it)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shard_batch(batch: Mapping[str, torch.Tensor]) -> dict:
    """This rank's equal share of a global batch (every tensor split along dim 0)."""
    world = world_size()
    if world == 1:
        return dict(batch)
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot shard a batch whose tensors disagree on the batch size: {sorted(sizes)}")
    n = sizes.pop()
    if n % world:
        raise ValueError(
            f"a global batch of {n} windows does not split evenly over {world} processes: make --batch-size "
            f"(and --n-calib) a multiple of the number of processes"
        )
    per, r = n // world, rank()
    return {k: v[r * per : (r + 1) * per] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in batch.items()}


def _on_comm_device(t: torch.Tensor, collective) -> torch.Tensor:
    """Run ``collective`` in place on ``t``; nccl only handles CUDA tensors, so CPU ones
    (offloaded blocks, statistics) take a round trip through the current device."""
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        dev = t.to(f"cuda:{torch.cuda.current_device()}")
        collective(dev)
        t.copy_(dev.cpu())
    else:
        collective(t)
    return t


def _all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In place all-reduce (sum by default)."""
    op = torch.distributed.ReduceOp.SUM if op is None else op
    return _on_comm_device(t, lambda x: torch.distributed.all_reduce(x, op=op))


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``t`` over ranks."""
    if is_distributed():
        _all_reduce_(t)
        t.div_(world_size())
    return t


def all_reduce_grads_(params) -> None:
    """Average the gradients of ``params`` over ranks (one flat all-reduce)."""
    if not is_distributed():
        return
    ps = [p for p in params if p.grad is not None]
    if not ps:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in ps])
    all_reduce_mean_(flat)
    off = 0
    for p in ps:
        n = p.grad.numel()
        p.grad.copy_(flat[off : off + n].view_as(p.grad))
        off += n


def all_reduce_stats_(stats: Mapping) -> None:
    """Sum :class:`~permsparse.core.scores.ColumnStats` over ranks (sq_sum, xxt, n_tokens), in
    sorted name order so every rank issues the same collectives."""
    if not is_distributed():
        return
    for name in sorted(stats):
        st = stats[name]
        _all_reduce_(st.sq_sum)
        if st.hessian:
            # One dtype on every rank (a shard without tokens has no accumulator; one from a GPU is float32).
            st.xxt = torch.zeros(st.d_in, st.d_in, dtype=torch.float64) if st.xxt is None else st.xxt.double()
            _all_reduce_(st.xxt)
        n = torch.tensor([st.n_tokens], dtype=torch.float64)
        _all_reduce_(n)
        st.n_tokens = int(n.item())


def mean_float(x: float) -> float:
    """The mean of a Python float over ranks."""
    if not is_distributed():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    return float(all_reduce_mean_(t).item())


def any_flag(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. "the time budget is spent")."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    _all_reduce_(t, torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def block_owners(n_blocks: int, world: int | None = None) -> list[int]:
    """The rank that owns each of ``n_blocks`` blocks: contiguous shares, the first
    ``n_blocks % world`` ranks one block more. Contiguous (not round-robin) so that a
    rank can stop its forward walk after its last block."""
    world = world_size() if world is None else world
    per, extra = divmod(n_blocks, world)
    owners: list[int] = []
    for r in range(world):
        owners += [r] * (per + (1 if r < extra else 0))
    return owners


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; keep it to plain Python values), in rank order."""
    if not is_distributed():
        return [obj]
    got: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(got, obj)
    return got


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """In place: every rank's ``t`` becomes rank ``src``'s."""
    if is_distributed():
        _on_comm_device(t, lambda x: torch.distributed.broadcast(x, src=src))
    return t

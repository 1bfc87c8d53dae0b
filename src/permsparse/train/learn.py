"""The trainer: learn every site's permutation from the model's loss, the model frozen.

End to end (the paper's method): each step builds ``W_eff = (W P ⊙ M) Pᵀ`` for every
pruned layer from the straight-through permutations of all sites, runs the model with
those weights (``torch.func.functional_call``; the model's own parameters never change),
and descends ``CE + α · KL(dense ‖ sparse)`` on the costs only.

Block-wise (an option): each block learns against its own dense output on cached
inputs (MSE), then is pruned and feeds the next; memory does not grow with depth.

Both end with hard permutations and a guard that keeps, per run (end to end) or per
block (block-wise), whichever of {no permutation, heuristic, learned} has the lowest
calibration loss, and says which it kept.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from permsparse.train import distributed as dist
from permsparse.train.loss import IGNORE_INDEX, lm_ce_kl
from permsparse.core.pattern import NMPattern, check_finite
from permsparse.core.permutation import Permutation
from permsparse.core.permuter import GroupAdam, hard_permuted_prune, init_cost, unpermuted_mask
from permsparse.core.sinkhorn import TemperatureSchedule, hard_assignment, sinkhorn_detached
from permsparse.config import LearnConfig
from permsparse.models.sites import Site

__all__ = [
    "PermutationBank",
    "NonFiniteLossError",
    "StepLog",
    "train_end_to_end",
    "train_block",
    "block_loss",
    "evaluate_plan",
    "teacher_logits",
    "TeacherCache",
    "hard_params",
    "TrainState",
    "sparse_weights",
    "task_loss",
    "make_batches",
    "save_checkpoint",
    "load_checkpoint",
    "moved_share",
]

log = logging.getLogger(__name__)


#: LearnConfig.init -> the bank's init.
_BANK_INIT = {"heuristic": "permutation", "identity": "identity", "noise": "noise", "random": "random"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the bank holds the last good costs."""


@dataclass
class StepLog:
    step: int
    loss: float
    ce: float
    kl: float
    tau: float
    entropy: float
    changed: float  # share of channels whose hard position changed this step
    seconds: float
    lr: float = float("nan")  # the step's learning rate (NaN in logs written before it was recorded)

    def to_json(self) -> dict:
        return asdict(self)


class PermutationBank(nn.Module):
    """The costs of many sites, stacked by group size so that Sinkhorn and the assignment
    run once per group size instead of once per site."""

    def __init__(
        self,
        sites: Sequence[Site],
        groups: int,
        pattern: NMPattern,
        start: Mapping[str, Permutation] | None = None,
        init: str = "identity",
        margin: float = 0.1,
        noise: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.sites = list(sites)
        self.groups = groups
        self._slot: dict[str, tuple[str, int, int]] = {}  # site -> (size key, offset, free groups)
        chunks: dict[str, list[torch.Tensor]] = {}
        for site in self.sites:
            _, k = site.structure(groups, pattern)
            free_g = site.free_groups(groups)
            warm = None
            how = init
            if init == "random":  # start from a random (tie-respecting) permutation, as committed as a warm start
                warm = site.random_permutation(groups, gen)
                how = "permutation"
            elif init == "permutation":
                warm = start[site.name] if start and site.name in start else Permutation.identity(site.d_in, site.structure(groups)[0])
            if warm is not None and site.head_tied:
                warm = site.untie(warm, groups)
            cost = init_cost(free_g * k, free_g, how, margin, noise, warm, gen)
            key = str(k)
            offset = sum(c.shape[0] for c in chunks.get(key, []))
            chunks.setdefault(key, []).append(cost)
            self._slot[site.name] = (key, offset, free_g)
        self.costs = nn.ParameterDict({key: nn.Parameter(torch.cat(c)) for key, c in chunks.items()})
        self._ties = {s.name: s.tie_index(groups) for s in self.sites}
        self._tied = {n: not torch.equal(t, torch.arange(len(t))) for n, t in self._ties.items()}
        self._order: dict[str, list[str]] = {}  # per size, the sites in stacking order
        for name, (key, off, _) in sorted(self._slot.items(), key=lambda kv: (kv[1][0], kv[1][1])):
            self._order.setdefault(key, []).append(name)

    def cost_tensors(self) -> dict[str, torch.Tensor]:
        """The current cost ``(N, k, k)`` per group size."""
        return dict(self.costs.items())

    def hard(self) -> dict[str, Permutation]:
        """The hard permutation of every site."""
        with torch.no_grad():
            local = {key: hard_assignment(c) for key, c in self.cost_tensors().items()}
        return {s.name: self._site_perm(s, local) for s in self.sites}

    def _site_perm(self, site: Site, local: Mapping[str, torch.Tensor]) -> Permutation:
        key, off, n = self._slot[site.name]
        return Permutation.from_local(local[key][off : off + n][self._ties[site.name]])

    def forward(self, tau: float, n_iters: int = 10) -> tuple[dict[str, tuple[torch.Tensor, Permutation]], float]:
        """Straight-through matrices and hard permutation per site, and the mean entropy."""
        out: dict[str, tuple[torch.Tensor, Permutation]] = {}
        p_st: dict[str, torch.Tensor] = {}
        local: dict[str, torch.Tensor] = {}
        ent_sum, ent_n = 0.0, 0
        for key, cost in self.cost_tensors().items():
            soft, log_p = sinkhorn_detached(-cost / tau, n_iters)  # (N, k, k)
            loc = hard_assignment(cost)  # (N, k)
            hard = torch.zeros_like(soft).scatter_(1, loc.unsqueeze(1).to(soft.device), 1.0)
            p_st[key] = hard + (soft - soft.detach())  # value: exactly the hard matrices
            local[key] = loc
            with torch.no_grad():
                row_ent = -(soft * log_p).sum(-1).mean(-1) / math.log(max(cost.shape[-1], 2))  # (N,)
            ent_sum += float(row_ent.sum())
            ent_n += row_ent.numel()
        # One split per size, not a slice per site: a slice's backward writes its gradient into a
        # zero tensor the size of the whole stack, once per site (SmolLM2, 210 sites: ~3 s a step).
        pieces: dict[str, dict[str, torch.Tensor]] = {}
        for key, names in self._order.items():
            sizes = [self._slot[n][2] for n in names]
            pieces[key] = dict(zip(names, torch.split(p_st[key], sizes)))
        for site in self.sites:
            piece = pieces[self._slot[site.name][0]][site.name]
            if self._tied[site.name]:  # head-tied groups copy their free group (untied: no gather)
                piece = piece[self._ties[site.name]]
            out[site.name] = (piece, self._site_perm(site, local))
        return out, ent_sum / max(ent_n, 1)


def sparse_weights(
    bank_out: Mapping[str, tuple[torch.Tensor, Permutation]],
    sites: Sequence[Site],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    prefix_strip: str = "",
    mask_cache: dict | None = None,
    grad_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``{"<consumer>.weight": W_eff}`` for every consumer, names relative to ``prefix_strip``.

    ``mask_cache`` (a dict kept across steps) reuses each mask while its site's hard
    permutation is unchanged, which late in training is most sites at most steps.
    """
    params = {}
    for site in sites:
        p_st, perm = bank_out[site.name]
        for name in site.consumers:
            rel = name[len(prefix_strip) :] if prefix_strip and name.startswith(prefix_strip) else name
            mask = None
            if mask_cache is not None:
                hit = mask_cache.get(name)
                if hit is not None and hit[0] == perm:
                    mask = hit[1]
                else:
                    mask = unpermuted_mask(scores[name], perm, pattern).to(weights[name].device)
                    mask_cache[name] = (perm, mask)
            params[f"{rel}.weight"] = hard_permuted_prune(
                weights[name], scores[name], perm, p_st, pattern, mask, grad_dtype
            )
    return params


def task_loss(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor], teacher: torch.Tensor | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)``: next-token CE (or label CE when the batch has labels) + α·KL."""
    teacher = teacher if alpha != 0 else None
    if "labels" in batch:  # a classifier: few classes, the plain form
        logits = logits.float()
        s_logp = F.log_softmax(logits, -1)
        ce = F.nll_loss(s_logp, batch["labels"].to(logits.device))
        if teacher is None:
            kl = torch.zeros((), device=logits.device)
        else:
            t_logp = F.log_softmax(teacher.to(logits.device).float(), -1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        return ce + alpha * kl, ce, kl
    # Next token: the last position of each row has no target; the chunked form keeps the
    # 49k-vocabulary softmax of the student and the teacher from being materialised.
    ids = batch["input_ids"].to(logits.device)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], 1)
    ce, kl = lm_ce_kl(logits, targets, teacher)
    return ce + alpha * kl, ce, kl


def _autocast(enabled: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def moved_share(prev: Mapping[str, Permutation] | None, cur: Mapping[str, Permutation]) -> float:
    """Share of all channels whose position differs between two plans (0 when ``prev`` is None)."""
    if prev is None:
        return 0.0
    moved = sum(int((prev[n].indices != p.indices).sum()) for n, p in cur.items())
    return moved / max(sum(p.d_in for p in cur.values()), 1)


def make_batches(windows: "torch.Tensor | Sequence[Mapping]", batch_size: int) -> list[dict]:
    if isinstance(windows, torch.Tensor):
        return [{"input_ids": windows[i : i + batch_size]} for i in range(0, windows.shape[0], batch_size)]
    return list(windows)


def hard_params(
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    prefix_strip: str = "",
) -> dict[str, torch.Tensor]:
    """``{"<consumer>.weight": W ⊙ M[:, π⁻¹]}`` for hard ``perms`` (no gradient)."""
    params = {}
    with torch.no_grad():
        for site in sites:
            perm = perms[site.name]
            for name in site.consumers:
                rel = name[len(prefix_strip) :] if prefix_strip and name.startswith(prefix_strip) else name
                mask = unpermuted_mask(scores[name], perm, pattern)
                params[f"{rel}.weight"] = weights[name] * mask.to(weights[name].device, weights[name].dtype)
    return params


@dataclass
class TrainState:
    """What a step callback may look at: the bank and what it is trained against."""

    bank: "PermutationBank"
    sites: Sequence[Site]
    weights: Mapping[str, torch.Tensor]
    scores: Mapping[str, torch.Tensor]
    pattern: NMPattern

    def hard_params(self, perms: Mapping[str, Permutation] | None = None) -> dict[str, torch.Tensor]:
        """Pruned weights at the current (or given) hard permutations, for ``functional_call``."""
        return hard_params(self.sites, perms or self.bank.hard(), self.weights, self.scores, self.pattern)


class TeacherCache:
    """Collects the dense model's logits batch by batch (``collect_stats``'s ``on_output``),
    in float16 on the host, up to ``budget_gb``; past it, it drops them and keeps none
    (``logits`` is then ``None``) so that the trainer recomputes its teacher instead."""

    def __init__(self, budget_gb: float) -> None:
        self.budget = budget_gb * 2**30
        self.bytes = 0
        self._logits: list[torch.Tensor] | None = []

    def __call__(self, index: int, output) -> None:
        if self._logits is None:
            return
        if index != len(self._logits):
            raise ValueError(f"teacher cache: batch {index} arrived after {len(self._logits)} batches")
        t = output.logits.detach().to("cpu", torch.float16)
        self.bytes += t.numel() * t.element_size()
        if self.bytes > self.budget:
            log.info("teacher logits exceed %.1f GiB: the trainer recomputes them at every step",
                     self.budget / 2**30)
            self._logits = None
            return
        self._logits.append(t)

    @property
    def logits(self) -> list[torch.Tensor] | None:
        return self._logits


def teacher_logits(model: nn.Module, batches: Sequence[dict], bf16: bool) -> list[torch.Tensor | None]:
    """The dense model's logits for ``batches`` (computed once, reused by every plan)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), _autocast(bf16, device):
        for batch in batches:
            out.append(model(**_model_inputs({k: v.to(device) for k, v in batch.items()})).logits)
    return out


def evaluate_plan(
    model: nn.Module,
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    weights: Mapping[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    batches: Sequence[dict],
    alpha: float,
    bf16: bool,
    teachers: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """Calibration loss of the model pruned with hard ``perms`` (no gradient)."""
    device = next(model.parameters()).device
    if teachers is None:
        teachers = teacher_logits(model, batches, bf16) if alpha > 0 else [None] * len(batches)
    total = 0.0
    params = hard_params(sites, perms, weights, scores, pattern)
    with torch.no_grad():
        for batch, teacher in zip(batches, teachers):
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(bf16, device):
                logits = functional_call(model, params, (), _model_inputs(batch), strict=False).logits
            loss, _, _ = task_loss(logits, batch, teacher, alpha)
            total += float(loss.detach())
    return total / max(len(batches), 1)


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


#: LearnConfig fields that do not change what a run computes (a resumed run may change them).
_RUN_ONLY = ("checkpoint_path", "checkpoint_every", "time_budget")


def _run_key(cfg: LearnConfig, sites: Sequence[Site], groups: int, pattern: NMPattern, n_batches: int,
             costs: Mapping[str, torch.Tensor]) -> str:
    """A hash of everything a checkpoint must agree with to be resumed."""
    import hashlib

    desc = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY},
        "sites": [[s.name, list(s.consumers), s.d_in] for s in sites],
        "groups": groups,
        "pattern": str(pattern),
        "batches": n_batches,
        "costs": {k: list(v.shape) for k, v in costs.items()},
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path: "str | Path", tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Write ``tensors`` and the JSON ``meta`` into one safetensors file, atomically
    (temporary sibling, fsync, rename): a reader sees the previous checkpoint or this one."""
    from safetensors.torch import save_file

    from permsparse.io.atomic import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"permsparse_state": json.dumps(meta)})
    return Path(path)


def load_checkpoint(path: "str | Path") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get("permsparse_state")
        if meta is None:
            raise ValueError(f"{path} is not a permsparse training checkpoint")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, json.loads(meta)


def _optimizer_tensors(opt: torch.optim.Optimizer, bank: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state split into tensors (by parameter name) and JSON scalars."""
    names = {id(p): n for n, p in bank.named_parameters()}
    tensors, scalars = {}, {}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{n}/{k}"] = v
            else:
                scalars[f"{n}/{k}"] = v
    return tensors, scalars


def _restore_optimizer(opt: torch.optim.Optimizer, bank: nn.Module, tensors: Mapping[str, torch.Tensor],
                       scalars: Mapping) -> None:
    for n, p in bank.named_parameters():
        st = {}
        for key, v in tensors.items():
            if key.startswith(f"opt/{n}/"):
                st[key[len(f"opt/{n}/"):]] = v.to(p.device)
        for key, v in scalars.items():
            if key.startswith(f"{n}/"):
                st[key[len(f"{n}/"):]] = v
        if st:
            opt.state[p] = st


def train_end_to_end(
    model: nn.Module,
    sites: Sequence[Site],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    groups: int,
    calib: "torch.Tensor | Sequence[Mapping]",
    cfg: LearnConfig,
    start: Mapping[str, Permutation] | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
    on_step: Callable[[StepLog, TrainState], None] | None = None,
    resume: bool = False,
    snapshots: dict[int, dict[str, Permutation]] | None = None,
    averaged: dict[str, dict[str, Permutation]] | None = None,
    teachers: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, Permutation], list[StepLog]]:
    """Learn the hard permutation of every site end to end; returns ``(perms, history)``.

    ``snapshots``: a dict this fills with ``{step: hard plan of that step}`` at
    ``cfg.snapshots`` evenly spaced points of the run (for the guard to weigh);
    ``averaged``: a dict this fills with ``{"avg<decay>": hard plan of the running average
    of the costs at the end}`` for each decay per step in ``cfg.average``, and
    ``{"tail<share>": hard plan of the uniform average of the costs over the steps from
    that share of the run on}`` for ``cfg.tail_average``;
    ``teachers``: the dense logits of each calibration batch (see :class:`TeacherCache`),
    used instead of a teacher forward at every step.

    ``scores`` hold each consumer's score in original coordinates; ``start`` the warm
    start (heuristic) permutations when ``cfg.init == "heuristic"``.

    ``cfg.checkpoint_path``: every ``cfg.checkpoint_every`` steps (and after the last)
    the whole state (costs, optimizer, step, batch order, generator states, history)
    is written there atomically; ``resume=True`` continues from it when it exists, and
    the continued run computes exactly what the uninterrupted one would have.

    Under ``torch.distributed`` each rank runs its shard of every global batch and the
    cost gradients are averaged over ranks (see :mod:`permsparse.train.distributed`); only
    rank 0 writes the metrics and the checkpoint.
    """
    device = next(model.parameters()).device
    model.requires_grad_(False)
    weights = {c: _weight(model, c) for s in sites for c in s.consumers}
    bank = _make_bank(sites, groups, pattern, start, cfg, scores, weights).to(device)
    step_weights = _step_weights(weights, cfg)
    opt = _optimizer(bank, cfg)
    batches = make_batches(calib, cfg.batch_size)
    if teachers is not None and len(teachers) != len(batches):
        raise ValueError(f"{len(teachers)} teacher logits for {len(batches)} calibration batches")
    steps = max(1, int(round(cfg.epochs * len(batches))))
    schedule = TemperatureSchedule(cfg.tau_start, cfg.tau_end, steps, cfg.tau_schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepLog] = []
    prev: dict[str, Permutation] | None = None
    order: list[int] = []
    first = 0
    elapsed0 = 0.0
    key = _run_key(cfg, sites, groups, pattern, len(batches), dict(bank.named_parameters()))
    ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if resume and ckpt is None:
        raise ValueError("resume needs a checkpoint path (LearnConfig.checkpoint_path / --checkpoint)")
    if resume and ckpt.exists():
        tensors, meta = load_checkpoint(ckpt)
        if meta.get("key") != key:
            raise ValueError(
                f"checkpoint {ckpt} was written by a different run (other model sites, pattern, groups, "
                f"calibration batches or trainer settings); remove it or drop --resume"
            )
        with torch.no_grad():
            for k, p in bank.named_parameters():
                p.copy_(tensors[f"param/{k}"].to(p.device, p.dtype))
        _restore_optimizer(opt, bank, tensors, meta["opt"])
        gen.set_state(torch.tensor(meta["gen"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
        order = list(meta["order"])
        first = int(meta["step"])
        elapsed0 = float(meta.get("elapsed", 0.0))
        history = [StepLog(**h) for h in meta["history"]]
        if meta.get("prev") is not None:
            prev = {n: Permutation(tensors[f"prev/{n}"], g) for n, g in meta["prev"].items()}
        if snapshots is not None:
            for st, plan in meta.get("snapshots", {}).items():
                snapshots[int(st)] = {n: Permutation(tensors[f"snap/{st}/{n}"], g) for n, g in plan.items()}
        log.info("resumed from %s at step %d of %d", ckpt, first, steps)
    taken = snapshots if snapshots is not None else {}
    marks = [i / (cfg.snapshots + 1) for i in range(1, cfg.snapshots + 1)] if snapshots is not None else []
    good = copy.deepcopy(bank.state_dict())
    ema = {d: {k: p.detach().clone() for k, p in bank.named_parameters()} for d in cfg.average}
    if ema and resume and ckpt is not None and ckpt.exists():
        ema = {d: {k: tensors[f"ema/{d}/{k}"].to(v.device, v.dtype) for k, v in e.items()} for d, e in ema.items()}
    tail: dict[str, torch.Tensor] = {}  # the uniform average of the costs over the tail of the run
    tail_n = 0
    if cfg.tail_average is not None and resume and ckpt is not None and ckpt.exists():
        tail_n = int(meta.get("tail_n", 0))
        tail = {k: tensors[f"tail/{k}"].to(p.device, p.dtype) for k, p in bank.named_parameters()} if tail_n else {}
    main = dist.is_main()
    metrics_file = open(metrics_path, "a") if metrics_path and main else None
    masks: dict = {}
    bar = tqdm(total=steps, initial=first, desc="learn permutations", disable=not progress or not main)
    t_start = time.perf_counter() - elapsed0
    t_loop = time.perf_counter()

    def save(done: int) -> None:
        if ckpt is None or not main:
            return
        tensors = {f"param/{k}": p.detach() for k, p in bank.named_parameters()}
        tensors.update({f"ema/{d}/{k}": v for d, e in ema.items() for k, v in e.items()})
        tensors.update({f"tail/{k}": v for k, v in tail.items()})
        opt_t, opt_s = _optimizer_tensors(opt, bank)
        tensors.update(opt_t)
        if prev is not None:
            tensors.update({f"prev/{n}": p.indices for n, p in prev.items()})
        for st, plan in taken.items():
            # A copy: the snapshot of the last step is the very plan stored as prev/ (safetensors
            # refuses tensors that share memory).
            tensors.update({f"snap/{st}/{n}": p.indices.clone() for n, p in plan.items()})
        meta = {
            "key": key, "step": done, "steps": steps, "order": order, "opt": opt_s,
            "gen": gen.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
            "elapsed": time.perf_counter() - t_start, "history": [h.to_json() for h in history],
            "prev": {n: p.groups for n, p in prev.items()} if prev is not None else None, "tail_n": tail_n,
            "snapshots": {str(st): {n: p.groups for n, p in plan.items()} for st, plan in taken.items()},
        }
        save_checkpoint(ckpt, tensors, meta)

    try:
        for step in range(first, steps):
            t0 = time.perf_counter()
            progress_frac = step / max(steps - 1, 1)
            if cfg.time_budget:
                elapsed = t0 - t_start
                if dist.any_flag(elapsed >= cfg.time_budget):
                    log.info("time budget of %.0fs reached after %d steps", cfg.time_budget, step)
                    break
                progress_frac = max(progress_frac, dist.mean_float(elapsed) / cfg.time_budget)
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            idx = order.pop()
            batch = {k: v.to(device) for k, v in dist.shard_batch(batches[idx]).items()}
            tau = schedule.at(progress_frac)
            _anneal_lr(opt, cfg, progress_frac)
            out, ent = bank(tau, cfg.sinkhorn_iters)
            params = sparse_weights(out, sites, step_weights, scores, pattern, mask_cache=masks,
                                    grad_dtype=torch.bfloat16 if cfg.bf16 else None)
            with _autocast(cfg.bf16, device):
                if cfg.alpha <= 0:
                    teacher = None
                elif teachers is not None:
                    teacher = teachers[idx].to(device)
                else:
                    with torch.no_grad():
                        teacher = model(**_model_inputs(batch)).logits
                logits = functional_call(model, params, (), _model_inputs(batch), strict=False).logits
            loss, ce, kl = task_loss(logits, batch, teacher, cfg.alpha)
            # The global mean (equal shards) so that every rank takes the same decisions.
            vals = dist.all_reduce_mean_(torch.stack([loss.detach(), ce.detach(), kl.detach()]).double().cpu())
            loss_v, ce_v, kl_v = (float(v) for v in vals)
            if not math.isfinite(loss_v):
                bank.load_state_dict(good)
                raise NonFiniteLossError(
                    f"loss became {loss_v} at step {step} (tau={tau:.3g}); kept the costs of the last "
                    f"good step. Try a lower learning rate (--lr) or a higher final temperature (--tau-end)."
                )
            good = {k: v.detach().clone() for k, v in bank.state_dict().items()}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.all_reduce_grads_(bank.parameters())
            opt.step()
            with torch.no_grad():
                for d, e in ema.items():
                    for k, p in bank.named_parameters():
                        e[k].lerp_(p.detach(), 1.0 - d)
                if cfg.tail_average is not None and progress_frac >= cfg.tail_average:
                    tail_n += 1
                    for k, p in bank.named_parameters():  # the running mean of the tail's costs
                        tail[k] = p.detach().clone() if tail_n == 1 else tail[k].lerp_(p.detach(), 1.0 / tail_n)
            cur = {n: p for n, (_, p) in out.items()}
            rec = StepLog(step, loss_v, ce_v, kl_v, tau, ent, moved_share(prev, cur), time.perf_counter() - t0,
                          opt.param_groups[0]["lr"])
            prev = cur
            # The plan this step ran with, once per mark passed (progress counts time under a budget).
            if len([m for m in marks if m <= progress_frac]) > len(taken):
                taken[step] = cur
            history.append(rec)
            bar.update(1)
            post = dict(loss=f"{rec.loss:.3f}", tau=f"{tau:.3g}", ent=f"{ent:.2f}", moved=f"{rec.changed:.1%}")
            if cfg.time_budget:  # tqdm's ETA counts steps; the budget may end the run sooner
                left = max(cfg.time_budget - (time.perf_counter() - t_start), 0.0)
                done = step + 1 - first
                by_steps = (time.perf_counter() - t_loop) / done * (steps - step - 1)
                post["left"] = f"{min(left, by_steps):.0f}s"
            bar.set_postfix(post)
            if metrics_file:
                metrics_file.write(json.dumps(rec.to_json()) + "\n")
                metrics_file.flush()
            if on_step:
                t_cb = time.perf_counter()
                on_step(rec, TrainState(bank, sites, weights, scores, pattern))
                t_start += time.perf_counter() - t_cb  # a caller's evaluation is not training time
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save(step + 1)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if averaged is not None and history:
        averaged.update({f"avg{d:g}": _plan_with(bank, e) for d, e in ema.items()})
        if tail_n:
            averaged[f"tail{cfg.tail_average:g}"] = _plan_with(bank, tail)
    return bank.hard(), history


def _plan_with(bank: "PermutationBank", params: Mapping[str, torch.Tensor]) -> dict[str, Permutation]:
    """The hard plan of ``bank`` with its parameters replaced by ``params`` (restored after)."""
    saved = {k: p.detach().clone() for k, p in bank.named_parameters()}
    with torch.no_grad():
        for k, p in bank.named_parameters():
            p.copy_(params[k])
    try:
        return bank.hard()
    finally:
        with torch.no_grad():
            for k, p in bank.named_parameters():
                p.copy_(saved[k])


def _make_bank(sites, groups, pattern, start, cfg: LearnConfig, scores, weights) -> "PermutationBank":
    for s in sites:  # once here: the steps re-mask these scores without checking them again
        for c in s.consumers:
            check_finite(scores[c], f"score of {c}")
    return PermutationBank(sites, groups, pattern, start, _BANK_INIT[cfg.init], cfg.margin, cfg.noise, cfg.seed)


def _optimizer(bank: nn.Module, cfg: LearnConfig) -> torch.optim.Optimizer:
    return GroupAdam(bank.parameters(), lr=cfg.lr)


def _step_weights(weights: Mapping[str, torch.Tensor], cfg: LearnConfig) -> Mapping[str, torch.Tensor]:
    """The weights a training step builds ``W_eff`` from. Under bfloat16 autocast every linear
    casts its weight to bfloat16 anyway, so casting once here gives the same forward and
    spares the per-step casts and float32 gathers (SmolLM2, 2 cores: ~1 s a step)."""
    if not cfg.bf16:
        return weights
    return {c: w.to(torch.bfloat16) for c, w in weights.items()}


def _anneal_lr(opt: torch.optim.Optimizer, cfg: LearnConfig, progress: float) -> None:
    """Set the step's lr: ``cfg.lr`` throughout, or linearly to ``cfg.lr_end`` at the end."""
    if cfg.lr_end is None:
        return
    lr = cfg.lr + (cfg.lr_end - cfg.lr) * min(max(progress, 0.0), 1.0)
    for group in opt.param_groups:
        group["lr"] = lr


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach()


def train_block(
    block: nn.Module,
    block_name: str,
    sites: Sequence[Site],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    groups: int,
    inputs: "Sequence[tuple[tuple, dict]]",
    targets: Sequence[torch.Tensor],
    cfg: LearnConfig,
    start: Mapping[str, Permutation] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Permutation], list[StepLog]]:
    """Block-wise objective: learn this block's sites so that its sparse output matches the
    dense ``targets`` on cached ``inputs`` (normalised MSE)."""
    from permsparse.models.calibrate import block_output

    device = next(block.parameters()).device
    prefix = f"{block_name}."
    weights = {c: block.get_submodule(c[len(prefix) :]).weight.detach() for s in sites for c in s.consumers}
    bank = _make_bank(sites, groups, pattern, start, cfg, scores, weights).to(device)
    step_weights = _step_weights(weights, cfg)
    opt = _optimizer(bank, cfg)
    schedule = TemperatureSchedule(cfg.tau_start, cfg.tau_end, cfg.steps_per_block, cfg.tau_schedule)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[StepLog] = []
    prev = None
    masks: dict = {}
    for step in tqdm(range(cfg.steps_per_block), desc=f"learn {block_name}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        i = int(torch.randint(len(inputs), (1,), generator=gen))
        args, kwargs = inputs[i]
        tau = schedule(step)
        _anneal_lr(opt, cfg, step / max(cfg.steps_per_block - 1, 1))
        out, ent = bank(tau, cfg.sinkhorn_iters)
        params = sparse_weights(out, sites, step_weights, scores, pattern, prefix_strip=prefix, mask_cache=masks,
                                grad_dtype=torch.bfloat16 if cfg.bf16 else None)
        with _autocast(cfg.bf16, device):
            y = block_output(functional_call(block, params, args, kwargs, strict=False)).float()
        target = targets[i].float()
        loss = (y - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{block_name}: block loss became {float(loss.detach())} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = {n: p for n, (_, p) in out.items()}
        history.append(StepLog(step, loss.item(), float("nan"), float("nan"), tau, ent, moved_share(prev, cur),
                               time.perf_counter() - t0, opt.param_groups[0]["lr"]))
        prev = cur
    return bank.hard(), history


def block_loss(
    block: nn.Module,
    block_name: str,
    sites: Sequence[Site],
    perms: Mapping[str, Permutation],
    scores: Mapping[str, torch.Tensor],
    pattern: NMPattern,
    inputs: "Sequence[tuple[tuple, dict]]",
    targets: Sequence[torch.Tensor],
    bf16: bool,
) -> float:
    """Normalised MSE of the block pruned with hard ``perms`` against the dense targets."""
    from permsparse.models.calibrate import block_output

    device = next(block.parameters()).device
    prefix = f"{block_name}."
    weights = {c: block.get_submodule(c[len(prefix) :]).weight.detach() for s in sites for c in s.consumers}
    params = hard_params(sites, perms, weights, scores, pattern, prefix_strip=prefix)
    with torch.no_grad():
        total = 0.0
        for (args, kwargs), target in zip(inputs, targets):
            with _autocast(bf16, device):
                y = block_output(functional_call(block, params, args, kwargs, strict=False)).float()
            total += float((y - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12))
    return total / max(len(inputs), 1)

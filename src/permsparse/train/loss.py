"""The trainer's loss: next-token (or label) cross-entropy plus α · distillation KL, or, for
a model without logits (an encoder), a distance to the dense model's last hidden states.

Which one is read off the model's output (:func:`has_logits`): :func:`task_loss` for logits,
:func:`hidden_loss` for hidden states; :func:`dense_target` is what the dense model's output
is matched on. :func:`lm_ce_kl` is the next-token form over a large vocabulary, in token chunks.

That form reads ``B x T x V`` logits (SmolLM2: 2,048 tokens x 49,152 entries, 400 MB
in float32) for the student and the teacher. Written plainly (``log_softmax`` of each,
``exp``, difference, product, sum) that is a dozen passes over full-size float32 tensors
and ~3.5 s of a 15 s step on 2 cores. Here both terms share one pass per chunk of tokens,
in float32 but never materialised at full size, and the backward recomputes the softmax
from the kept logits instead of storing it. Same values and gradients as the plain form
(tests/test_distill.py).

Per token, with student logits ``z``, ``lse = log Σ exp z`` and teacher probabilities ``p``:
``CE = lse − z[y]`` and ``KL(p ‖ softmax z) = Σ p log p − Σ p z + lse``;
``∂CE/∂z = softmax(z) − onehot(y)``, ``∂KL/∂z = softmax(z) − p``.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from permsparse.config import HIDDEN_LOSSES
from permsparse.models.precision import bf16_on

__all__ = ["task_loss", "hidden_loss", "has_logits", "dense_target", "lm_ce_kl", "model_inputs", "autocast",
           "IGNORE_INDEX"]

#: Targets with this value count in neither the cross-entropy nor its mean (as in torch).
IGNORE_INDEX = -100

_CHUNK_TOKENS = 64  # 64 x 49k float32 = 12 MB: several temporaries stay near the caches


class _ChunkedCEKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, chunk: int):
        n = logits.shape[0]
        valid = targets != IGNORE_INDEX
        n_valid = int(valid.sum())
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for a in range(0, n, chunk):
            z = logits[a : a + chunk].float()
            l = torch.logsumexp(z, -1)
            lse[a : a + chunk] = l
            y = targets[a : a + chunk]
            ok = valid[a : a + chunk]
            picked = z.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
            ce_sum += ((l - picked) * ok).sum(dtype=torch.float64)
            if teacher is not None:
                t = teacher[a : a + chunk].to(z.device, torch.float32)
                logp = t - torch.logsumexp(t, -1, keepdim=True)
                p = logp.exp()
                # Σ p (log p − z) + lse, per token (Σ p = 1).
                kl_sum += (((p * (logp - z)).sum(-1) + l) * ok).sum(dtype=torch.float64)
        ctx.save_for_backward(logits, targets, lse)
        ctx.teacher = teacher  # may live on the host (a cached teacher); not a graph input
        ctx.chunk = chunk
        ctx.n_valid = n_valid
        ce = (ce_sum / max(n_valid, 1)).float()
        kl = (kl_sum / max(n_valid, 1)).float() if teacher is not None else torch.zeros((), device=logits.device)
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce: torch.Tensor, g_kl: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        teacher, chunk = ctx.teacher, ctx.chunk
        n = logits.shape[0]
        w_ce = g_ce.float() / max(ctx.n_valid, 1)
        w_kl = g_kl.float() / max(ctx.n_valid, 1) if teacher is not None else None
        grad = torch.empty_like(logits)
        for a in range(0, n, chunk):
            z = logits[a : a + chunk].float()
            soft = (z - lse[a : a + chunk].unsqueeze(1)).exp_()
            y = targets[a : a + chunk]
            ok = (y != IGNORE_INDEX).float().unsqueeze(1)
            # CE part: (softmax − onehot) on valid rows.
            g = soft * (w_ce * ok)
            g.scatter_add_(1, y.clamp_min(0).unsqueeze(1), -(w_ce * ok))
            if w_kl is not None:
                t = teacher[a : a + chunk].to(z.device, torch.float32)
                p = torch.softmax(t, -1)
                g.add_(soft.sub_(p).mul_(w_kl * ok))
            grad[a : a + chunk] = g.to(logits.dtype)
        return grad, None, None, None


def lm_ce_kl(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: torch.Tensor | None = None,
    chunk: int = _CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce, kl)`` of ``(..., V)`` ``logits`` against ``(...)`` targets and, when given, the
    teacher's ``(..., V)`` logits (any dtype, any device: moved a chunk at a time).

    Both are means over the positions whose target is not :data:`IGNORE_INDEX`: ``ce`` of the
    cross-entropy, ``kl`` of ``KL(teacher ‖ student)`` (0 without a teacher). Only ``logits``
    receives a gradient.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits must be (..., V) and targets (...), got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if teacher is not None and teacher.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match the student's {tuple(logits.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    v = logits.shape[-1]
    flat_t = teacher.detach().reshape(-1, v) if teacher is not None else None
    return _ChunkedCEKL.apply(logits.reshape(-1, v), targets.to(logits.device).reshape(-1), flat_t, chunk)


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


def has_logits(output) -> bool:
    """Whether a model's output carries logits (an LM or a classifier) rather than only hidden states."""
    return getattr(output, "logits", None) is not None


def dense_target(output) -> torch.Tensor:
    """What a model's output is matched on: its logits, or without them (an encoder such as
    ``BertModel``) its last hidden states.

    Raises:
        ValueError: an output with neither (named by its type).
    """
    if has_logits(output):
        return output.logits
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, torch.Tensor):
        hidden = output
    if hidden is None:
        raise ValueError(f"the model's output ({type(output).__name__}) has neither logits nor last_hidden_state: "
                         "nothing to learn the permutations against")
    return hidden


def hidden_loss(
    hidden: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, kind: str = "cosine"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, nan, nan)``: the distance of ``(B, T, H)`` hidden states to the dense model's,
    over the tokens ``mask`` (``(B, T)``, an attention mask; None: all) keeps. There is no task
    loss, so no CE or KL (NaN in the step records, as for the block-wise objective).

    ``kind``: ``cosine`` (mean over tokens of 1 - cos), ``pooled-cosine`` (mean over rows of
    1 - cos of the mean-pooled states: a sentence embedder's output) or ``nmse`` (squared
    error over squared norm of the dense states).
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}; got {kind!r}")
    if teacher.shape != hidden.shape:
        raise ValueError(f"teacher hidden states {tuple(teacher.shape)} do not match the student's "
                         f"{tuple(hidden.shape)}")
    h = hidden.float()  # (B, T, H)
    t = teacher.to(h.device, torch.float32)
    w = (torch.ones(h.shape[:-1], device=h.device) if mask is None
         else mask.to(h.device, torch.float32).reshape(h.shape[:-1]))  # (B, T)
    if kind == "cosine":
        loss = ((1.0 - F.cosine_similarity(h, t, dim=-1)) * w).sum() / w.sum().clamp_min(1.0)
    elif kind == "pooled-cosine":
        n = w.sum(-1, keepdim=True).clamp_min(1.0)  # (B, 1)
        ph, pt = (h * w.unsqueeze(-1)).sum(-2) / n, (t * w.unsqueeze(-1)).sum(-2) / n  # (B, H)
        loss = (1.0 - F.cosine_similarity(ph, pt, dim=-1)).mean()
    else:
        loss = ((h - t).pow(2).sum(-1) * w).sum() / (t.pow(2).sum(-1) * w).sum().clamp_min(1e-12)
    nan = torch.full((), float("nan"), device=h.device)
    return loss, nan, nan


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict:
    """The batch without what only the loss reads (``labels``)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def autocast(enabled: bool, device: torch.device) -> torch.autocast:
    """The bfloat16 autocast of the model's forward (and backward) when ``enabled`` and the
    device computes bfloat16 natively (:func:`~permsparse.models.precision.bf16_on`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_on(enabled, device))

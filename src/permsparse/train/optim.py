"""The optimizer of the costs and its learning-rate schedule."""

from __future__ import annotations

from typing import Iterable

import torch

from permsparse.config import LearnConfig

__all__ = ["GroupAdam", "make_optimizer", "anneal_lr"]


class GroupAdam(torch.optim.Optimizer):
    """Adam whose second moment is one scalar per permutation group (a ``k x k`` cost slice).

    Plain Adam moves every cost entry by about ``lr`` per step whatever its gradient, so
    after ``margin / lr`` steps whole groups cross at once (bursts of moved channels driven
    by noise). Sharing the normaliser within a group keeps the step scale-free across sites
    and losses while entries with small gradients move little: the swaps the loss asks for
    most strongly happen first.
    """

    def __init__(self, params, lr: float = 0.02, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch optimizer protocol
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
                st["t"] += 1
                g = p.grad
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                dims = tuple(range(1, p.dim()))
                st["v"].mul_(b2).add_(g.pow(2).mean(dim=dims, keepdim=True), alpha=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["t"])
                v_hat = st["v"] / (1 - b2 ** st["t"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])
        return None


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: LearnConfig) -> torch.optim.Optimizer:
    return GroupAdam(params, lr=cfg.lr)


def anneal_lr(opt: torch.optim.Optimizer, cfg: LearnConfig, progress: float) -> None:
    """Set the step's lr: ``cfg.lr`` throughout, or linearly to ``cfg.lr_end`` at the end."""
    if cfg.lr_end is None:
        return
    lr = cfg.lr + (cfg.lr_end - cfg.lr) * min(max(progress, 0.0), 1.0)
    for group in opt.param_groups:
        group["lr"] = lr

"""Apply a plan to a model: per-site permutation + score + pattern → masks → ``W_eff`` in place.

The weights are written in original coordinates (``W ⊙ M[:, π⁻¹]``, or SparseGPT's updated
weights), so the model keeps its exact layout and any stock loader runs it; the
permutations that make the masks hardware-aligned travel beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from permsparse.core.heuristics import HEURISTIC_POWER, swap_search, zigzag_permutation
from permsparse.core.metrics import kept_score, unstructured_kept
from permsparse.core.pattern import NMPattern, nm_mask, unstructured_mask
from permsparse.core.permutation import Permutation
from permsparse.core.permuter import unpermuted_mask
from permsparse.core.reconstruct import REFIT_METHODS, masked_lstsq
from permsparse.core.scores import ColumnStats, SparseGPT, compute_score
from permsparse.models.sites import Site, get_module

__all__ = ["SiteReport", "site_scores", "heuristic_permutation", "site_weights", "refit_weight", "prune_site_", "plan_weights",
           "write_weights_"]

log = logging.getLogger(__name__)

@dataclass
class SiteReport:
    """What pruning one site kept: total score and the fraction kept with and without π."""

    site: str
    retained_plain: float
    retained: float
    retained_ceiling: float

    def to_json(self) -> dict:
        return {
            "site": self.site,
            "retained_plain": self.retained_plain,
            "retained": self.retained,
            "retained_ceiling": self.retained_ceiling,
        }


def site_scores(
    model: nn.Module, site: Site, score: str, stats: Mapping[str, ColumnStats] | None
) -> list[torch.Tensor]:
    """The score of every consumer of ``site``, in original coordinates."""
    out = []
    for name in site.consumers:
        st = stats.get(name) if stats is not None else None
        if score != "magnitude" and st is None:
            raise ValueError(f"{name}: score {score!r} needs calibration statistics for this layer")
        if st is not None and st.n_tokens == 0 and score != "magnitude":
            # No calibration input reached this layer (a vision tower calibrated on text
            # only): all-zero activation norms would make every mask arbitrary, so the
            # weights alone decide. collect_stats warns once per run about such layers.
            log.debug("%s: no calibration statistics; scored by magnitude instead of %s", name, score)
            out.append(compute_score("magnitude", get_module(model, name).weight.detach()))
            continue
        out.append(compute_score(score, get_module(model, name).weight.detach(), st))
    return out


def heuristic_permutation(
    site: Site,
    scores: list[torch.Tensor],
    pattern: NMPattern,
    groups: int,
    method: str = "zigzag",
    time_budget: float = 2.0,
    seed: int = 0,
    power: float = HEURISTIC_POWER,
) -> Permutation:
    """Search the site's permutation maximising the kept ``Σ score**power`` of all its consumers.

    ``method``: ``"zigzag"`` (RIA-style, one linear-assignment round) or
    ``"zigzag+swap"`` (then greedy channel swaps for ``time_budget`` seconds).
    ``power``: 2 (default) maximises the kept *energy*: for Wanda's ``|w|·‖x‖`` the
    squared score is what pruning a weight adds to the layer's output error
    (``w²‖x‖²``), so the search stops trading one large loss for several small gains;
    1 is the plain kept score of RIA and Apex. The masks are the same either way (top N
    of M by score). Respects the site's head ties.
    """
    if power <= 0:
        raise ValueError(f"heuristic power must be positive, got {power}")
    g, _ = site.structure(groups, pattern)
    free_g = site.free_groups(groups)
    stacked = site.tied_score(torch.cat([s.detach().double().pow(power).float() for s in scores], dim=0), groups)
    stacked = stacked / stacked.mean().clamp_min(1e-30)  # consumers weigh by their share of the score
    free = zigzag_permutation(stacked, pattern, free_g)
    if method == "zigzag+swap":
        free = swap_search(stacked, pattern, free_g, start=free, time_budget=time_budget, seed=seed)
    elif method != "zigzag":
        raise ValueError(f"unknown heuristic {method!r}: use 'zigzag' or 'zigzag+swap'")
    return site.expand(free, groups) if site.head_tied else free


def _hessian(stats: Mapping[str, ColumnStats] | None, name: str) -> torch.Tensor:
    st = stats.get(name) if stats is not None else None
    if st is None or not st.hessian:
        raise ValueError(f"{name}: SparseGPT and reconstruction need the Hessian (calibrate with hessian=True)")
    return st.H


def _refit_method(reconstruct: "bool | str | None") -> str | None:
    """``reconstruct`` as a method name: False/None → no refit, True → the default (``lstsq``)."""
    if reconstruct is None or reconstruct is False:
        return None
    method = REFIT_METHODS[0] if reconstruct is True else reconstruct
    if method not in REFIT_METHODS:
        raise ValueError(f"unknown refit {method!r}: use one of {REFIT_METHODS}")
    return method


def refit_weight(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor, method: str = "lstsq",
                 pattern: "NMPattern | None" = None, perm: Permutation | None = None) -> torch.Tensor:
    """``weight``'s kept entries (``mask``, original coordinates) refitted to the dense output on the
    calibration Hessian: ``lstsq`` exactly (:func:`permsparse.core.reconstruct.masked_lstsq`), ``obs``
    by SparseGPT's one-pass update (in the permuted layout ``perm``, which ``pattern`` is checked in)."""
    if method == "obs":
        return SparseGPT(hessian).prune(weight, pattern, perm, mask=mask)[0]
    return masked_lstsq(weight, hessian, mask)


@torch.no_grad()
def site_weights(
    model: nn.Module,
    site: Site,
    pattern: "NMPattern | None",
    score: str,
    stats: Mapping[str, ColumnStats] | None,
    perm: Permutation | None = None,
    scores: list[torch.Tensor] | None = None,
    reconstruct: "bool | str | None" = False,
) -> tuple[dict[str, torch.Tensor], SiteReport]:
    """The pruned weight of every consumer of ``site`` (``{consumer: W}``, original coordinates,
    the model untouched) and what pruning kept; ``pattern=None`` is per-row 50% unstructured.

    ``reconstruct``: after the mask is chosen, refit the kept weights to the dense layer's output
    on the calibration inputs (needs the Hessians in ``stats``): ``"lstsq"`` (or True) exactly,
    ``"obs"`` by SparseGPT's one-pass update; see :func:`refit_weight`."""
    method = _refit_method(reconstruct)
    if scores is None:
        scores = site_scores(model, site, score, stats)
    if pattern is not None:
        pattern.check_width(site.d_in, 1, site.name)
    if perm is not None and perm.d_in != site.d_in:
        raise ValueError(f"site {site.name}: permutation has {perm.d_in} channels, the site reads {site.d_in}")
    total = plain = kept = ceiling = 0.0
    out: dict[str, torch.Tensor] = {}
    for name, s in zip(site.consumers, scores):
        w = get_module(model, name).weight
        total += float(s.sum(dtype=torch.float64))
        if pattern is not None:
            plain += kept_score(s, pattern)
            kept += kept_score(s, pattern, perm)
            ceiling += unstructured_kept(s, pattern)
        if score == "sparsegpt":
            out[name] = SparseGPT(_hessian(stats, name)).prune(w, pattern, perm)[0]
            continue
        if pattern is None:
            mask = unstructured_mask(s, 0.5)
        elif perm is None or perm.is_identity():
            mask = nm_mask(s, pattern)
        else:
            mask = unpermuted_mask(s, perm, pattern)
        if method is not None:
            out[name] = refit_weight(w, mask, _hessian(stats, name), method, pattern, perm)
        else:
            out[name] = w * mask.to(w.dtype)
    total = max(total, 1e-30)
    if pattern is None:
        return out, SiteReport(site.name, float("nan"), float("nan"), float("nan"))
    return out, SiteReport(site.name, plain / total, kept / total, ceiling / total)


@torch.no_grad()
def prune_site_(
    model: nn.Module,
    site: Site,
    pattern: "NMPattern | None",
    score: str,
    stats: Mapping[str, ColumnStats] | None,
    perm: Permutation | None = None,
    scores: list[torch.Tensor] | None = None,
    reconstruct: "bool | str | None" = False,
) -> SiteReport:
    """Prune every consumer of ``site`` in place (:func:`site_weights` written into the model)."""
    weights, report = site_weights(model, site, pattern, score, stats, perm, scores, reconstruct)
    write_weights_(model, weights)
    return report


@torch.no_grad()
def plan_weights(
    model: nn.Module,
    sites: "Sequence[Site]",
    pattern: "NMPattern | None",
    score: str,
    stats: Mapping[str, ColumnStats] | None,
    perms: Mapping[str, Permutation],
    scores: Mapping[str, torch.Tensor],
    reconstruct: "bool | str | None" = False,
) -> tuple[dict[str, torch.Tensor], list[SiteReport]]:
    """:func:`site_weights` of every site under ``perms`` (a site without one: plain N:M):
    ``({consumer: W}, reports)``, the model untouched."""
    out: dict[str, torch.Tensor] = {}
    reports = []
    for s in sites:
        w, rep = site_weights(model, s, pattern, score, stats, perms.get(s.name), [scores[c] for c in s.consumers],
                              reconstruct)
        out.update(w)
        reports.append(rep)
    return out, reports


@torch.no_grad()
def write_weights_(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``{layer: W}`` (as :func:`site_weights` returns) into ``model``'s layers."""
    for name, w in weights.items():
        get_module(model, name).weight.copy_(w)

"""Calibrate and search once, prune with any candidate plan: the pieces ``prune`` is made of."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from permsparse.api import calibrate, plan_candidates, prune
from permsparse.config import LearnConfig, PruneConfig
from permsparse.train.loop import make_batches

LEARN = LearnConfig(objective="e2e", epochs=1, batch_size=2, snapshots=1, lr=0.05)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _calib() -> torch.Tensor:
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _perms(perms: dict) -> dict:
    return {k: p.indices.tolist() for k, p in perms.items()}


@pytest.mark.parametrize("permutation", ["heuristic", "learned"])
def test_the_kept_plan_prunes_as_prune_does(tiny, permutation):
    dense = tiny("llama").model
    cfg = PruneConfig(permutation=permutation, groups=2, progress=False, learn=LEARN)
    plans = plan_candidates(dense, cfg, _calib())
    model, result = plans.pruned(dense)
    reference = copy.deepcopy(dense)
    expected = prune(reference, None, cfg, _calib())
    assert _same_weights(model, reference) and not _same_weights(model, dense)  # the dense model is left as it was
    assert _perms(result.perms) == _perms(expected.perms) and result.kept_plan == expected.kept_plan
    assert result.guard == expected.guard and result.groups == expected.groups == 2
    assert set(plans.plans) == ({"none", "heuristic", "learned"} if permutation == "learned" else {"none", "heuristic"})


def test_float32_calibration_gives_the_one_shot_plans_of_prune(tiny):
    dense = tiny("llama").model
    cfg = PruneConfig(permutation="learned", groups=2, progress=False, learn=LEARN)
    plans = plan_candidates(dense, cfg, _calib(), bf16_calibration=False)
    for plan in ("none", "heuristic"):
        model, _ = plans.pruned(dense, plan)
        reference = copy.deepcopy(dense)
        prune(reference, None, dataclasses.replace(cfg, permutation=plan), _calib())
        assert _same_weights(model, reference), plan


def test_one_calibration_serves_other_trainer_settings_only(tiny):
    dense = tiny("llama").model
    cfg = PruneConfig(permutation="learned", groups=2, progress=False, learn=LEARN)
    calibration = calibrate(dense, cfg, make_batches(_calib(), LEARN.batch_size))
    slower = dataclasses.replace(cfg, learn=dataclasses.replace(LEARN, lr=0.01, epochs=2))
    plans = plan_candidates(dense, slower, calibration=calibration)
    assert plans.calibration is calibration and len(plans.history) == 2 * len(calibration.batches)
    assert _perms(plans.plans["heuristic"]) == _perms(calibration.heuristic)
    for other in (dataclasses.replace(cfg, groups=1), dataclasses.replace(cfg, score="magnitude"),
                  dataclasses.replace(cfg, learn=dataclasses.replace(LEARN, batch_size=1))):
        with pytest.raises(ValueError, match="calibrate again"):
            plan_candidates(dense, other, calibration=calibration)
    bare = calibrate(dense, cfg, make_batches(_calib(), LEARN.batch_size), heuristic=False)
    with pytest.raises(ValueError, match="heuristic plan"):
        plan_candidates(dense, cfg, calibration=bare)


def test_prune_refuses_an_empty_calibration_set(tiny):
    model = tiny("llama").model
    with pytest.raises(ValueError, match="empty set"):
        prune(model, None, PruneConfig(score="wanda", permutation="none", progress=False),
              calib=torch.zeros(0, 8, dtype=torch.long))

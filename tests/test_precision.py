"""bfloat16 autocast only where the device computes it natively (permsparse.models.precision).

On a CPU without AVX512-BF16 or AMX the library runs the trainer, its calibration pass and its
guard in float32 even when ``LearnConfig.bf16`` asks for bfloat16 (there 10x slower), and the
run's config records what ran. The conftest fixture that fixes the rule for the other tests
(float32 on every CPU, or bfloat16 where a test is marked ``bf16``) is undone here.
"""

from __future__ import annotations

import pytest
import torch

from permsparse.config import LearnConfig, PruneConfig
from permsparse.models import precision
from permsparse.models.calibrate import collect_stats
from permsparse.pipeline.calibration import resolved
from permsparse.train.bank import step_weights
from permsparse.train.loss import autocast

#: The rule itself, taken before the conftest fixture replaces it (unwrapped: no cache between tests).
NATIVE = precision.native_bf16.__wrapped__


def _cpu(monkeypatch, native: bool) -> None:
    """This CPU as one with (or without) native bfloat16."""
    for name in precision._CPU_BF16_FEATURES:
        monkeypatch.setattr(torch.cpu, name, lambda native=native: native, raising=False)
    monkeypatch.setattr(precision, "native_bf16", NATIVE)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_is_used_only_where_the_cpu_has_it(monkeypatch, native):
    _cpu(monkeypatch, native)
    cpu = torch.device("cpu")
    assert precision.bf16_on(True, cpu) is native and precision.bf16_on(False, cpu) is False
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with autocast(True, cpu):
        y = torch.nn.functional.linear(x, w)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    kept = step_weights({"a": w}, LearnConfig(bf16=True))
    assert kept["a"].dtype == (torch.bfloat16 if native else torch.float32)
    assert step_weights({"a": w}, LearnConfig(bf16=False))["a"] is w


def test_the_calibration_pass_and_the_run_record_follow_the_rule(monkeypatch, tiny):
    _cpu(monkeypatch, False)
    t = tiny("llama")
    seen = []
    layer = "model.layers.0.self_attn.o_proj"
    hook = t.model.get_submodule(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    try:
        collect_stats(t.model, t.batches(2), [layer], progress=False, bf16=True)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.float32]  # asked for bf16, ran float32

    from permsparse.models.sites import find_sites

    sites = find_sites(t.model)
    cfg = resolved(PruneConfig(permutation="learned", groups=2), sites, t.model)
    assert cfg.learn.bf16 is False  # the run's record (result.config, permsparse.json) says float32
    _cpu(monkeypatch, True)
    assert resolved(PruneConfig(permutation="learned", groups=2), sites, t.model).learn.bf16 is True


def test_this_machine_reports_what_torch_says():
    """No patch: the rule reads torch's own CPU feature checks."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert NATIVE("cpu") is native and NATIVE("mps") is True

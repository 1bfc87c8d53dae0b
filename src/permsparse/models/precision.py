"""Whether bfloat16 autocast pays on a device.

``LearnConfig.bf16`` asks for bfloat16 autocast while learning (half the activation memory,
and on a GPU or a CPU with AVX512-BF16 or AMX the faster kernels). A CPU without native
bfloat16 computes it on a slow path: one 2048 x 576 by 576 x 1536 product took 0.53 s in
bfloat16 against 0.053 s in float32 on one AVX2 core, and the quick demo's training fitted 1
step in its 150 s (5 in float32; docs/results.md, "bfloat16 on a CPU without it"). There the
request is not honoured and the run stays in float32, which is also the more exact.
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["native_bf16", "bf16_on"]

log = logging.getLogger(__name__)

#: The CPU features under which PyTorch's bfloat16 matmuls take native kernels (x86).
_CPU_BF16_FEATURES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str) -> bool:
    """True where ``device_type`` computes bfloat16 natively: a CUDA device that supports it, a
    CPU with AVX512-BF16 or AMX; other backends (``mps``, ``xpu``) are taken at their word.
    An ARM CPU counts as without it (its bfloat16 support is not queried here): float32 is safe."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        native = any(getattr(torch.cpu, f, lambda: False)() for f in _CPU_BF16_FEATURES)
        if not native:
            log.info("this CPU has no native bfloat16 (AVX512-BF16 or AMX): learning runs in float32, "
                     "where bfloat16 would be about 10 times slower")
        return native
    return True


def bf16_on(requested: bool, device: "torch.device | str") -> bool:
    """Whether to run under bfloat16 autocast: ``requested`` and native on ``device``."""
    return bool(requested) and native_bf16(torch.device(device).type)

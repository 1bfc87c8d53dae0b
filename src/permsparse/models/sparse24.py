"""2:4 linear layers on cuSPARSELt that hand attention a tensor its fused kernels accept.

Why a layer of our own instead of ``F.linear`` on a ``torch.sparse`` semi-structured weight
(the chain of evidence; paths are inside the installed packages, torch 2.13.0 and
transformers 5.24.0 in the project's venv, see docs/deploy.md for the whole story):

1. ``F.linear(x, W_s)`` dispatches to ``semi_sparse_linear``
   (torch/sparse/_semi_structured_ops.py:177-193): ``A_2d @ B.t()`` and, at the end,
   ``res.view(*shape[:-1], -1)``. The product is ``semi_sparse_mm`` (same file, :133-149),
   ``B_t._mm(A, should_transpose_dense=True)``.
2. Before torch 2.13 that product came back as ``(W @ x^T).t()``: the cuSPARSELt/CUTLASS op
   wrote ``(out, tokens)`` row-major and ``semi_sparse_mm`` returned ``….t()``, a transposed
   view of shape ``(tokens, out)`` with strides ``(1, tokens)`` (pytorch source before the
   change, ``semi_sparse_mm`` ending in ``._mm(A, should_transpose_dense=True).t()``; the
   H200 runs of issue 18 used torch 2.11). torch 2.13 asks cuSPARSELt for the transposed
   result instead (torch/sparse/semi_structured.py:693-704 passes ``should_transpose_dense``
   as ``fuse_transpose``; :807-811 ``_cslt_sparse_mm(..., transpose_result=fuse_transpose)``,
   which allocates ``(n, m)`` row-major: torch/_meta_registrations.py:897).
3. LLaMA attention reshapes the projection: ``q_proj(h).view(B, T, H, D).transpose(1, 2)``
   (transformers/models/llama/modeling_llama.py:244-246). On the transposed view the
   ``view`` splits the stride-``B*T`` last dimension, so ``q``/``k``/``v`` reach SDPA with
   ``stride(-1) == B*T``; RoPE (:147) is elementwise and keeps that stride order, and ``v``
   goes to SDPA untouched (transformers/integrations/sdpa_attention.py:182).
4. Every fused SDPA backend (flash, memory-efficient, cuDNN) requires ``stride(-1) == 1``
   (``check_last_dim_stride_equals_1_dense``,
   torch/include/ATen/native/transformers/sdp_utils_cpp.h:511-550; it is in the constraint
   lists of ``can_use_flash_attention`` / ``can_use_mem_efficient_attention`` /
   ``can_use_cudnn_attention`` in aten/src/ATen/native/transformers/cuda/sdp_utils.cpp), so
   the dispatcher falls back to ``_scaled_dot_product_attention_math``, which upcasts fp16
   and bf16 inputs to float32 unless ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp``
   is set (aten/src/ATen/native/transformers/attention.cpp, ``query_acc = ...to(kFloat)``):
   the float32 GEMM and float32 softmax of the issue's profile.

:class:`Sparse24Linear` calls ``torch._cslt_sparse_mm`` itself with ``transpose_result=True``:
the product is written ``(tokens, out)`` row-major by the kernel, on every torch version that
has cuSPARSELt, with no extra copy kernel, and without the tensor subclass's Python dispatch on
every call. :func:`row_major` guards the contract (a no-op, no launch, on a row-major result).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from permsparse.core.pattern import count_violations

__all__ = [
    "Sparse24Linear",
    "DENSE_MIN_ROWS",
    "SPARSE24_DTYPES",
    "sparse24_unavailable",
    "fused_attention_layout_ok",
    "row_major",
    "sparse24_mm",
    "pack_2to4",
]

log = logging.getLogger(__name__)

#: cuSPARSELt's fp16/bf16 shape rules (torch/sparse/semi_structured.py:564-565): the sparse
#: weight is a multiple of 16 x 16, the dense operand's rows (tokens) a multiple of 8.
SPARSE_MIN = 16
DENSE_MIN_ROWS = 8
SPARSE24_DTYPES = (torch.float16, torch.bfloat16)


def sparse24_unavailable(device: "torch.device | str") -> str | None:
    """Why the cuSPARSELt 2:4 kernels cannot run on ``device`` (``None``: they can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"2:4 kernels need a CUDA device, not {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is None or not cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"sparse tensor cores need compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def fused_attention_layout_ok(*tensors: torch.Tensor) -> bool:
    """The layout rule every fused SDPA kernel checks for dense q/k/v: the last dimension has
    stride 1 (or size 1) — ``check_last_dim_stride_equals_1_dense`` in
    torch/include/ATen/native/transformers/sdp_utils_cpp.h. Failing it sends attention to the
    float32 math path."""
    return all(t.stride(-1) == 1 or t.size(-1) == 1 for t in tensors)


def row_major(y: torch.Tensor) -> torch.Tensor:
    """``y`` itself when it is row-major (no launch); a row-major copy otherwise."""
    return y if y.is_contiguous() else y.contiguous()


def pack_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Compress a 2:4 weight (``(out, in)``, 2:4 along ``in``) into cuSPARSELt's packed form."""
    if weight.dim() != 2:
        raise ValueError(f"2:4 weights are 2-D, got shape {tuple(weight.shape)}")
    if weight.dtype not in SPARSE24_DTYPES:
        raise ValueError(f"2:4 kernels take {SPARSE24_DTYPES} weights, not {weight.dtype}")
    d_out, d_in = weight.shape
    if d_out % SPARSE_MIN or d_in % SPARSE_MIN:
        raise ValueError(f"2:4 kernels need both dimensions a multiple of {SPARSE_MIN}, got {d_out} x {d_in}")
    bad = count_violations(weight, "2:4")
    if bad:
        raise ValueError(f"weight is not 2:4 in its stored layout ({bad} violating blocks); deploy it first")
    # cuSPARSELt reads only the element count; the (out, -1) view gives the op's meta function
    # (torch/_meta_registrations.py:875, ``m = compressed_A.size(0)``) the right output width
    # under torch.compile.
    return torch._cslt_compress(weight.detach().contiguous()).view(d_out, -1)


def sparse24_mm(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, alg_id: int = 0) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` on cuSPARSELt, returned ``(rows, out)`` row-major.

    ``W @ x^T`` is computed with ``x`` passed as its transposed view (no copy) and the kernel
    writes the transposed result: ``(rows, out)`` row-major, which is what attention needs.
    """
    rows = x2d.shape[0]
    pad = -rows % DENSE_MIN_ROWS
    if pad:
        x2d = F.pad(x2d, (0, 0, 0, pad))  # (rows + pad, in)
    x2d = x2d.contiguous()
    y = torch._cslt_sparse_mm(packed, x2d.t(), bias=bias, transpose_result=True, alg_id=alg_id)  # (rows+pad, out)
    if pad:
        y = y[:rows]  # leading rows of a row-major tensor: still row-major
    return row_major(y)


class Sparse24Linear(nn.Module):
    """A deployed linear layer whose 2:4 weight runs on the cuSPARSELt kernels.

    ``packed`` is the compressed ``W[:, π]``; ``input_perm`` (``π``) is gathered from the input
    when the producer does not deliver permuted features. Inputs with fewer than
    ``min_tokens`` rows (tokens) run the dense kernel on ``weight`` instead, for the shapes
    where 2:4 loses (small decode batches); ``min_tokens=0`` always uses 2:4 and keeps no
    dense copy. Outputs are row-major (see the module docstring).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_perm: torch.Tensor | None = None,
        min_tokens: int = 0,
        alg_id: int = 0,
    ) -> None:
        super().__init__()
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self.out_features, self.in_features = weight.shape
        self.min_tokens = int(min_tokens)
        self.alg_id = int(alg_id)
        self.register_buffer("packed", pack_2to4(weight), persistent=False)
        # The dense copy is kept only when some inputs will run the dense kernel.
        self.weight = nn.Parameter(weight.detach(), requires_grad=False) if self.min_tokens > 0 else None
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        if input_perm is not None:
            self.register_buffer("input_perm", input_perm.to(weight.device, torch.long), persistent=False)
        else:
            self.input_perm = None

    @classmethod
    def from_linear(cls, layer: nn.Module, min_tokens: int = 0, alg_id: int = 0) -> "Sparse24Linear":
        """From an ``nn.Linear`` or a :class:`permsparse.models.deploy.PermutedLinear`."""
        bias = getattr(layer, "bias", None)
        return cls(layer.weight.detach(), None if bias is None else bias.detach(),
                   getattr(layer, "input_perm", None), min_tokens, alg_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)  # (..., d_in) gather
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # (rows, d_in)
        if x2d.shape[0] < self.min_tokens:
            return F.linear(x, self.weight, self.bias)
        return sparse24_mm(x2d, self.packed, self.bias, self.alg_id).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"gather={self.input_perm is not None}, min_tokens={self.min_tokens}")

"""The Triton kernels of trainer/fp8_swiglu.py: Liger's one-row SwiGLU kernels (liger_kernel/ops/swiglu.py
`_swiglu_forward_kernel`, `_swiglu_backward_kernel`, gate_multiplier 1.0) that also write each row's max |value|.
Imported only where they run (CUDA): importing triton is not free, and the CPU path needs none of it."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def _forward(a_ptr, b_ptr, c_ptr, amax_ptr, stride, n_cols: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    a = tl.load(a_ptr + row * stride + cols, mask=mask, other=0).to(tl.float32)
    b = tl.load(b_ptr + row * stride + cols, mask=mask, other=0)
    c = (a * tl.sigmoid(a)).cast(b.dtype) * b
    tl.store(c_ptr + row * stride + cols, c, mask=mask)
    tl.store(amax_ptr + row, tl.max(tl.abs(c.to(tl.float32)), axis=0))


@triton.jit
def _backward(dc_ptr, a_ptr, b_ptr, amax_a_ptr, amax_b_ptr, stride, n_cols: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # da into a, db into b, rounded to their dtype as Liger's stores round them, and each row's max |da|, |db|
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dc = tl.load(dc_ptr + row * stride + cols, mask=mask, other=0)
    a = tl.load(a_ptr + row * stride + cols, mask=mask, other=0).to(tl.float32)
    b = tl.load(b_ptr + row * stride + cols, mask=mask, other=0)
    sig = tl.sigmoid(a)
    silu = a * sig
    db = (dc * silu).to(b.dtype)
    da = (dc * (silu * (1 - sig) + sig) * b).to(b.dtype)
    tl.store(a_ptr + row * stride + cols, da, mask=mask)
    tl.store(b_ptr + row * stride + cols, db, mask=mask)
    tl.store(amax_a_ptr + row, tl.max(tl.abs(da.to(tl.float32)), axis=0))
    tl.store(amax_b_ptr + row, tl.max(tl.abs(db.to(tl.float32)), axis=0))


def _settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) as Liger launches its one-row SwiGLU kernels (liger_kernel.ops.utils)."""
    from liger_kernel.ops.utils import calculate_settings

    return calculate_settings(n_cols)


def forward(a: Any, b: Any, c: Any, amax: Any) -> None:
    """c = silu(a) * b and amax[row] = max |c[row]| for 2-D contiguous a, b, c of one shape."""
    block, warps = _settings(a.shape[1])
    _forward[(a.shape[0],)](a, b, c, amax, c.stride(0), n_cols=a.shape[1], BLOCK_SIZE=block, num_warps=warps)


def backward(dc: Any, a: Any, b: Any, amax_a: Any, amax_b: Any) -> None:
    """da into a, db into b, and their rows' max |value| into amax_a, amax_b."""
    block, warps = _settings(a.shape[1])
    _backward[(a.shape[0],)](dc, a, b, amax_a, amax_b, a.stride(0), n_cols=a.shape[1], BLOCK_SIZE=block,
                             num_warps=warps)

"""SwiGLU that hands the float8 casts beside it the maxima they need (`performance.fp8_base`; issue #20).

A tensorwise float8 cast reads its tensor twice: once for the amax (the scale), once to scale and round. The two
largest casts of a Llama layer read tensors that Liger's SwiGLU kernel has just written, one row per program:

    forward:   c = silu(a) * b                 -> down_proj's input, cast to e4m3
    backward:  da, db = d(silu(a) * b)/d(a, b) -> gate_proj's and up_proj's output gradients, cast to e5m2

At 8 x 2048 tokens of the 8B shape each is 16,384 x 14,336 bf16 (448 MiB), and the amax read cost about 0.15 ms
of each 0.55-0.62 ms cast on an H100 (bench/results/fastpath_h100_2026-12-06c/). `SiluMulRowAmax` is Liger's
SwiGLU (the same kernels, the same bits; bench/fp8_gemm_micro.py compares them on the GPU) that also writes the
maximum |value| of each row it produced, while the row is still in registers, and notes it for that tensor
(fp8.ROW_AMAX). The cast then takes the maximum of those row maxima instead of reading the tensor for it: the
same amax, so the same scale and the same float8 bits.

It replaces the forward of Liger's SwiGLU MLP (`down_proj(silu_mul(gate_proj(x), up_proj(x)))`) where all three
projections run float8 GEMMs without torchao's subclass (`route_swiglu_mlps`, called by fp8.apply_fp8_base). Like
Liger's, the backward writes da and db into the buffers of a and b (no new memory). On CPU (tests) the same math
runs as torch ops.
"""

from __future__ import annotations

import types
from typing import Any

import torch

ROUTE = True
"""Route Liger's SwiGLU MLPs through SiluMulRowAmax under fp8_base. False (bench/train_throughput.py's
`fast_fp8_cache_selective_offload_liger_swiglu`, to measure what it brings) keeps Liger's."""

_KERNELS: Any = None


def _kernels() -> Any:
    """The two Triton kernels (compiled at their first launch), built once; triton is imported only here."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def forward(a_ptr, b_ptr, c_ptr, amax_ptr, stride, n_cols: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # liger_kernel/ops/swiglu.py _swiglu_forward_kernel (gate_multiplier 1.0), plus the row's max |c|.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        a = tl.load(a_ptr + row * stride + cols, mask=mask, other=0).to(tl.float32)
        b = tl.load(b_ptr + row * stride + cols, mask=mask, other=0)
        c = (a * tl.sigmoid(a)).cast(b.dtype) * b
        tl.store(c_ptr + row * stride + cols, c, mask=mask)
        tl.store(amax_ptr + row, tl.max(tl.abs(c.to(tl.float32)), axis=0))

    @triton.jit
    def backward(dc_ptr, a_ptr, b_ptr, amax_a_ptr, amax_b_ptr, stride, n_cols: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr):
        # liger_kernel/ops/swiglu.py _swiglu_backward_kernel (gate_multiplier 1.0): da into a, db into b, rounded
        # to their dtype as its stores round them, plus each row's max |da| and |db|.
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

    _KERNELS = types.SimpleNamespace(forward=forward, backward=backward)
    return _KERNELS


def _launch_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) as Liger launches its one-row SwiGLU kernels (liger_kernel.ops.utils)."""
    from liger_kernel.ops.utils import calculate_settings

    return calculate_settings(n_cols)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, row maxima of |c|) for 2-D contiguous a, b: c = silu(a) * b, silu in float32, c in b's dtype."""
    rows, cols = a.shape
    if not a.is_cuda:
        c = torch.nn.functional.silu(a.float()).to(b.dtype) * b
        return c, c.abs().amax(dim=-1).float()
    c = torch.empty_like(a)
    amax = torch.empty(rows, dtype=torch.float32, device=a.device)
    block, warps = _launch_settings(cols)
    with torch.cuda.device(a.device):
        _kernels().forward[(rows,)](a, b, c, amax, c.stride(0), n_cols=cols, BLOCK_SIZE=block, num_warps=warps)
    return c, amax


def silu_mul_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(da, db, row maxima of |da|, of |db|) for 2-D contiguous dc, a, b; da and db are written into a and b."""
    rows, cols = a.shape
    if not a.is_cuda:
        a32 = a.float()
        sig = torch.sigmoid(a32)
        silu = a32 * sig
        db = (dc * silu).to(b.dtype)
        da = (dc * (silu * (1 - sig) + sig) * b).to(b.dtype)
        a.copy_(da)
        b.copy_(db)
        return a, b, a.abs().amax(dim=-1).float(), b.abs().amax(dim=-1).float()
    amax_a = torch.empty(rows, dtype=torch.float32, device=a.device)
    amax_b = torch.empty_like(amax_a)
    block, warps = _launch_settings(cols)
    with torch.cuda.device(a.device):
        _kernels().backward[(rows,)](dc, a, b, amax_a, amax_b, a.stride(0), n_cols=cols, BLOCK_SIZE=block,
                                     num_warps=warps)
    return a, b, amax_a, amax_b


class SiluMulRowAmax(torch.autograd.Function):
    """silu(a) * b (Liger's LigerSiLUMulFunction with no multipliers), its output's and its input gradients' row
    maxima noted for their float8 casts (fp8.ROW_AMAX)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from qlora_doctor.trainer.fp8 import ROW_AMAX

        shape = a.shape
        a2, b2 = a.reshape(-1, shape[-1]).contiguous(), b.reshape(-1, shape[-1]).contiguous()
        c, amax = silu_mul(a2, b2)
        ctx.save_for_backward(a2, b2)
        c = c.view(shape)
        ROW_AMAX.note(c, amax)
        return c

    @staticmethod
    def backward(ctx: Any, dc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from qlora_doctor.trainer.fp8 import ROW_AMAX

        a2, b2 = ctx.saved_tensors
        da, db, amax_a, amax_b = silu_mul_backward(dc.reshape(a2.shape).contiguous(), a2, b2)
        da, db = da.view(dc.shape), db.view(dc.shape)
        ROW_AMAX.note(da, amax_a)
        ROW_AMAX.note(db, amax_b)
        return da, db


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """LigerSwiGLUMLP.forward through SiluMulRowAmax."""
    return self.down_proj(SiluMulRowAmax.apply(self.gate_proj(x), self.up_proj(x)))


def liger_swiglu_forward() -> Any:
    """LigerSwiGLUMLP.forward, or None where liger-kernel is not importable."""
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except Exception:  # noqa: BLE001 - not installed, or no triton: nothing of Liger's to replace
        return None
    return LigerSwiGLUMLP.forward


def route(mlp: Any) -> None:
    """Run `mlp` (gate_proj, up_proj, down_proj and a SwiGLU between them) through SiluMulRowAmax."""
    mlp.forward = types.MethodType(_forward, mlp)


def is_routed(mlp: Any) -> bool:
    return getattr(vars(mlp).get("forward"), "__func__", None) is _forward


def route_swiglu_mlps(model: Any, takes_notes: Any) -> int:
    """Route every Liger SwiGLU MLP of `model` whose three projections `takes_notes` (a function of the projection
    module) through SiluMulRowAmax; returns how many."""
    liger = liger_swiglu_forward()
    if liger is None or not ROUTE:
        return 0
    routed = 0
    for module in model.modules():
        if getattr(getattr(module, "forward", None), "__func__", None) is not liger:
            continue
        if all(takes_notes(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj")):
            route(module)
            routed += 1
    return routed

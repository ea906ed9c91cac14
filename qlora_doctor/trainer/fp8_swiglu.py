"""SwiGLU that hands the float8 casts beside it the maxima they need (`performance.fp8_base`; issue #20).

A tensorwise float8 cast reads its tensor twice: once for the amax (the scale), once to scale and round. The two
largest casts of a Llama layer read tensors that Liger's SwiGLU kernel has just written, one row per program:

    forward:   c = silu(a) * b                 -> down_proj's input, cast to e4m3
    backward:  da, db = d(silu(a) * b)/d(a, b) -> gate_proj's and up_proj's output gradients, cast to e5m2

At 8 x 2048 tokens of the 8B shape each is 16,384 x 14,336 bf16 (448 MiB), and the amax read cost about 0.15 ms
of each 0.55-0.62 ms cast on an H100 (bench/results/fastpath_h100_2026-12-06c/). `SiluMulRowAmax` is Liger's
SwiGLU (its kernels, copied into trainer/fp8_swiglu_kernels.py: the same bits, which bench/fp8_swiglu_micro.py
checks on the GPU) that also writes the maximum |value| of each row it produced, while the row is still in
registers, and notes it for that tensor (ROW_AMAX). The cast then takes the maximum of those row maxima instead
of reading the tensor for it: the same amax, so the same scale and the same float8 bits.

It replaces the forward of Liger's SwiGLU MLP (`down_proj(silu_mul(gate_proj(x), up_proj(x)))`) where all three
projections run float8 GEMMs without torchao's subclass (`route_swiglu_mlps`, called by fp8.apply_fp8_base). Like
Liger's, the backward writes da and db into the buffers of a and b (no new memory). On CPU (tests) the same math
runs as torch ops.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch

from qlora_doctor.trainer.forwards import replace_forward, runs_forward

ROUTE = True
"""Route Liger's SwiGLU MLPs through SiluMulRowAmax under fp8_base. False (bench/train_throughput.py's
`fast_fp8_cache_selective_offload_liger_swiglu`, to measure what it brings) keeps Liger's."""


class _Note(NamedTuple):
    owner: weakref.ref
    """The noted tensor's base (itself when it is no view)."""
    key: tuple
    """The owner's version counter, the noted tensor's data_ptr, element count and dtype."""
    row_amax: torch.Tensor


class RowAmaxNotes:
    """The row maxima of |x| of tensors whose producing kernel computed them anyway (SiluMulRowAmax), so
    their float8 cast need not read them for its amax. A note holds for the tensor it was taken of, or any
    contiguous view of all of it, while the tensor is alive and unchanged by torch ops (its version counter);
    its weak reference's callback drops it when the tensor dies. `used` counts the casts that took a note."""

    def __init__(self) -> None:
        self.notes: dict[int, _Note] = {}
        self.used = 0

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        owner = tensor if tensor._base is None else tensor._base
        return owner, (owner._version, tensor.data_ptr(), tensor.numel(), tensor.dtype)

    def note(self, tensor: torch.Tensor, row_amax: torch.Tensor) -> None:
        owner, key = self._key(tensor)
        pointer = tensor.data_ptr()

        def drop(ref: Any) -> None:
            if self.notes.get(pointer, None) is not None and self.notes[pointer].owner is ref:
                del self.notes[pointer]

        self.notes[pointer] = _Note(weakref.ref(owner, drop), key, row_amax)

    def row_amax(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The noted row maxima of `tensor` (a contiguous tensor covering all of a noted one), else None."""
        note = self.notes.get(tensor.data_ptr())
        if note is None or not tensor.is_contiguous():
            return None
        owner, key = self._key(tensor)
        if note.owner() is not owner or note.key != key:
            return None
        self.used += 1
        return note.row_amax


ROW_AMAX = RowAmaxNotes()
"""The notes of this process (SiluMulRowAmax writes them, trainer/fp8.py's direct casts read them)."""


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, row maxima of |c|) for 2-D contiguous a, b: c = silu(a) * b, silu in float32, c in b's dtype."""
    rows = a.shape[0]
    if not a.is_cuda:
        c = torch.nn.functional.silu(a.float()).to(b.dtype) * b
        return c, c.abs().amax(dim=-1).float()
    from qlora_doctor.trainer import fp8_swiglu_kernels

    c = torch.empty_like(a)
    amax = torch.empty(rows, dtype=torch.float32, device=a.device)
    with torch.cuda.device(a.device):
        fp8_swiglu_kernels.forward(a, b, c, amax)
    return c, amax


def silu_mul_backward(dc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(da, db, row maxima of |da|, of |db|) for 2-D contiguous dc, a, b; da and db are written into a and b."""
    rows = a.shape[0]
    if not a.is_cuda:
        a32 = a.float()
        sig = torch.sigmoid(a32)
        silu = a32 * sig
        db = (dc * silu).to(b.dtype)
        da = (dc * (silu * (1 - sig) + sig) * b).to(b.dtype)
        a.copy_(da)
        b.copy_(db)
        return a, b, a.abs().amax(dim=-1).float(), b.abs().amax(dim=-1).float()
    from qlora_doctor.trainer import fp8_swiglu_kernels

    amax_a = torch.empty(rows, dtype=torch.float32, device=a.device)
    amax_b = torch.empty_like(amax_a)
    with torch.cuda.device(a.device):
        fp8_swiglu_kernels.backward(dc, a, b, amax_a, amax_b)
    return a, b, amax_a, amax_b


class SiluMulRowAmax(torch.autograd.Function):
    """silu(a) * b (Liger's LigerSiLUMulFunction with no multipliers), its output's and its input gradients' row
    maxima noted for their float8 casts (ROW_AMAX)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        a2, b2 = a.reshape(-1, shape[-1]).contiguous(), b.reshape(-1, shape[-1]).contiguous()
        c, amax = silu_mul(a2, b2)
        ctx.save_for_backward(a2, b2)
        c = c.view(shape)
        ROW_AMAX.note(c, amax)
        return c

    @staticmethod
    def backward(ctx: Any, dc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def is_routed(mlp: Any) -> bool:
    """Whether route_swiglu_mlps routed `mlp` through SiluMulRowAmax."""
    return runs_forward(mlp, _forward)


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
            replace_forward(module, _forward)
            routed += 1
    return routed

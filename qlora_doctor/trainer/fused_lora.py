"""LoRA on a bitsandbytes 4-bit linear layer as one autograd function (the `performance.fused_lora`
lever).

peft computes `base_layer(x).clone() + lora_B(lora_A(dropout(x))) * scaling` as separate autograd
nodes. For every adapted layer that stores a dropped-out copy of the input (2 bytes per element in
bf16) and a boolean mask (1 byte), plus the clone. `LoraLinear4bitFunction` stores only a reference to
the input (q/k/v and gate/up share one tensor, so one copy per layer group) and the state of the
random number generator: the backward pass draws the same dropout mask again. For an 8B Llama with
LoRA on all linear layers and lora_dropout > 0 that is about 117 KB -> 53 KB of saved activations per
token per layer, and the base matmul runs through bitsandbytes' own 4-bit kernel as before.

    forward:  y = W x + s * B A drop(x)                       (W dequantized by bitsandbytes)
    backward: dx = W^T dy + drop'(s * A^T B^T dy),  dA = (s B^T dy) drop(x)^T,  dB = s dy (A drop(x))^T

Only plain LoRA is fused (one active adapter, no DoRA, no bias, not merged); any other call runs
peft's own forward, so the adapter behaves exactly like peft's wherever this does not apply.

The base GEMMs (`W x` and `W^T dy`) are bitsandbytes', unless the base layer carries another implementation
in `BASE_GEMM_ATTRIBUTE` (`performance.fp8_base`: trainer/fp8.py's float8 GEMMs).
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, Iterator

import torch

_OUT_OF_PLACE = contextvars.ContextVar("qlora_fused_lora_out_of_place", default=False)
"""Set inside a selectively checkpointed layer: the LoRA term is added out of place, so the base GEMM's
output that the selective policy keeps is never written to (trainer/selective.py)."""


@contextlib.contextmanager
def lora_add_out_of_place() -> Iterator[None]:
    token = _OUT_OF_PLACE.set(True)
    try:
        yield
    finally:
        _OUT_OF_PLACE.reset(token)

BASE_GEMM_ATTRIBUTE = "qlora_base_gemm"
"""An attribute of a bitsandbytes 4-bit layer holding an object with `forward(x2, weight, quant_state)` (x2 @ W^T)
and `grad_input(grad, weight, quant_state)` (grad @ W) to use instead of bitsandbytes' GEMMs (trainer/fp8.py)."""


class LoraLinear4bitFunction(torch.autograd.Function):
    """y = 4-bit base(x) + scaling * lora_B(lora_A(dropout(x))); gradients for x, lora_A, lora_B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: Any,
                quant_state: Any, scaling: float, dropout_p: float, compute_dtype: torch.dtype,
                base_gemm: Any = None) -> torch.Tensor:
        import bitsandbytes as bnb

        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        if base_gemm is None:
            out = bnb.matmul_4bit(x2, weight, quant_state=quant_state)  # grad is off here: bnb's fast path
        else:
            out = base_gemm.forward(x2, weight, quant_state)
        rng_state = None
        if dropout_p > 0:
            rng_state = _get_rng_state(x2.device)
            dropped, _ = torch.native_dropout(x2, dropout_p, True)
        else:
            dropped = x2
        a_out = dropped @ lora_a.to(compute_dtype).t()
        if _OUT_OF_PLACE.get():
            out = torch.addmm(out, a_out, lora_b.to(compute_dtype).t(), alpha=scaling)
        else:
            out = out.addmm_(a_out, lora_b.to(compute_dtype).t(), alpha=scaling)
        ctx.save_for_backward(x2, a_out, lora_a, lora_b)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.dropout_p = weight, quant_state, scaling, dropout_p
        ctx.rng_state, ctx.compute_dtype, ctx.x_shape, ctx.x_dtype = rng_state, compute_dtype, x.shape, x.dtype
        ctx.base_gemm = base_gemm
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        import bitsandbytes.functional as bnb_f

        x2, a_out, lora_a, lora_b = ctx.saved_tensors
        cd, s, p = ctx.compute_dtype, ctx.scaling, ctx.dropout_p
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
        a16, b16 = lora_a.to(cd), lora_b.to(cd)
        grad_b = (g.t() @ a_out).mul_(s) if ctx.needs_input_grad[2] else None
        g_a = (g @ b16).mul_(s)  # d loss / d (A drop(x)), [tokens, r]
        mask = None
        if p > 0:
            with torch.random.fork_rng(devices=_rng_devices(x2.device), device_type=x2.device.type):
                _set_rng_state(x2.device, ctx.rng_state)
                dropped, mask = torch.native_dropout(x2, p, True)
        else:
            dropped = x2
        grad_a = g_a.t() @ dropped if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.base_gemm is None:
                grad_x = g @ bnb_f.dequantize_4bit(ctx.weight, ctx.quant_state).to(cd)
            else:
                grad_x = ctx.base_gemm.grad_input(g, ctx.weight, ctx.quant_state)
            if mask is None:
                grad_x.addmm_(g_a, a16)
            else:
                grad_x.add_(torch.ops.aten.native_dropout_backward(g_a @ a16, mask, 1.0 / (1.0 - p)))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None, None, None, None)


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def fusable_reason(module: Any) -> str | None:
    """None when `module` (a peft LoRA layer) can use the fused function; else why not."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:
        return "peft's bitsandbytes LoRA layer is not available"
    if not isinstance(module, LoraLinear4bit):
        return f"{type(module).__name__} is not a LoRA layer on a 4-bit linear layer"
    if len(module.lora_A) != 1:
        return "more than one adapter"
    name = next(iter(module.lora_A))
    if getattr(module, "lora_variant", {}).get(name) is not None or module.use_dora.get(name, False):
        return "DoRA (a LoRA variant) is not fused"
    if module.get_base_layer().bias is not None or getattr(module, "lora_bias", {}).get(name, False):
        return "a bias is not fused"
    if getattr(module.get_base_layer().weight, "quant_state", None) is None:
        return "the 4-bit weight carries no quant_state (sharded by FSDP?)"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return f"dropout module {type(dropout).__name__} is not fused"
    return None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = next(iter(self.lora_A))
    if (args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [name]):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    compute_dtype = base.compute_dtype or x.dtype  # what bitsandbytes' Linear4bit computes in
    return LoraLinear4bitFunction.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, base.weight,
                                        base.weight.quant_state, float(self.scaling[name]), float(p), compute_dtype,
                                        getattr(base, BASE_GEMM_ATTRIBUTE, None))


def fuse_lora_layers(model: Any) -> tuple[int, list[str]]:
    """Route every fusable LoRA-on-4-bit layer of `model` through `LoraLinear4bitFunction`.

    Returns (layers fused, reasons some were not: `name: reason`, distinct reasons only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    fused, skipped = 0, {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        reason = fusable_reason(module)
        if reason is None:
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
        else:
            skipped.setdefault(reason, name)
    return fused, [f"{name}: {reason}" for reason, name in skipped.items()]


def is_fused(module: Any) -> bool:
    """Whether `module` runs the fused LoRA forward (fuse_lora_layers replaced its forward)."""
    return "forward" in vars(module) and getattr(module.forward, "__func__", None) is _fused_forward

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

Inside a selectively checkpointed layer (trainer/selective.py, `selective_layer`) the forward of
SELECTIVE_WHOLE_LORA_PROJECTIONS is one custom op, `lora_gemm_4bit`, whose outputs the policy keeps, so the
backward's replay runs none of it; the other kept projections add the LoRA term out of place.

The base GEMMs (`W x` and `W^T dy`) are bitsandbytes', unless the base layer carries another implementation
in `BASE_GEMM_ATTRIBUTE` (`performance.fp8_base`: trainer/fp8.py's float8 GEMMs).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from qlora_doctor.trainer.forwards import replace_forward, runs_forward
from qlora_doctor.trainer.op_calls import OpCalls

WHOLE_LORA_OP = True
"""Inside a selectively checkpointed layer, run the LoRA forward of SELECTIVE_WHOLE_LORA_PROJECTIONS as one op
(`lora_gemm_4bit`) that the policy keeps. False (bench/train_throughput.py's `fast_no_whole_lora`, to measure what
it brings) keeps only their base GEMM output and adds the LoRA term out of place, as q/k_proj do."""


@dataclass
class SelectiveLayer:
    """What the fused forward needs to know inside one selectively checkpointed layer call (trainer/selective.py):
    `kept`, the base weights (data_ptr) of the projections whose base GEMM output the policy keeps: their LoRA
    term is added out of place, so the kept tensor is never written to; `whole`, those of them whose whole LoRA
    forward is one kept op (`lora_gemm_4bit`), so the replay skips the LoRA matmuls and the add too, with their
    projections' names. With `check`, the outputs of whole ops are checked unchanged when the layer's forward ends
    (`selective_layer`)."""

    kept: frozenset[int]
    whole: Mapping[int, str]
    check: bool = False
    outputs: list[tuple[str, torch.Tensor, int]] = field(default_factory=list)


_SELECTIVE: contextvars.ContextVar[SelectiveLayer | None] = contextvars.ContextVar("qlora_selective_layer",
                                                                                   default=None)


@contextlib.contextmanager
def selective_layer(kept: frozenset[int], whole: Mapping[int, str], check: bool = False) -> Iterator[SelectiveLayer]:
    """Run the fused forwards inside as parts of a selectively checkpointed layer (SelectiveLayer). A whole-LoRA
    output written to before the layer's forward ends would make the replay start from the written values: that
    raises, naming the projection, instead of training on wrong gradients."""
    layer = SelectiveLayer(kept, whole if WHOLE_LORA_OP else {}, check)
    token = _SELECTIVE.set(layer)
    try:
        yield layer
    finally:
        _SELECTIVE.reset(token)
    changed = [name for name, out, version in layer.outputs if out._version != version]
    layer.outputs.clear()
    if changed:
        raise RuntimeError(
            f"selective recompute keeps the whole LoRA output of {', '.join(sorted(set(changed)))}, and an op later in "
            "the layer wrote into it in place, so the backward would replay from the written values. Set "
            "`performance.recompute: full` and report the model's architecture: its projections need adding to "
            "the ones whose LoRA output is not kept whole (recipe/levers.py SELECTIVE_WHOLE_LORA_PROJECTIONS).")


BASE_GEMM_ATTRIBUTE = "qlora_base_gemm"
"""An attribute of a bitsandbytes 4-bit layer holding an object with `forward(x2, weight, quant_state)` (x2 @ W^T)
and `grad_input(grad, weight, quant_state)` (grad @ W) to use instead of bitsandbytes' GEMMs (trainer/fp8.py)."""


class LoraLinear4bitFunction(torch.autograd.Function):
    """y = 4-bit base(x) + scaling * lora_B(lora_A(dropout(x))); gradients for x, lora_A, lora_B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weight: Any,
                quant_state: Any, scaling: float, dropout_p: float, compute_dtype: torch.dtype,
                base_gemm: Any = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        rng_state = None
        if dropout_p > 0:
            rng_state = _get_rng_state(x2.device)
            dropped, _ = torch.native_dropout(x2, dropout_p, True)
        else:
            dropped = x2
        a16, b16 = lora_a.to(compute_dtype), lora_b.to(compute_dtype)
        layer = _SELECTIVE.get()
        pointer = weight.data_ptr()
        if layer is not None and pointer in layer.whole:
            with _CALLS.call(quant_state, base_gemm) as key:
                out, a_out = lora_gemm_4bit(x2, dropped, weight, a16, b16, scaling, key)
            if layer.check:
                layer.outputs.append((layer.whole[pointer], out, out._version))
        else:
            out = _base_forward(x2, weight, quant_state, base_gemm)
            a_out = dropped @ a16.t()
            if layer is not None and pointer in layer.kept:
                out = torch.addmm(out, a_out, b16.t(), alpha=scaling)  # the kept base output stays unwritten
            else:
                out = out.addmm_(a_out, b16.t(), alpha=scaling)
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
            def lora_term() -> torch.Tensor:  # the LoRA path's input gradient, [tokens, in]
                term = g_a @ a16
                return term if mask is None else torch.ops.aten.native_dropout_backward(term, mask, 1.0 / (1.0 - p))

            if ctx.base_gemm is None:
                # The base GEMM accumulates into the LoRA term: its epilogue reads it while the GEMM is compute-bound,
                # where adding the term afterwards would read and write [tokens, in] once more.
                grad_x = lora_term().addmm_(g, bnb_f.dequantize_4bit(ctx.weight, ctx.quant_state).to(cd))
            elif mask is None:
                grad_x = ctx.base_gemm.grad_input(g, ctx.weight, ctx.quant_state).addmm_(g_a, a16)
            else:
                grad_x = ctx.base_gemm.grad_input(g, ctx.weight, ctx.quant_state).add_(lora_term())
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad_x, None if grad_a is None else grad_a.to(lora_a.dtype),
                None if grad_b is None else grad_b.to(lora_b.dtype), None, None, None, None, None, None)


def _base_forward(x2: torch.Tensor, weight: Any, quant_state: Any, base_gemm: Any) -> torch.Tensor:
    """x2 @ W^T for the 4-bit weight: bitsandbytes' matmul (grad is off here: its fast path) or `base_gemm`'s."""
    import bitsandbytes as bnb

    if base_gemm is None:
        return bnb.matmul_4bit(x2, weight, quant_state=quant_state)
    return base_gemm.forward(x2, weight, quant_state)


_CALLS = OpCalls("qlora_doctor::lora_gemm_4bit", "LoraLinear4bitFunction")
"""The (quant_state, base_gemm) of each `lora_gemm_4bit` call in progress, by its key."""


@torch.library.custom_op("qlora_doctor::lora_gemm_4bit", mutates_args=())
def lora_gemm_4bit(x2: torch.Tensor, dropped: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: float, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W x2 + scaling * B A dropped, A dropped) for the 4-bit `weight`, the LoRA term added in place into the
    base GEMM's fresh output: one op, so that selective recompute keeps the whole LoRA output and its replay runs
    none of it (trainer/selective.py GEMM_OPS). The dropout is drawn outside, so the op draws no random numbers."""
    quant_state, base_gemm = _CALLS[key]
    out = _base_forward(x2, weight, quant_state, base_gemm)
    a_out = dropped @ lora_a.t()
    return out.addmm_(a_out, lora_b.t(), alpha=scaling), a_out


@lora_gemm_4bit.register_fake
def _lora_gemm_4bit_fake(x2: torch.Tensor, dropped: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, scaling: float, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x2.new_empty((x2.shape[0], lora_b.shape[0])), x2.new_empty((x2.shape[0], lora_a.shape[0]))


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
            replace_forward(module, _fused_forward)
            fused += 1
        else:
            skipped.setdefault(reason, name)
    return fused, [f"{name}: {reason}" for reason, name in skipped.items()]


def is_fused(module: Any) -> bool:
    """Whether `module` runs the fused LoRA forward (fuse_lora_layers replaced its forward)."""
    return runs_forward(module, _fused_forward)

"""FP8 GEMMs for the frozen 4-bit base layers (`performance.fp8_base: true`; issue #20, item 2).

Every bitsandbytes `Linear4bit` of the model keeps its NF4 weight; only its two GEMMs change:

    forward:   y  = f8(x) @ f8(W)^T        W = dequantize_4bit(weight) in the compute dtype, as bitsandbytes does
    backward:  dx = f8(dy) @ f8(W)          W dequantized again; no weight gradient (frozen), nothing saved

f8() is torchao's dynamic float8 cast of the recipe `RECIPE` (`Float8LinearConfig.from_recipe_name`):
tensorwise: e4m3 for x and W, e5m2 for dy, one scale per tensor from its amax, the GEMM torch._scaled_mm (FP8
tensor cores, compute capability >= 8.9), or in float32 with `emulate` (CPU tests). LoRA's A and B, their
matmuls and everything outside the base GEMMs stay as they were.

Tensorwise runs without torchao's tensor subclass (`Fp8BaseGemm.direct`): `cast_tensorwise` is torchao's cast
(its amax_to_scale and to_fp8_saturated) returning (data, scale), and `scaled_mm` is the torch._scaled_mm call
torchao's float8 `mm` makes, with the same bits (tests compare them). The subclass cost a __torch_dispatch__ per
GEMM and a float8 copy of the weight at every input-gradient GEMM to fix its layout (48 ms of a 1.4 s step on an
H100, bench/results/fastpath_h100_2026-12-06c/). The rowwise recipe still goes through torchao's subclass.

Why not torchao's `Float8Linear` / `matmul_with_hp_or_float8_args`: that autograd function always computes
the weight gradient (a third GEMM the frozen base does not need) and saves the high-precision weight for its
backward (the dequantized weight, 2 bytes per parameter, for every layer that is not checkpointed). This
module's function saves nothing and runs two GEMMs with the same casts.

The casts: an eager cast goes through float32 (`x.to(float32) * scale`, clamp, `.to(float8)`): for the 8B
down_proj input at 8 x 2048 tokens that is about 8 GB of memory traffic and 2 GiB of temporaries per cast. So on
CUDA each cast is compiled (`compile_casts`) into an amax reduction and a cast kernel: the first training step
compiles them. A compile failure falls back to the eager cast, with a warning (`Fp8BaseGemm.fallbacks`).

The weight's cast is the same at every GEMM (the weight is frozen), so `performance.fp8_weight_cache` keeps it
(`Fp8BaseGemm.cache_weights`): each weight is dequantized and cast once, at its first GEMM, and kept in the two
layouts torch._scaled_mm takes as its second operand (W for the output GEMM, W^T for the input gradient's; 2
bytes per parameter beside the NF4 weight); they serve every later forward, replay and input gradient, the same
bits.

The two largest activation casts of a Llama layer (down_proj's input, gate/up_proj's output gradients) read
tensors Liger's SwiGLU kernel writes row by row: trainer/fp8_swiglu.py's copy of that kernel also writes each
row's max |value| and notes it (`ROW_AMAX`), and the direct cast takes the maximum of those instead of reading the
tensor for its amax: the same amax, the same bits, one read of 448 MiB fewer per cast at 8 x 2048 tokens of 8B.

Where it applies: the unfused LoRA path (peft's layer calls its base layer) gets the base layer's forward
replaced; fused LoRA (trainer/fused_lora.py) reads the base GEMM from the base layer's `BASE_GEMM_ATTRIBUTE`.
Layers whose in/out features are not multiples of 16 (torch._scaled_mm's layout rule) keep bitsandbytes' GEMM.
Not combined with torch_compile or FSDP: the recipe refuses those (recipe/schema.py).

With `recompute: selective` (trainer/selective.py): its policy keeps a projection's base-GEMM output by finding
the op that reads the projection's 4-bit weight. So the float8 forward GEMM (dequantize, casts, `torch.mm`) is
one custom op, `qlora_doctor::fp8_gemm_4bit(x2, weight, key)`, that reads the 4-bit weight itself: SAC's
dispatch mode sees that one op (what runs inside it runs with the mode popped), keeps its output, and a kept
projection's replay skips the dequantization, the casts and the GEMM. Its `key` names the (Fp8BaseGemm,
quant_state) of this call (`_CALLS`, trainer/op_calls.py: quant_state is no tensor), registered for the call only. The
input-gradient GEMM runs in the backward, outside SAC's modes, and stays plain Python. Inside the op's kernel
the autograd dispatch keys are excluded (and Params4bit's __torch_function__ leaves torch-function subclasses
off), state torch.compile guards on: the weight cast, shared by both GEMMs for tensorwise, compiles once for
each, one more graph at the first step.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Any, Callable, NamedTuple

import torch

from qlora_doctor.core.errors import CheckFailed
from qlora_doctor.recipe.levers import TORCHAO_REQUIREMENT, fp8_capable, torchao_installed
from qlora_doctor.trainer.forwards import replace_forward, runs_forward
from qlora_doctor.trainer.fp8_swiglu import ROW_AMAX, route_swiglu_mlps
from qlora_doctor.trainer.fused_lora import BASE_GEMM_ATTRIBUTE
from qlora_doctor.trainer.op_calls import OpCalls

RECIPE = "tensorwise"
"""torchao's Float8LinearRecipeName: `tensorwise` (per-tensor scales, cuBLAS FP8 kernel, torchao's fastest) or
`rowwise` (per-row scales, e4m3 gradients, CUTLASS kernel)."""

GEMM_ALIGNMENT = 16
"""torch._scaled_mm needs both matrix dimensions of the weight to be multiples of 16."""


def torchao_problem() -> str | None:
    """None when torchao's float8 training API imports; else why not, with the command that fixes it."""
    if not torchao_installed():
        return f"torchao is not installed (`pip install '{TORCHAO_REQUIREMENT}'`)"
    try:
        from torchao.float8 import Float8LinearConfig  # noqa: F401
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic  # noqa: F401
        from torchao.float8.float8_training_tensor import LinearMMConfig  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means unusable here
        return (f"torchao is installed but its float8 API cannot be imported ({type(err).__name__}: {err}); "
                f"`pip install '{TORCHAO_REQUIREMENT}'`")
    return None


RECOMPILE_LIMIT = 64
"""Dynamo's per-function recompile limit while fp8_base compiles its casts. The casts share one function
(cast_tensorwise per float8 dtype, or torchao's), so dynamo counts the graphs of all operands together: one per weight shape (four on a Llama layer) and
operand, the dynamic-shape graph of the activations, and a second set for the casts that run inside the
`fp8_gemm_4bit` op (dispatcher state differs there). On an H200 with selective recompute the default limit (8)
was hit in the first steps and every cast fell back to eager (10,437 against 12,062 tokens/s without fp8,
bench/results/fastpath_h200_2026-12-06/NOTES.md)."""


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's recompile limit to at least `limit` (process-wide; `recompile_limit`, formerly
    `cache_size_limit`)."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)
            return


def cast_tensorwise(x: torch.Tensor, float8_dtype: torch.dtype,
                    row_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's tensorwise dynamic cast (hp_tensor_to_float8_dynamic: amax, `amax_to_scale`, `to_fp8_saturated`)
    without its tensor subclass: (float8 data in x's layout, float32 scale), data = saturate(x * scale).

    One difference, in how the amax is reduced, not in its value: per row first, then over the rows. torchao's
    `torch.max(torch.abs(x))` compiles to one reduction over the whole tensor, which measured 0.22 ms a call on an
    H100 against 0.11 ms for the cast that follows it, which moves 1.5 times the bytes (bench/results/
    fastpath_h100_2026-12-06c/call1); a row reduction spreads over the GPU. A maximum is exact in any order.
    `row_amax`: the row maxima of |x| already known (ROW_AMAX), so x is not read for them."""
    from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

    if row_amax is not None:
        amax = row_amax.max()
    else:
        magnitude = torch.abs(x)
        amax = torch.amax(magnitude.reshape(-1, x.shape[-1]), dim=-1).max() if x.dim() > 1 else magnitude.max()
    scale = amax_to_scale(amax, float8_dtype)
    return to_fp8_saturated(x.to(torch.float32) * scale, float8_dtype), scale


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
              use_fast_accum: bool, emulate: bool) -> torch.Tensor:
    """(a / a_scale) @ (b / b_scale) for float8 `a` (row-major) and `b` (column-major) as torchao's float8 `mm`
    runs it (float8_ops.float8_mm, addmm_float8_unwrapped): torch._scaled_mm with the inverse scales, or with
    `emulate` the same float32 matmul torchao emulates."""
    if emulate:
        return torch.mm(a.float() / a_scale, b.float() / b_scale).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(), out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


class _Cast:
    """One operand's float8 cast (torchao's hp_tensor_to_float8_dynamic with fixed arguments), compiled when
    asked; the first failing compiled call switches it to the eager cast for good (`fallback` says why)."""

    def __init__(self, cast: Callable[[torch.Tensor], Any], compile_: bool):
        self.eager = cast
        if compile_:
            raise_recompile_limit()
        self.fn = torch.compile(cast, fullgraph=True) if compile_ else cast
        self.fallback: str | None = None

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, tensor: torch.Tensor, **known: Any) -> Any:
        """The cast of `tensor`; `known`: cast_tensorwise's row_amax, where the direct path knows it."""
        if not self.compiled:
            return self.eager(tensor, **known)
        try:
            return self.fn(tensor, **known)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - dynamo/inductor failures have many types; eager is exact
            self.fallback = f"{type(err).__name__}: {err}"[:400]
            warnings.warn(f"performance.fp8_base: compiling a float8 cast failed ({self.fallback}); casting "
                          "eagerly instead (slower, more temporary memory)", RuntimeWarning, stacklevel=2)
            self.fn = self.eager
            return self.eager(tensor, **known)


class _SharedCast(NamedTuple):
    """A forward input's float8 cast and what it was cast from (Fp8BaseGemm.shared_input)."""

    owner: weakref.ref
    """The tensor the GEMM's input is (or is a view of)."""
    key: tuple
    """The owner's version counter, and the input's data_ptr, shape, strides and dtype."""
    cast: tuple[torch.Tensor, torch.Tensor]
    """(float8 data, scale)."""


@dataclasses.dataclass
class Fp8BaseGemm:
    """The float8 GEMMs of a frozen 4-bit weight for one torchao recipe: `forward` and `grad_input`, the two
    GEMMs torchao's matmul_with_hp_or_float8_args runs for `output` and `grad_input`, with its casts."""

    config: Any
    """torchao's Float8LinearConfig."""
    casts: dict[str, _Cast]
    """`input`, `weight` (W^T for the output GEMM), `grad_output`, `weight_for_grad_input`."""
    cache_weights: bool = False
    """`performance.fp8_weight_cache`: keep each weight's float8 cast (`_weight8`) instead of dequantizing and
    casting it again at every GEMM. The frozen weight's cast is the same every time, so the results are the
    same bits; it costs 1 byte per base parameter of GPU memory for the run (the NF4 weight stays too)."""
    cached: dict[tuple[int, str, torch.dtype], Any] = dataclasses.field(default_factory=dict)
    """With cache_weights: (weight's data_ptr, role, compute dtype) -> the float8 weight of that GEMM. Tensorwise
    (`direct`) keeps two per weight, (data, scale) each: W row-major for the output GEMM (its W^T column-major) and
    W^T row-major for the input gradient's (its W column-major): torch._scaled_mm takes a float8 mat2 only
    column-major, and transposing the copy at every backward GEMM cost 48 ms of a 1.4 s step on an H100. Rowwise
    keeps torchao's W^T per role."""
    shared_input: _SharedCast | None = dataclasses.field(default=None, repr=False, compare=False)
    """Direct: the last forward input's float8 cast, reused by the next GEMM that reads the same tensor (q/k/v_proj
    read one normed hidden state, gate/up_proj another). Its weak reference's callback drops it when that tensor
    dies, so the float8 copy (1 byte per element) lives no longer than the input it was cast from."""
    direct: bool = False
    """Tensorwise without torchao's tensor subclass: `cast_tensorwise` and `scaled_mm` (the same math and bits as
    torchao's Float8TrainingTensor path; tests compare them), so no subclass dispatch per GEMM and no layout fix-up
    copies. The rowwise recipe goes through torchao's subclass."""

    @classmethod
    def create(cls, recipe: str = RECIPE, emulate: bool = False, compile_casts: bool = False,
               cache_weights: bool = False, direct: bool = True) -> Fp8BaseGemm:
        """direct=False keeps tensorwise on torchao's subclass too (bench/fp8_gemm_micro.py compares them)."""
        import functools

        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig, ScaledMMConfig

        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
        # As Float8Linear builds it: one ScaledMMConfig per GEMM (output, grad_input, grad_weight).
        mm_config = LinearMMConfig(*(ScaledMMConfig(emulate, gemm.use_fast_accum, False, config.pad_inner_dim)
                                     for gemm in (config.gemm_config_output, config.gemm_config_grad_input,
                                                  config.gemm_config_grad_weight)))

        roles = (config.cast_config_input, config.cast_config_weight, config.cast_config_grad_output,
                 config.cast_config_weight_for_grad_input)
        if (direct and all(c.scaling_granularity.name == "TENSORWISE" for c in roles)
                and config.cast_config_weight == config.cast_config_weight_for_grad_input):
            direct = {"input": config.cast_config_input, "weight": config.cast_config_weight,
                      "grad_output": config.cast_config_grad_output,
                      "weight_for_grad_input": config.cast_config_weight_for_grad_input}
            compiled: dict[torch.dtype, _Cast] = {}  # one compiled function per float8 dtype, shared by the roles
            for role, cast_config in direct.items():
                dtype = cast_config.target_dtype
                if dtype not in compiled:
                    compiled[dtype] = _Cast(functools.partial(cast_tensorwise, float8_dtype=dtype), compile_casts)
                direct[role] = compiled[dtype]
            return cls(config=config, casts=direct, cache_weights=cache_weights, direct=True)

        def cast(cast_config: Any, role: Any, axis: int) -> _Cast:
            fn = functools.partial(
                hp_tensor_to_float8_dynamic, float8_dtype=cast_config.target_dtype, linear_mm_config=mm_config,
                gemm_input_role=role, scaling_granularity=cast_config.scaling_granularity,
                axiswise_dim=get_maybe_axiswise_dim(axis, cast_config.scaling_granularity),
                round_scales_to_power_of_2=config.round_scales_to_power_of_2)
            return _Cast(fn, compile_casts)

        # The axes are matmul_with_hp_or_float8_args's: x along -1, W^T along 0 for the output GEMM; dy along
        # -1 and W^T along -1 for the input-gradient GEMM.
        casts = {"input": cast(config.cast_config_input, GemmInputRole.INPUT, -1),
                 "weight": cast(config.cast_config_weight, GemmInputRole.WEIGHT, 0),
                 "grad_output": cast(config.cast_config_grad_output, GemmInputRole.GRAD_OUTPUT, -1)}
        same = (config.cast_config_weight_for_grad_input == config.cast_config_weight
                and get_maybe_axiswise_dim(-1, config.cast_config_weight.scaling_granularity) is None)
        casts["weight_for_grad_input"] = casts["weight"] if same else cast(
            config.cast_config_weight_for_grad_input, GemmInputRole.WEIGHT, -1)
        return cls(config=config, casts=casts, cache_weights=cache_weights)

    @property
    def emulate(self) -> bool:
        return bool(self.config.emulate)

    def _weight(self, weight: Any, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnb_f

        return bnb_f.dequantize_4bit(weight, quant_state).to(dtype)  # [out, in], as bitsandbytes' matmul uses it

    def _weight8(self, role: str, weight: Any, quant_state: Any, dtype: torch.dtype) -> Any:
        """The float8 weight of the GEMM whose weight cast is `role`: dequantized and cast now, or, with
        cache_weights, the one kept from the first call for this weight and role. Direct: (data, scale) with data
        W [out, in] row-major for `weight`, W^T [in, out] row-major for `weight_for_grad_input`. Rowwise: torchao's
        float8 W^T [in, out]."""
        key = (weight.data_ptr(), role, dtype)
        if self.cache_weights and key in self.cached:
            return self.cached[key]
        if not self.direct:
            w8 = self.casts[role](self._weight(weight, quant_state, dtype).t())
        elif role == "weight":
            w8 = self.casts[role](self._weight(weight, quant_state, dtype))
        else:  # tensorwise casts both roles the same way (one scale): the output GEMM's cast, transposed
            data, scale = self._weight8("weight", weight, quant_state, dtype)
            w8 = (data.t().contiguous(), scale)
        if self.cache_weights:
            self.cached[key] = w8
        return w8

    def _input8(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward input's float8 cast (direct), shared with the previous GEMM's when both read the same memory
        of the same live tensor unchanged (`shared_input`): the same cast of the same values, so the same bits."""
        owner = x2 if x2._base is None else x2._base
        key = (owner._version, x2.data_ptr(), tuple(x2.shape), x2.stride(), x2.dtype)
        shared = self.shared_input
        if shared is not None and shared.owner() is owner and shared.key == key:
            return shared.cast
        cast = self._cast_direct("input", x2)
        self.shared_input = _SharedCast(weakref.ref(owner, self._drop_shared_input), key, cast)
        return cast

    def _cast_direct(self, role: str, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cast_tensorwise of `x2` for `role` (direct), given the row maxima ROW_AMAX noted for it, if any."""
        x2 = x2.contiguous()
        known = ROW_AMAX.row_amax(x2)
        return self.casts[role](x2) if known is None else self.casts[role](x2, row_amax=known)

    def _drop_shared_input(self, ref: Any) -> None:
        if self.shared_input is not None and self.shared_input.owner is ref:
            self.shared_input = None

    def cached_bytes(self) -> int:
        """GPU memory the kept float8 weights hold (their float8 data; the scales are one float each)."""
        return sum((w8[0] if self.direct else w8._data).nbytes for w8 in self.cached.values())

    def forward(self, x2: torch.Tensor, weight: Any, quant_state: Any) -> torch.Tensor:
        """x2 [tokens, in] in the compute dtype -> x2 @ W^T [tokens, out] in the same dtype, as one op
        (`fp8_gemm_4bit`, module docstring) that selective recompute can keep and skip."""
        with _CALLS.call(self, quant_state) as key:
            return fp8_gemm_4bit(x2, weight, key)

    def _forward_impl(self, x2: torch.Tensor, weight: Any, quant_state: Any) -> torch.Tensor:
        """`forward`'s computation: dequantize, cast both operands to float8, multiply."""
        with torch.autocast(x2.device.type, enabled=False):
            if self.direct:
                w8, w_scale = self._weight8("weight", weight, quant_state, x2.dtype)  # W [out, in] row-major
                x8, x_scale = self._input8(x2)
                return scaled_mm(x8, x_scale, w8.t(), w_scale, x2.dtype,
                                 self.config.gemm_config_output.use_fast_accum, self.emulate)
            w8 = self._weight8("weight", weight, quant_state, x2.dtype)  # [in, out], column-major: _scaled_mm's mat2
            x8 = self.casts["input"](x2)
            return torch.mm(x8, w8)

    def grad_input(self, grad: torch.Tensor, weight: Any, quant_state: Any) -> torch.Tensor:
        """grad [tokens, out] -> grad @ W [tokens, in] in grad's dtype."""
        g2 = grad.reshape(-1, grad.shape[-1])
        with torch.autocast(g2.device.type, enabled=False):
            if self.direct:
                w8, w_scale = self._weight8("weight_for_grad_input", weight, quant_state, g2.dtype)  # W^T row-major
                g8, g_scale = self._cast_direct("grad_output", g2)
                return scaled_mm(g8, g_scale, w8.t(), w_scale, g2.dtype,
                                 self.config.gemm_config_grad_input.use_fast_accum, self.emulate)
            w8 = self._weight8("weight_for_grad_input", weight, quant_state, g2.dtype)
            g8 = self.casts["grad_output"](g2)
            return torch.mm(g8, w8.t())

    def fallbacks(self) -> list[str]:
        """Why casts that were to be compiled run eagerly (empty when none fell back)."""
        return sorted({f"{name}: {c.fallback}" for name, c in self.casts.items() if c.fallback})


_CALLS = OpCalls("qlora_doctor::fp8_gemm_4bit", "Fp8BaseGemm.forward")
"""The (Fp8BaseGemm, quant_state) of each `fp8_gemm_4bit` call in progress, by its key."""


@torch.library.custom_op("qlora_doctor::fp8_gemm_4bit", mutates_args=())
def fp8_gemm_4bit(x2: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    """x2 @ W^T in float8 for the 4-bit `weight` (Fp8BaseGemm.forward); `key`: its entry in `_CALLS`. One op, so
    that the selective policy (trainer/selective.py GEMM_OPS) finds it by the weight it reads."""
    gemm, quant_state = _CALLS[key]
    return gemm._forward_impl(x2, weight, quant_state)


@fp8_gemm_4bit.register_fake
def _fp8_gemm_4bit_fake(x2: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    _, quant_state = _CALLS[key]
    return x2.new_empty((x2.shape[0], quant_state.shape[0]))


class Fp8BaseMatmul(torch.autograd.Function):
    """x2 @ W^T for a frozen 4-bit weight through `Fp8BaseGemm`; a gradient for x2 only."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight: Any, quant_state: Any, gemm: Fp8BaseGemm) -> torch.Tensor:
        ctx.weight, ctx.quant_state, ctx.gemm = weight, quant_state, gemm
        return gemm.forward(x2, weight, quant_state)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_x = ctx.gemm.grad_input(grad_out, ctx.weight, ctx.quant_state) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _fp8_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward with the GEMM in float8 (same dtypes in and out, same bias handling)."""
    fix = getattr(_bnb_modules(), "fix_4bit_weight_quant_state_from_module", None)
    if fix is not None:
        fix(self)
    if not getattr(self, "compute_type_is_set", True):
        self.set_compute_type(x)
        self.compute_type_is_set = True
    input_dtype = x.dtype
    compute_dtype = self.compute_dtype or x.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    out = Fp8BaseMatmul.apply(x2, self.weight, self.weight.quant_state, getattr(self, BASE_GEMM_ATTRIBUTE))
    if self.bias is not None:
        out = out + self.bias.to(compute_dtype)
    return out.view(*x.shape[:-1], out.shape[-1]).to(input_dtype)


def _bnb_modules() -> Any:
    import bitsandbytes.nn.modules as modules

    return modules


def unsupported_reason(module: Any) -> str | None:
    """None when the float8 GEMMs can replace this 4-bit layer's; else why not."""
    weight = getattr(module, "weight", None)
    if getattr(weight, "quant_state", None) is None:
        return "the 4-bit weight carries no quant_state (sharded by FSDP?)"
    if module.in_features % GEMM_ALIGNMENT or module.out_features % GEMM_ALIGNMENT:
        return (f"{module.in_features} x {module.out_features} is not a multiple of {GEMM_ALIGNMENT} both ways "
                "(torch._scaled_mm)")
    return None


def apply_fp8_base(model: Any, *, emulate: bool | None = None, recipe: str = RECIPE,
                   compile_casts: bool | None = None, cache_weights: bool = False) -> tuple[int, list[str]]:
    """Route the GEMMs of every bitsandbytes 4-bit linear layer of `model` (LoRA's base layers and untargeted
    ones alike) through float8. Call it after peft wrapped the model; fused LoRA picks it up at call time.
    Liger's SwiGLU MLPs whose projections all take the direct path then run trainer/fp8_swiglu.py's SwiGLU,
    which hands their largest casts the maxima they need.

    emulate: None decides by where each weight is: an FP8-capable GPU runs torch._scaled_mm, the CPU emulates
    (float32 matmuls of the float8 values: tests), a GPU below compute capability 8.9 is refused.
    compile_casts: None compiles the casts on CUDA only. cache_weights: keep each weight's float8 cast
    (`Fp8BaseGemm.cache_weights`). Returns (layers switched, `name: reason` for the
    distinct reasons others were not)."""
    problem = torchao_problem()
    if problem is not None:
        raise CheckFailed(f"performance.fp8_base: {problem}")
    linear4bit = _bnb_modules().Linear4bit
    gemms: dict[tuple[str, bool], Fp8BaseGemm] = {}
    switched, skipped = 0, {}
    for name, module in model.named_modules():
        if not isinstance(module, linear4bit):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            skipped.setdefault(reason, name)
            continue
        device = module.weight.device
        hardware = device.type == "cuda" and fp8_capable(torch.cuda.get_device_capability(device))
        if device.type == "cuda" and not hardware and not emulate:
            major, minor = torch.cuda.get_device_capability(device)
            raise CheckFailed(f"performance.fp8_base: {torch.cuda.get_device_name(device)} has compute capability "
                              f"{major}.{minor}, without FP8 tensor cores (needs >= 8.9); set "
                              "`performance.fp8_base: false`")
        emulated = (not hardware) if emulate is None else emulate
        compiled = device.type == "cuda" if compile_casts is None else compile_casts
        key = (str(device), emulated)
        if key not in gemms:
            gemms[key] = Fp8BaseGemm.create(recipe, emulate=emulated, compile_casts=compiled,
                                            cache_weights=cache_weights)
        setattr(module, BASE_GEMM_ATTRIBUTE, gemms[key])
        replace_forward(module, _fp8_forward)
        switched += 1
    route_swiglu_mlps(model, takes_row_amax)
    return switched, [f"{name}: {reason}" for reason, name in skipped.items()]


def takes_row_amax(module: Any) -> bool:
    """Whether `module` (a projection: a LoRA layer or a bare 4-bit one) runs float8 GEMMs whose casts read
    ROW_AMAX's notes (the direct tensorwise path)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return is_fp8(base) and getattr(base, BASE_GEMM_ATTRIBUTE).direct


def is_fp8(module: Any) -> bool:
    """Whether `module` (a bitsandbytes 4-bit layer) runs its GEMMs in float8 (apply_fp8_base switched it)."""
    return (isinstance(getattr(module, BASE_GEMM_ATTRIBUTE, None), Fp8BaseGemm)
            and runs_forward(module, _fp8_forward))


def fp8_gemms(model: Any) -> list[Fp8BaseGemm]:
    """The distinct Fp8BaseGemm objects of a model (one per device), e.g. to read `fallbacks()`."""
    found: dict[int, Fp8BaseGemm] = {}
    for module in model.modules():
        gemm = getattr(module, BASE_GEMM_ATTRIBUTE, None)
        if isinstance(gemm, Fp8BaseGemm):
            found[id(gemm)] = gemm
    return list(found.values())

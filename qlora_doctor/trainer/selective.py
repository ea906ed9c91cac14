"""Selective recompute (`performance.recompute: selective`): a checkpointed decoder layer keeps the outputs
of the ops that are expensive to recompute and cheap to keep, and recomputes the rest in the backward pass.

Mechanism: torch's selective activation checkpointing (SAC), `torch.utils.checkpoint.checkpoint(...,
use_reentrant=False, context_fn=...)` with `create_selective_checkpoint_contexts(policy)`. In the forward the
policy sees every op of the layer (aten ops and bitsandbytes' custom ops, also those inside an
autograd.Function such as fused LoRA's) with its arguments and output; an op it marks MUST_SAVE keeps its
output, and when the backward replays the layer that op returns the kept output instead of running. The
replay still runs everything else, so an op is skipped only if its own output is kept: keeping q is not
enough to skip q's GEMM, the GEMM's output must be kept (issue #20, item 1).

The policy, per op (the layer position comes from the weight an op reads, not from the op's place in the
sequence, so it holds for fused and unfused LoRA alike):

  * attention (`ATTENTION_OPS`, the SDPA kernels and flash-attn's): keep, i.e. the attention output and its
    log-sum-exp (plus the kernel's RNG seed/offset, a few bytes), so the replay skips the attention forward;
    the attention node built during the replay saves q, k, v (recomputed from the kept projections by RoPE)
    and these kept outputs. Not with attention dropout > 0: a skipped kernel would not draw its random
    numbers, and every later dropout mask of the replay would differ from the forward's.
  * the frozen base GEMM of a projection (`bitsandbytes::gemm_4bit` for a 4-bit weight,
    `qlora_doctor::fp8_gemm_4bit` for one with `fp8_base`, `aten::mm`/`addmm` for a 16-bit one) that reads
    the weight of one of `SELECTIVE_KEPT_PROJECTIONS`: q/k/v/o_proj and down_proj. keep. Every GEMM
    reading the hidden state costs 2 x hidden FLOPs per output element, so per byte kept q, k, v, o, gate
    and up are alike; down_proj reads the intermediate width and saves
    intermediate/hidden (3.5x on Llama-3-8B) times as much per byte. gate and up are the largest outputs
    (intermediate width each) and are left to recompute: at 8 x 2048 tokens of the 8B shape the kept
    outputs are (4096 + 2 x 1024 + 4096 + 4096 + 4096) x 2 bytes per token = 0.44 GiB per layer, and the replay
    runs 2 of the layer's 7 base GEMMs (54% of its GEMM FLOPs) instead of all of them. The issue's "keep the
    post-attention residual" becomes "keep o_proj's output": the same bytes, and the replay skips o_proj too.
    The LoRA matmuls (rank r) are recomputed: their weights change every step but their cost is small.
  * fused LoRA adds its low-rank term into the GEMM's output in place (`out.addmm_`) elsewhere. Inside a
    selective layer (forward and replay alike, `fused_lora.selective_layer`):
    - v/o/down_proj (SELECTIVE_WHOLE_LORA_PROJECTIONS) run their whole LoRA forward as one op,
      `qlora_doctor::lora_gemm_4bit` (base GEMM, A x, the add into the GEMM's fresh output), which is kept:
      the replay runs none of it. Their outputs are only read later in the layer; the forward checks that
      when it ends and raises, naming the projection, if an op wrote into one.
    - q/k_proj keep only the base GEMM output and add the LoRA term out of place, so the kept tensor is
      never written to: Liger's RoPE rotates q and k in place (liger_kernel/ops/rope.py, rope_forward).
    - gate/up_proj are not kept and add in place, as outside.
    (An in-place op on a kept tensor is still kept, for other code that mutates one; that needs
    `SelectiveCheckpointContext.op_output`, torch >= 2.13, and is checked where it is there.)
  * everything else (norms, RoPE, SwiGLU, dropout, LoRA's matmuls, the LoRA add, gate/up): recompute.

Torch >= 2.4 has the mechanism; torch 2.13 added the op outputs the policy uses to count the bytes it keeps
(tests, benches). Without them the policy decides the same and counts nothing.

The result is exact: a kept output is the tensor the forward computed, and the replay sees the same RNG
state as the forward (non-reentrant checkpointing restores it; no kept op draws random numbers). The
memory planner mirrors the policy (qlora_doctor/memory/activations.py, `selective_kept_per_token`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

from qlora_doctor.core.errors import CheckFailed
from qlora_doctor.recipe.levers import SELECTIVE_KEPT_PROJECTIONS, SELECTIVE_WHOLE_LORA_PROJECTIONS

ATTENTION_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward",
})
"""Attention kernels whose outputs (output, log-sum-exp, RNG seed/offset) are kept (`OpOverload.name()`)."""

GEMM_OPS = frozenset({"bitsandbytes::gemm_4bit", "qlora_doctor::fp8_gemm_4bit", "qlora_doctor::lora_gemm_4bit",
                      "aten::mm", "aten::addmm"})
"""Ops that compute a projection's base GEMM: bitsandbytes' 4-bit matmul (0.50: one op, dequantization
inside), fused LoRA's whole forward of a projection (trainer/fused_lora.py `lora_gemm_4bit`: the base GEMM
with the LoRA term added, and A x), `performance.fp8_base`'s float8 matmul of a 4-bit weight (trainer/fp8.py: one custom op, the
dequantization and float8 casts inside, its `weight` argument the 4-bit weight), or a 16-bit nn.Linear's
matmul; kept when they read a kept projection's weight."""


def sac_available() -> str | None:
    """None when this torch has selective activation checkpointing; else why not."""
    try:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts  # noqa: F401
    except ImportError:
        return "this torch has no selective activation checkpointing (torch.utils.checkpoint, torch >= 2.4)"
    return None


def _sees_outputs() -> bool:
    """Whether the policy is handed each op's output (torch >= 2.13)."""
    from torch.utils.checkpoint import SelectiveCheckpointContext

    return "op_output" in inspect.signature(SelectiveCheckpointContext.__init__).parameters


def kept_weight_pointers(layer: Any) -> frozenset[int]:
    """data_ptr() of the base weights of `layer`'s kept projections (SELECTIVE_KEPT_PROJECTIONS). A GEMM reading
    one of them (its argument is the weight or a view of it) is a kept projection's base GEMM."""
    return frozenset(projection_weights(layer, SELECTIVE_KEPT_PROJECTIONS))


def projection_weights(layer: Any, projections: frozenset[str]) -> dict[int, str]:
    """data_ptr() of the base weight of each of `layer`'s projections named in `projections` -> that name, peft's
    LoRA wrappers looked through."""
    pointers = {}
    for name, module in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short not in projections:
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = getattr(base, "weight", None)
        if weight is not None:
            pointers[weight.data_ptr()] = short
    return pointers


class SelectivePolicy:
    """The per-op policy of one checkpointed call of one layer (module docstring). `kept_bytes` counts what
    it kept, by kind, for tests and benches."""

    def __init__(self, weights: frozenset[int]):
        self.weights = weights
        self.kept_storages: set[int] = set()
        self.kept_bytes: dict[str, int] = {"attention": 0, "projections": 0}

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import CheckpointPolicy

        name = op.name()
        if name in ATTENTION_OPS and not _attention_dropout(op, args, kwargs):
            kind = "attention"
        elif name in GEMM_OPS and any(_is_tensor(a) and a.data_ptr() in self.weights for a in args):
            kind = "projections"
        elif self.kept_storages and self._mutates_kept(op, args, kwargs):
            kind = None  # already counted: it writes into a kept tensor
        else:
            return CheckpointPolicy.PREFER_RECOMPUTE
        for out in _tensors(getattr(ctx, "op_output", None)):
            storage = out.untyped_storage()
            if kind and storage.data_ptr() not in self.kept_storages:
                self.kept_bytes[kind] += storage.nbytes()
            self.kept_storages.add(storage.data_ptr())
        return CheckpointPolicy.MUST_SAVE

    def _mutates_kept(self, op: Any, args: tuple, kwargs: dict) -> bool:
        for index, argument in enumerate(op._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            if _is_tensor(value) and value.untyped_storage().data_ptr() in self.kept_storages:
                return True
        return False


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _tensors(value: Any) -> list[Any]:
    if _is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if _is_tensor(v)]
    return []


def _attention_dropout(op: Any, args: tuple, kwargs: dict) -> float:
    """The op's dropout probability (0 when it has none)."""
    for index, argument in enumerate(op._schema.arguments):
        if argument.name in ("dropout_p", "p_dropout"):
            value = args[index] if index < len(args) else kwargs.get(argument.name, 0.0)
            return float(value or 0.0)
    return 0.0


def selective_context_fn(layer: Any, record: list[SelectivePolicy] | None = None, offloader: Any = None,
                         keep_on_device: bool = False) -> Any:
    """The `context_fn` for one layer's checkpoint: a fresh policy per call (the kept weights are read at
    call time, so loading, peft wrapping and moving the model afterwards are all seen). `record`: a list each
    call's policy is appended to (tests and benches read what was kept). `offloader`: a trainer/offload.py
    CheckpointOffloader that keeps the kept outputs in host memory between the forward and the replay (with
    `keep_on_device`, this layer's stay on the GPU and its replay only prefetches the previous layer's)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from qlora_doctor.trainer.fused_lora import selective_layer

    mutation = ({"allow_cache_entry_mutation": True} if _sees_outputs() and "allow_cache_entry_mutation" in
                inspect.signature(create_selective_checkpoint_contexts).parameters else {})

    def context_fn() -> tuple[Any, Any]:
        policy = SelectivePolicy(kept_weight_pointers(layer))
        if record is not None:
            record.append(policy)
        whole = projection_weights(layer, SELECTIVE_WHOLE_LORA_PROJECTIONS)
        forward, replay = create_selective_checkpoint_contexts(policy, **mutation)
        # The forward checks that no whole LoRA output it keeps was written to before the layer's forward ended.
        lora_forward = selective_layer(policy.weights, whole, check=True)
        lora_replay = selective_layer(policy.weights, whole)
        if offloader is None:
            return _Both(lora_forward, forward), _Both(lora_replay, replay)
        # Outermost, so that its copies run outside the dispatch modes: the forward's offload after the caching
        # mode exited, the replay's restore before the cached mode is entered.
        offload, restore = offloader.cache_contexts(forward.storage, keep_on_device)
        return _Both(offload, lora_forward, forward), _Both(restore, lora_replay, replay)

    return context_fn


class _Both(contextlib.ExitStack):
    """Two context managers entered as one, the first outermost (checkpoint takes one per phase)."""

    def __init__(self, *managers: Any) -> None:
        super().__init__()
        self._managers = managers

    def __enter__(self) -> "_Both":
        super().__enter__()
        for manager in self._managers:
            self.enter_context(manager)
        return self


def make_selective(layer: Any, record: list[SelectivePolicy] | None = None, offloader: Any = None,
                   keep_on_device: bool = False) -> None:
    """Checkpoint `layer` (a transformers GradientCheckpointingLayer, checkpointing already enabled) with the
    selective policy instead of recomputing it whole; with `offloader`, its kept outputs wait in host memory
    (unless `keep_on_device`)."""
    from torch.utils.checkpoint import checkpoint

    problem = sac_available()
    if problem is not None:
        raise CheckFailed(f"performance.recompute: selective: {problem}; set `performance.recompute: full` "
                          "or upgrade torch")
    layer._gradient_checkpointing_func = functools.partial(
        checkpoint, use_reentrant=False, context_fn=selective_context_fn(layer, record, offloader, keep_on_device))

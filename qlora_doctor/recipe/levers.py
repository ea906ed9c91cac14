"""The speed levers of a recipe's `performance:` section, decided for one machine: every `auto` turned
into on or off with a reason (applied to a model by qlora_doctor/trainer/speed.py).

What each lever does and why it is the default (measured by bench/train_throughput.py):
  upcast_unquantized: false  peft's prepare casts embeddings, norms and lm_head to float32; with bf16
                             autocast every step then casts them back (the 1 GB lm_head included) and
                             the logits come out in float32. Keeping them in the compute dtype saves
                             that memory and time; the LoRA weights stay float32 either way.
  checkpoint_layers          recompute only some decoder layers (the first N): memory for speed.
  recompute: auto            selective: a checkpointed layer keeps its q/k/v/o/down GEMM outputs and the
  offload_checkpoints: auto  attention output, so its backward replay runs only gate/up of the base GEMMs
                             (qlora_doctor/trainer/selective.py). Offloaded: the checkpointed layers' inputs and
                             those kept outputs wait in pinned host memory between forward and backward, copied
                             on side CUDA streams, the previous layer's prefetched during a layer's backward
                             (qlora_doctor/trainer/offload.py, after unsloth's offloaded checkpointing). auto
                             turns both on with a GPU where the host can pin what they keep (memory/plan.py
                             resolve_offload): on an H200, 8B at 8 x 2048, 11,948 tokens/s at 10.62 GiB reserved
                             against 11,013 at 9.87 GiB offloaded with full recompute and 11,962 at 28.12 GiB
                             with the kept outputs on the GPU (bench/results/fastpath_h200_2026-12-06/NOTES.md).
                             Elsewhere (no GPU, host memory unknown or too small): full recompute, no offload.
  liger_kernel: auto         fused linear cross-entropy (no [tokens, 128k] float32 logits), RMSNorm,
                             SwiGLU, RoPE. Triton kernels: CUDA only.
  fused_lora: auto           qlora_doctor/trainer/fused_lora.py: one autograd node per adapted layer,
                             dropout mask regenerated instead of stored.
  padding_free: auto         DataCollatorWithFlattening where attention has variable-length kernels.
  group_by_length: true      similar lengths in one batch: less padding for every attention kernel.
  torch_compile: false       compiles poorly around bitsandbytes' 4-bit parameters; opt in.
  fp8_base: false            the 4-bit base layers' forward and input-gradient GEMMs in float8 through torchao
                             (qlora_doctor/trainer/fp8.py): FP8 tensor cores (compute capability >= 8.9) and
                             torchao needed. Changes numerics: opt in.
  fp8_weight_cache: false    with fp8_base: each weight's float8 copy kept (2 bytes per base parameter of GPU
                             memory: two layouts) instead of dequantized and cast at every GEMM; the same bits.
  cudnn_attention: auto      off where a knowledge-base rule with `workaround = "cudnn_attention_off"`
                             fires for this torch and GPU (the 70B FSDP run's CUDNN_STATUS_INTERNAL_ERROR at
                             24k tokens); SDPA then uses the flash / memory-efficient kernels. A process-wide
                             torch setting, set on every rank. Where every firing rule has a
                             `workaround_scope` (torch 2.11-2.14.0 on Hopper: NaN grad_q only for masked calls
                             with key length L % 128 == 64), cuDNN stays on and only those calls go to the
                             other kernels (trainer/speed.py gate_cudnn_attention).
The optimizer stays the recipe's `training.optim`: for LoRA's few million parameters its step is a
fraction of a percent of the step time, so a fused AdamW gains nothing measurable.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_doctor.core.hazards import AttentionHazard, AttentionScope, scoped

if TYPE_CHECKING:
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import PerformanceSection, Recipe


SELECTIVE_KEPT_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"})
"""`recompute: selective` (trainer/selective.py): the projections whose frozen base GEMM output a selectively
checkpointed layer keeps, so that the backward's replay of the layer skips those GEMMs; gate_proj and up_proj
(the widest outputs) are recomputed. Why these: trainer/selective.py's docstring. The memory planner counts
the same (memory/activations.py, selective_kept_per_token)."""

SELECTIVE_WHOLE_LORA_PROJECTIONS = frozenset({"v_proj", "o_proj", "down_proj"})
"""Of SELECTIVE_KEPT_PROJECTIONS, those whose whole fused LoRA output (base GEMM plus the LoRA term, and A x) a
selective layer keeps, so the replay skips their LoRA matmuls and add too (trainer/fused_lora.py lora_gemm_4bit):
the ones no later op of the layer writes into. Not q_proj/k_proj: Liger's RoPE rotates q and k in place
(liger_kernel/ops/rope.py rope_forward: `q.transpose(1, 2).contiguous()` is the projection's own storage). The
planner counts A x (rank wide) for these (memory/activations.py, selective_kept_per_token)."""

FP8_MIN_CAPABILITY = (8, 9)
"""`fp8_base`: torch._scaled_mm runs on compute capability 8.9 (Ada) and >= 9.0 (Hopper and newer)."""
TORCHAO_REQUIREMENT = "torchao>=0.18,<0.19"
"""What `pip install` gets for fp8_base (pyproject's `fp8` extra; the tested torchao)."""

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention implementations with variable-length kernels (padding-free batches cost no more attention)."""


@dataclass(frozen=True)
class Lever:
    """One lever as decided for a run."""

    name: str
    """The recipe key under `performance:`."""
    on: bool
    reason: str
    """Why it is on or off, e.g. `liger-kernel is not installed (pip install liger-kernel)`."""


@dataclass(frozen=True)
class SpeedPlan:
    """Every `performance:` lever decided for one run."""

    upcast_unquantized: Lever
    checkpointing: Lever
    checkpoint_layers: str | int | float
    liger_kernel: Lever
    fused_lora: Lever
    padding_free: Lever
    group_by_length: Lever
    torch_compile: Lever
    cudnn_attention: Lever
    recompute: Lever = Lever("recompute", False, "full: checkpointed layers recompute everything")
    """`selective` in effect (on): checkpointed layers keep trainer/selective.py's op outputs."""
    selective_layers: str | int | float = "all"
    """With recompute selective: which of the checkpointed layers keep outputs (the first N, a fraction, all)."""
    fp8_base: Lever = Lever("fp8_base", False, "off (default)")
    """The 4-bit base layers' GEMMs in float8 (trainer/fp8.py)."""
    fp8_weight_cache: Lever = Lever("fp8_weight_cache", False, "off (default)")
    """With fp8_base on: each weight's float8 cast kept for the run (Fp8BaseGemm.cache_weights)."""
    offload_checkpoints: Lever = Lever("offload_checkpoints", False, "off")
    """The checkpointed layers' saved inputs in host memory (trainer/offload.py)."""
    cudnn_hazards: tuple[AttentionHazard, ...] | None = None
    """The knowledge-base rules the cuDNN decision was made on (None: not looked up)."""
    cudnn_gate: tuple[AttentionScope, ...] = ()
    """With cuDNN attention on (auto, every firing rule scoped): the calls sent to the other kernels
    (trainer/speed.py gate_cudnn_attention); () for no gate."""

    def levers(self) -> list[Lever]:
        return [self.upcast_unquantized, self.checkpointing, self.recompute, self.offload_checkpoints,
                self.liger_kernel, self.fused_lora, self.padding_free, self.group_by_length, self.torch_compile,
                self.cudnn_attention, self.fp8_base, self.fp8_weight_cache]

    def to_json(self) -> dict[str, Any]:
        return {lever.name: {"on": lever.on, "reason": lever.reason} for lever in self.levers()}


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def fp8_capable(capability: str | tuple[int, int] | None) -> bool:
    """Whether a compute capability (`"8.9"` or `(8, 9)`) has FP8 tensor cores (FP8_MIN_CAPABILITY)."""
    if capability is None:
        return False
    if isinstance(capability, str):
        major, _, minor = capability.partition(".")
        capability = (int(major), int(minor or 0))
    return tuple(capability) >= FP8_MIN_CAPABILITY


def decide_fp8_base(setting: bool, precision: Precision, described: bool | None = None) -> Lever:
    """fp8_base: true|false for the machine `precision` was resolved for. `described`: whether torchao is in a
    described environment (`check -r`); None: look at this machine's packages. The combinations the recipe
    cannot run (no 4-bit base, torch_compile, FSDP) are refused when it is validated."""
    if not setting:
        return Lever("fp8_base", False, "off (default)")
    cc = precision.compute_capability
    if precision.device != "cuda":
        problem = ("float8 GEMMs need an NVIDIA GPU with FP8 tensor cores (compute capability >= 8.9); training "
                   "runs on the CPU")
    elif cc is None:
        problem = "the GPU's compute capability is unknown, and float8 GEMMs need >= 8.9"
    elif not fp8_capable(cc):
        problem = f"the GPU has compute capability {cc}, without FP8 tensor cores (needs >= 8.9: Ada, Hopper or newer)"
    elif not (torchao_installed() if described is None else described):
        problem = (f"torchao is not installed (`pip install '{TORCHAO_REQUIREMENT}'`)" if described is None else
                   f"torchao is not in the requirements judged (add {TORCHAO_REQUIREMENT} to them)")
    else:
        return Lever("fp8_base", True,
                     f"float8 e4m3 base GEMMs (torchao, tensorwise scales) on compute capability {cc}")
    return Lever("fp8_base", False, problem)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_supported_model_types() -> frozenset[str] | None:
    """Model types liger-kernel patches (None when it is not installed or its table moved)."""
    if not liger_installed():
        return None
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # noqa: BLE001 - an import error inside liger (e.g. no triton) means unavailable
        return None
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def decide_liger(setting: Any, device: str, model_type: str | None, described: bool | None = None) -> Lever:
    """liger_kernel: auto|true|false for a device and model type (None: not known yet). `described`: whether
    liger-kernel is in a described environment (`check -r`); None: look at this machine's packages."""
    if setting is False:
        return Lever("liger_kernel", False, "off in the recipe")
    problem = None
    if not (liger_installed() if described is None else described):
        problem = ("liger-kernel is not installed (`pip install liger-kernel`)" if described is None else
                   "liger-kernel is not in the requirements judged (add liger-kernel to them)")
    elif device != "cuda":
        problem = "its Triton kernels need an NVIDIA GPU; training runs on the CPU"
    elif described is not None:  # in the file: it would be installed there; its model table is not readable here
        return Lever("liger_kernel", True, "in the requirements judged, CUDA")
    else:
        supported = liger_supported_model_types()
        if supported is None:
            problem = "liger-kernel is installed but cannot be imported (is triton installed?)"
        elif model_type is not None and model_type not in supported:
            problem = f"model type {model_type!r} is not one liger-kernel patches"
    if problem is None:
        return Lever("liger_kernel", True, "installed, CUDA" + (f", supports {model_type}" if model_type else ""))
    return Lever("liger_kernel", False, problem)


def cudnn_gated(plan: SpeedPlan) -> bool:
    """cuDNN attention on with scoped rules' calls routed elsewhere (auto, every firing rule scoped)."""
    return bool(plan.cudnn_gate)


def cudnn_gate(setting: Any, device: str, hazards: tuple[AttentionHazard, ...] | None) -> tuple[AttentionScope, ...]:
    """The calls to route away from cuDNN: where `auto` keeps it on because every firing rule is scoped."""
    if setting == "auto" and device == "cuda" and scoped(hazards):
        return tuple(h.scope for h in hazards or () if h.scope)
    return ()


def decide_cudnn_attention(setting: Any, device: str, hazards: tuple[AttentionHazard, ...] | None) -> Lever:
    """cudnn_attention: auto|true|false, given the rules that fire (None: not looked up)."""
    if setting is False:
        return Lever("cudnn_attention", False, "off in the recipe")
    if device != "cuda":
        return Lever("cudnn_attention", False, "no cuDNN attention: training runs on the CPU")
    if setting is True:
        return Lever("cudnn_attention", True, "on in the recipe" + (
            f", despite the knowledge base ({'; '.join(map(str, hazards))})" if hazards else ""))
    if cudnn_gate(setting, device, hazards):
        return Lever("cudnn_attention", True, "on, except " + "; ".join(
            f"{h.scope.describe()} ({h.text.split(':', 1)[0]}), which run the flash/efficient kernels"
            for h in hazards if h.scope))
    if hazards:
        return Lever("cudnn_attention", False, "known broken for this torch and GPU: " + "; ".join(map(str, hazards)))
    return Lever("cudnn_attention", True, "torch chooses the backend" if hazards is not None
                 else "torch chooses the backend (the knowledge base was not consulted)")


def speed_plan(recipe: Recipe, precision: Precision, model_type: str | None = None,
               attn_implementation: str | None = None, cudnn_hazards: tuple[AttentionHazard, ...] | None = None,
               liger_described: bool | None = None, torchao_described: bool | None = None) -> SpeedPlan:
    """Decide the `performance:` levers of `recipe` for the machine `precision` was resolved for.
    `model_type`/`attn_implementation` come from the loaded model's config (None before loading);
    `cudnn_hazards` from cudnn_attention_hazards(machine) (None: not looked up)."""
    perf: PerformanceSection = recipe.performance
    quantized = recipe.quantization.load_in_4bit
    upcast = Lever("upcast_unquantized", perf.upcast_unquantized and quantized,
                   "recipe: float32 like peft's prepare_model_for_kbit_training" if perf.upcast_unquantized
                   else "unquantized weights stay in the compute dtype")
    ckpt_on = recipe.training.gradient_checkpointing and perf.checkpoint_layers != 0
    checkpointing = Lever("checkpoint_layers", ckpt_on,
                          f"non-reentrant, layers: {perf.checkpoint_layers}" if ckpt_on
                          else "training.gradient_checkpointing is false" if not recipe.training.gradient_checkpointing
                          else "checkpoint_layers: 0")
    if perf.fused_lora is False:
        fused = Lever("fused_lora", False, "off in the recipe")
    elif not quantized:
        fused = Lever("fused_lora", False, "the model is not 4-bit (quantization.load_in_4bit: false)")
    elif recipe.lora.use_dora or recipe.lora.bias != "none":
        fused = Lever("fused_lora", False, "DoRA and LoRA biases are not fused")
    elif recipe.distributed.strategy == "fsdp":
        # FSDP flattens each layer's parameters into shards and hands the 4-bit weight back as a plain
        # tensor without its quant_state (the first 2xH100 FSDP run failed on exactly that); peft's
        # layer restores it from the module on every call, the fused function would not.
        fused = Lever("fused_lora", False, "FSDP shards the 4-bit weights (peft's LoRA layer runs)")
    else:
        fused = Lever("fused_lora", True, "plain LoRA on 4-bit layers")
    if perf.padding_free is False:
        padding_free = Lever("padding_free", False, "off in the recipe")
    elif perf.padding_free is True:
        padding_free = Lever("padding_free", True, "on in the recipe")
    elif attn_implementation in FLASH_ATTENTION:
        padding_free = Lever("padding_free", True, f"{attn_implementation} has variable-length kernels")
    else:
        padding_free = Lever("padding_free", False, f"attention {attn_implementation or 'not known yet'} would "
                             "compute over the whole packed row; batches are grouped by length instead")
    grouped = perf.group_by_length and not padding_free.on
    group = Lever("group_by_length", grouped, "similar lengths batched together" if grouped
                  else "padding-free batches have no padding" if perf.group_by_length else "off in the recipe")
    compile_ = Lever("torch_compile", perf.torch_compile, "on in the recipe" if perf.torch_compile else "off (default)")
    return SpeedPlan(upcast_unquantized=upcast, checkpointing=checkpointing, checkpoint_layers=perf.checkpoint_layers,
                     recompute=decide_recompute(perf.recompute, ckpt_on, perf.selective_layers),
                     selective_layers=perf.selective_layers,
                     offload_checkpoints=decide_offload(perf.offload_checkpoints, precision.device, ckpt_on),
                     liger_kernel=decide_liger(perf.liger_kernel, precision.device, model_type, liger_described),
                     fused_lora=fused, padding_free=padding_free, group_by_length=group, torch_compile=compile_,
                     cudnn_attention=decide_cudnn_attention(perf.cudnn_attention, precision.device, cudnn_hazards),
                     fp8_base=(fp8 := decide_fp8_base(perf.fp8_base, precision, torchao_described)),
                     fp8_weight_cache=decide_fp8_weight_cache(perf.fp8_weight_cache, fp8),
                     cudnn_hazards=cudnn_hazards,
                     cudnn_gate=cudnn_gate(perf.cudnn_attention, precision.device, cudnn_hazards))


def decide_fp8_weight_cache(setting: bool, fp8_base: Lever) -> Lever:
    """fp8_weight_cache: on where asked and fp8_base is on (the recipe refuses it without fp8_base)."""
    if not setting:
        return Lever("fp8_weight_cache", False, "off (default)")
    if not fp8_base.on:
        return Lever("fp8_weight_cache", False, f"fp8_base is off ({fp8_base.reason})")
    return Lever("fp8_weight_cache", True, "each 4-bit weight's float8 cast kept (2 bytes per base parameter: both layouts)")


AUTO_UNRESOLVED = "auto, not decided by the memory planner (the model's config was not readable): off"
"""The reason of an `offload_checkpoints`/`recompute` lever still `auto` here: memory/plan.py resolve_offload decides
them against the host's memory, and the run plan hands the decision on in the recipe."""


def decide_recompute(setting: str, checkpointing: bool, layers: str | int | float = "all") -> Lever:
    """recompute: full|selective, given whether any layer is checkpointed. The combinations it cannot run
    (FSDP, torch_compile) are refused when the recipe is validated (recipe/schema.py). `auto` is decided by the
    memory planner before this (memory/plan.py resolve_offload); still `auto` here, it is full."""
    if setting == "auto":
        return Lever("recompute", False, "full: checkpointed layers recompute everything (" + AUTO_UNRESOLVED + ")")
    if setting != "selective":
        return Lever("recompute", False, "full: checkpointed layers recompute everything")
    if not checkpointing:
        return Lever("recompute", False, "selective, but no layer is checkpointed")
    which = "checkpointed layers" if layers in ("all", "auto") else f"checkpointed layers (selective_layers: {layers})"
    return Lever("recompute", True, f"selective: {which} keep their q/k/v/o/down GEMM and attention "
                 "outputs (trainer/selective.py)")


OFFLOAD_REASON = ("checkpointed layers' saved inputs in pinned host memory between forward and backward, copied "
                  "on side CUDA streams with the previous layer prefetched during each layer's backward "
                  "(trainer/offload.py)")


def decide_offload(setting: bool | str, device: str, checkpointing: bool) -> Lever:
    """offload_checkpoints: true|false on `device`, given whether any layer is checkpointed. The combinations
    it cannot run (no checkpointed layer, FSDP, torch_compile) are refused when the recipe is validated. `auto` is
    decided by the memory planner before this (memory/plan.py resolve_offload); still `auto` here, it is off."""
    if setting == "auto":
        return Lever("offload_checkpoints", False, AUTO_UNRESOLVED)
    if not setting:
        return Lever("offload_checkpoints", False, "off")
    if device != "cuda":
        return Lever("offload_checkpoints", False, "no GPU: nothing to offload")
    if not checkpointing:
        return Lever("offload_checkpoints", False, "no layer is checkpointed: nothing to offload")
    return Lever("offload_checkpoints", True, OFFLOAD_REASON)


def plan_for_model(recipe: Recipe, precision: Precision, model: Any,
                   cudnn_hazards: tuple[AttentionHazard, ...] | None = None) -> SpeedPlan:
    """`speed_plan` with the model type and attention implementation of a loaded model (runplan.py
    levers_for_loaded first decides an `offload_checkpoints`/`recompute` still `auto`)."""
    config = getattr(model, "config", None)
    return speed_plan(recipe, precision, getattr(config, "model_type", None),
                      getattr(config, "_attn_implementation", None), cudnn_hazards)


def checkpointed_indices(selection: str | int | float, layer_count: int) -> list[int]:
    """Which decoder layers (0-based) recompute: `all`, the first N, or the first round(f * count).
    `auto` not yet resolved for a GPU (memory.plan.resolve_checkpoint_layers) counts as `all`."""
    if selection in ("all", "auto"):
        return list(range(layer_count))
    count = selection if isinstance(selection, int) else round(selection * layer_count)
    return list(range(min(count, layer_count)))


def recipe_model_type(recipe: Recipe) -> str | None:
    """The model type from a builtin or local model's config.json (None for a hub id: not downloaded)."""
    import json
    import os

    from qlora_doctor.recipe.builtin import builtin_config, is_builtin

    name = recipe.model.name_or_path
    try:
        if is_builtin(name):
            return builtin_config(name).get("model_type")
        config = os.path.join(name, "config.json")
        if os.path.isabs(name) and os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None
    return None

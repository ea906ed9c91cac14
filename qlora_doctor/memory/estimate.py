"""Peak GPU memory of one QLoRA training step, from parameter counts and the run's settings.

The model of a step is what `qlora_doctor.trainer.model.load_for_training` builds and the transformers
Trainer runs: the base loaded in the compute dtype and quantized by bitsandbytes, prepared for training
as the recipe's `performance:` levers say (`qlora_doctor/trainer/speed.py`, decided by recipe/levers.py `speed_plan`;
`settings_from_recipe` in plan.py carries the decisions here), peft LoRA adapters (float32), and the
forward under autocast (`bf16`/`fp16` in TrainingArguments).

Two paths, lever by lever (per-token counts in activations.py):
  * the plain path (upcast_unquantized: true, checkpoint_layers: all, Liger and fused LoRA off) is peft's
    `prepare_model_for_kbit_training`: every non-4-bit parameter upcast to float32, so the embeddings'
    output and with it the residual stream between layers is float32 (autocast only changes what matmuls
    and attention produce), full float32 logits through transformers' loss, every layer checkpointed;
  * upcast_unquantized: false keeps embeddings, norms and lm_head in the compute dtype, so the residual
    stream is in the compute dtype and lm_head needs no autocast copy;
  * checkpoint_layers: the first N layers keep only their input, the others all their activations;
  * recompute: selective: a checkpointed layer also keeps its q/k/v/o/down GEMM outputs and the attention
    output (activations.selective_kept_per_token), until the backward replays it;
  * offload_checkpoints: the checkpointed layers' inputs live in pinned host memory between forward and
    backward (trainer/offload.py): OFFLOAD_RESIDENT_LAYERS layers' worth stay on the GPU (the first layer's,
    the copy in flight / the layer being replayed and the one prefetched); selective's kept outputs likewise
    (OFFLOAD_RESIDENT_CACHES layers' worth on the GPU; offload_host_bytes: what goes to the host);
  * liger_kernel: the fused linear cross-entropy never builds the b*s*vocab logits (a chunk of them plus
    the saved gradient of lm_head's input instead); its RMSNorm and SwiGLU save fewer tensors;
  * fused_lora: one saved input per distinct input tensor and no dropout masks;
  * fp8_base: the 4-bit weights stay NF4 and nothing more is saved; the float8 GEMMs add two float8 copies of
    the weight being multiplied and one of the incoming gradient (activations.FP8_GRAD_COPY_BYTES);
    fp8_weight_cache keeps every weight's float8 cast besides, in both layouts (2 bytes per base parameter).
padding_free / group_by_length only ever shorten batches (the planner assumes every sequence is
max_seq_length), and torch_compile's memory effect is not modelled (plan.py notes both).

Peak = static memory (weights, LoRA weights, optimizer states, cuBLAS workspaces) + the largest of these
moments (`_step_activations`):
  * the loss: every layer's saved activations (a checkpointed layer: its input only) plus the
    logits/loss buffers; no LoRA gradient exists yet (the Trainer's zero_grad sets them to None);
  * without checkpointing (or for the layers not checkpointed), the backward of the last layer: all
    saved activations plus that layer's working memory (its down projection's backward);
  * with checkpointing, the recompute of one layer: the checkpointed inputs, its full activations and
    its working memory (by then the layers that are not checkpointed have freed theirs);
  * the optimizer step: LoRA gradients and the optimizer's temporaries, no activations;
  * evaluation (per_device_eval_batch_size, no grad): its logits through the float32 loss (Liger's
    forward builds full logits outside training too).
`torch.cuda.max_memory_reserved` adds the caching allocator's fragmentation; the GPU also holds the CUDA
context, which torch does not count.

The reserved peak is never below what is reserved when training starts (`reserved_at_start`): the weights,
the LoRA weights and the cuBLAS workspaces, plus the allocator cache that loading left in segments that
still hold weights (the Trainer's `accelerator.free_memory()` releases every segment that is entirely
free, not these). The step allocates into that cache first, so it does not add to the step's peak: the
reserved peak is the larger of the two (`load_cache_bytes` says how much loading leaves). It decides
only small runs, and only where the process held more cache than loading leaves: the 8B points of
bench/results/memory_accuracy_8b_rerun_h100.json started with 1.1-1.5 GiB because the bench's worker had
just written the random checkpoint from the GPU (bench/memory_table.py replays them from the cache they
recorded, `cache_at_start_bytes`).

Every constant says where it comes from. The allocated side is counted tensor by tensor, nothing fitted:
on the 28 H100 points of bench/results/memory_accuracy_h100.json (Llama-3.2-1B and Llama-3-8B shapes,
seq 512-8192, batch 1-8, LoRA r 8-64, checkpointing all/half/none, plain and fast path) it is within 1%
of `max_memory_allocated`. The three FRAGMENTATION_* constants are fitted on those points (one set for
both paths); `bench/memory_table.py --fit` refits them and reports leave-one-out and by-model errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qlora_doctor.recipe.levers import Lever

from qlora_doctor.memory import activations as per_token
from qlora_doctor.memory.activations import (  # noqa: F401 - re-exported: the calibrated constants
    ACTIVATION_MASK_BYTES, LOGITS_FP32_COPIES, Levers)
from qlora_doctor.memory.model import ModelCounts, lora_targets

MIB = 2**20
GIB = 2**30

BNB_BLOCKSIZE = 64
"""bitsandbytes 4-bit blocksize for weights (`Params4bit(blocksize=64)` in transformers' integration):
one absmax per 64 weights."""
BNB_NESTED_BLOCKSIZE = 256
"""With double quant the absmaxes are themselves quantized to 8 bit in blocks of 256, each block keeping an
fp32 absmax (`quantize_blockwise(absmax, blocksize=256)` in `bnb.functional.quantize_4bit`)."""

CUDA_CONTEXT_BYTES = 512 * MIB
"""The CUDA context, kernels loaded lazily (CUDA_MODULE_LOADING=LAZY, the default since CUDA 11.7) plus
cuBLAS/cuDNN handles: about 500 MiB on an H100 with torch 2.x; not part of torch's reserved memory."""

CUBLAS_WORKSPACE_BYTES = 32 * MIB
"""torch's cuBLAS workspace on a Hopper GPU (`getDefaultWorkspaceSize`: 4096 * 8 KiB on sm90, about 8 MiB on
older GPUs), allocated through the caching allocator, one per (cuBLAS handle, stream): the forward's thread
and the autograd engine's device thread each get a handle, so two. The H100 points' allocated peaks sat a
near-constant 60-80 MiB above the sum of the tensors."""

# Reserved minus allocated (the caching allocator's cached free blocks at the peak), in three parts fitted
# together by least squares on the 27 usable H100 points of bench/results/memory_accuracy_h100.json (plain
# and fast path alike: the allocator does not know the path; `bench/memory_table.py --fit` refits them and
# reports leave-one-out and by-model held-out errors).
OFFLOAD_RESIDENT_LAYERS = 3
"""offload_checkpoints (trainer/offload.py): checkpointed layer inputs on the GPU at once. The first layer's input
(the embeddings' output, an autograd leaf that its AccumulateGrad node keeps alive) is never offloaded; in the
forward the input whose device->host copy is in flight stays alive until the next layer's pack, beside the
input the running layer reads; in the backward the input of the layer being replayed and the prefetched input of
the layer before it (double buffering). Counted from the code (tests/test_offload_checkpoints.py checks what
stays alive on the CPU), not measured on a GPU."""

OFFLOAD_RESIDENT_CACHES = 3
"""offload_checkpoints with recompute: selective (trainer/offload.py): selective layers' kept outputs on the GPU at
once. The last checkpointed layer's stay there (its replay comes right after the forward); in the forward up to
CACHE_COPIES_IN_FLIGHT (2) layers' copies to the host may still hold theirs; in the backward the layer being
replayed and the one prefetched for the layer before it. Counted from the code, not measured on a GPU."""

FRAGMENTATION_LOGITS = 0.36
"""Fraction of the logits buffers (`logits...` rows): by far the largest blocks. The loss's backward asks for
three float32 b*s*vocab blocks where the forward freed a compute-dtype one and a float32 one, and between
steps LoRA gradients and optimizer states get allocated inside the freed blocks, so it reserves new
segments."""
FRAGMENTATION_WORKING = 0.24
"""Fraction of one layer's backward working memory (`working...` rows: the recomputed layer and its
gradients): allocated and freed once per layer, interleaved with the LoRA gradients that stay, so the
freed blocks come back split."""
FRAGMENTATION_BYTES = int(0.14 * GIB)
"""A constant: the partly used 2 MiB (small pool) and 20 MiB (1-10 MiB requests) segments the allocator
reserves for small tensors (quantization states, LoRA weights and gradients, norms)."""


@dataclass(frozen=True)
class TrainSettings:
    """The parts of a recipe that decide memory, with every `auto` resolved."""

    micro_batch: int
    """per_device_train_batch_size."""
    seq_len: int
    """max_seq_length: the planner assumes every sequence is this long (packed or padded)."""
    grad_accum: int = 1
    gradient_checkpointing: bool = True
    optim: str = "paged_adamw_8bit"
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    load_in_4bit: bool = True
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    """bnb_4bit_compute_dtype, also the dtype the base is loaded in."""
    mixed_precision: bool = True
    """The Trainer's bf16 or fp16 (forward under autocast)."""
    eval_micro_batch: int | None = None
    """per_device_eval_batch_size when the run evaluates; None without evaluation."""
    # The `performance:` levers as speed.speed_plan decided them; the defaults are the plain path.
    upcast_unquantized: bool = True
    """Non-4-bit weights in float32 (peft's prepare); false: in the compute dtype. Only with load_in_4bit."""
    checkpoint_layers: str | int | float = "all"
    """With gradient_checkpointing: `all`, the first N layers, or a fraction of them (speed.checkpointed_indices)."""
    selective_layers: str | int | float = "all"
    """With recompute selective: which of the checkpointed layers keep outputs (levers.checkpointed_indices rule)."""
    recompute: str = "full"
    """`full`: a checkpointed layer keeps only its input; `selective`: also the outputs of the ops
    trainer/selective.py keeps (activations.selective_kept_per_token)."""
    liger_kernel: bool = False
    fused_lora: bool = False
    fp8_base: bool = False
    """trainer/fp8.py's float8 GEMMs for the 4-bit base layers."""
    fp8_weight_cache: bool = False
    """With fp8_base: every 4-bit weight's float8 cast kept, in the two layouts torch._scaled_mm takes (2 bytes per base
    parameter; Fp8BaseGemm.cache_weights)."""
    offload_checkpoints: bool = False
    """trainer/offload.py: the checkpointed layers' inputs in host memory (OFFLOAD_RESIDENT_LAYERS on the GPU)."""
    levers: tuple[Lever, ...] = ()
    """Every lever with its reason, as `speed.speed_plan` decided it (empty when not made from a recipe)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

OPTIMIZER_STEP_TEMP_BYTES: dict[str, int] = {"adamw_torch": 4, "adamw_torch_xla": 4, "adamw_anyprecision": 4}
"""Bytes per trainable parameter an optimizer step allocates besides the gradients: torch's foreach AdamW
(the default for `adamw_torch` on CUDA) builds `_foreach_sqrt(exp_avg_sq)`, one float32 copy of every
state. Fused and bitsandbytes optimizers update in their kernels (0, the default)."""

OPTIMIZER_STATE_BYTES: dict[str, float] = {
    # torch AdamW & co.: exp_avg and exp_avg_sq in float32.
    "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_torch_xla": 8, "adamw_torch_npu_fused": 8,
    "adamw_anyprecision": 8, "paged_adamw_32bit": 8, "galore_adamw": 8, "galore_adamw_layerwise": 8,
    "schedule_free_adamw": 8, "schedule_free_radam": 8, "apollo_adamw": 8, "apollo_adamw_layerwise": 8,
    "stable_adamw": 8,
    # bitsandbytes 8-bit blockwise states: 1 byte per state (+ an fp32 absmax per 2048 values, negligible).
    "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_torch_8bit": 2,
    "galore_adamw_8bit": 2, "galore_adamw_8bit_layerwise": 2,
    "adamw_torch_4bit": 1,
    # AdEMAMix keeps two first moments and one second moment.
    "ademamix": 12, "paged_ademamix_32bit": 12, "ademamix_8bit": 3, "paged_ademamix_8bit": 3,
    # Lion: one momentum.
    "lion_32bit": 4, "paged_lion_32bit": 4, "lion_8bit": 1, "paged_lion_8bit": 1,
    # RMSprop / Adagrad: one state; SGD in TrainingArguments has no momentum, so none.
    "rmsprop": 4, "rmsprop_bnb": 4, "rmsprop_bnb_32bit": 4, "rmsprop_bnb_8bit": 1, "adagrad": 4,
    "sgd": 0, "schedule_free_sgd": 4,
    # GrokAdamW: Adam's two states plus a gradient EMA.
    "grokadamw": 12,
    # LOMO fuses the update into backward: no states (and no stored gradients, ignored here).
    "lomo": 0, "adalomo": 0,
}
"""Optimizer state bytes per trainable parameter. Adafactor is computed separately (factored states)."""


def optimizer_state_bytes(optim: str, trainable: int, lora_r: int) -> tuple[int, bool]:
    """(bytes, known): the optimizer's states for `trainable` LoRA parameters."""
    if optim in ("adafactor", "galore_adafactor", "galore_adafactor_layerwise"):
        # Factored second moment: rows + columns floats per matrix, i.e. ~4/r bytes per LoRA parameter.
        return int(trainable * 4 / max(lora_r, 1)), True
    per_param = OPTIMIZER_STATE_BYTES.get(optim)
    if per_param is None:
        return int(trainable * 8), False
    return int(trainable * per_param), True


@dataclass(frozen=True)
class Estimate:
    """One step's predicted peak, split into named parts."""

    breakdown: tuple[tuple[str, int], ...]
    """(what, bytes), summing to `total_bytes`: the parts alive at the peak."""
    peak_allocated_bytes: int
    """Predicted `torch.cuda.max_memory_allocated`."""
    peak_reserved_bytes: int
    """Predicted `torch.cuda.max_memory_reserved`: allocated + fragmentation, or `reserved_at_start_bytes`
    where that is larger."""
    reserved_at_start_bytes: int
    """Predicted `torch.cuda.memory_reserved` when training starts: weights, LoRA weights and cuBLAS
    workspaces, plus the allocator cache left by loading."""
    total_bytes: int
    """What the GPU must hold: reserved + the CUDA context (+ paged optimizer states)."""
    peak_phase: str
    """Where the reserved peak is set: `loss`, `backward`, `recompute`, `optimizer step` or `eval`, or `start`
    when the step fits in what training starts with (reserved_at_start_bytes)."""
    calibration: str
    """`plain` or `fast`: which measured path the run takes (see calibration_path)."""
    trainable_params: int
    notes: tuple[str, ...]


def quantization_constants_bytes(counts: ModelCounts, s: TrainSettings) -> int:
    """bitsandbytes' absmaxes of the 4-bit weights: fp32 per block, or 8-bit with double quant (BNB_*)."""
    blocks = -(-counts.linear // BNB_BLOCKSIZE)
    return blocks + 4 * -(-blocks // BNB_NESTED_BLOCKSIZE) if s.double_quant else 4 * blocks


def loaded_model_bytes(counts: ModelCounts, s: TrainSettings) -> int:
    """The base as `from_pretrained` leaves it, before any training lever: linear weights in 4 bit with
    their constants (or in the compute dtype), everything else in the compute dtype."""
    compute = _DTYPE_BYTES[s.compute_dtype]
    kept = (counts.embedding + counts.lm_head + counts.norms + counts.other) * compute
    if s.load_in_4bit:
        return counts.linear // 2 + quantization_constants_bytes(counts, s) + kept
    return counts.linear * compute + kept


def load_cache_bytes(counts: ModelCounts, s: TrainSettings) -> int:
    """The allocator cache loading leaves reserved when training starts: at most one weight's copy in the
    compute dtype, the largest.

    `from_pretrained` with a bitsandbytes config quantizes on the GPU one weight at a time: the weight
    arrives in the compute dtype, its 4-bit copy and constants are allocated, the original is freed. The
    caching allocator keeps the freed block; where later 4-bit weights are placed in it, its segment cannot
    be released and what they leave free stays reserved. The Trainer's `accelerator.free_memory()` releases
    every segment that is entirely free. Measured (bench/results/memory_accuracy_h100.json,
    `load_peak_reserved_bytes` of the first Llama-3-8B point, loaded from a checkpoint on disk in a fresh
    process): the load peaked at 5.45 GiB reserved, 0.135 GiB above the loaded model as this planner
    counts it (5.31 GiB), i.e. the largest weight in bf16 (0.109 GiB) and its 4-bit copy (0.027 GiB) in
    flight; what stays reserved after the load is below that peak. The 70B point, quantized weight by
    weight by the bench itself, peaked 0.64 GiB above its model (largest weight 0.44 GiB + 0.11 GiB).
    With this figure the floor never decides a prediction: every step also dequantizes the largest weight
    into a buffer of the same size. Without 4-bit loading nothing is converted on the GPU: 0 (not measured)."""
    if not s.load_in_4bit:
        return 0
    return counts.linear_largest * _DTYPE_BYTES[s.compute_dtype]


def selective_layers(counts: ModelCounts, s: TrainSettings) -> int:
    """How many checkpointed layers keep selective recompute's outputs (0 with recompute: full)."""
    from qlora_doctor.recipe.levers import checkpointed_indices

    if s.recompute != "selective":
        return 0
    checkpointed = checkpointed_layers(counts, s)
    if s.selective_layers in ("all", "auto"):  # auto not yet resolved (plan.resolve_selective_layers): all
        return checkpointed
    return len(checkpointed_indices(s.selective_layers, checkpointed))


def checkpointed_layers(counts: ModelCounts, s: TrainSettings) -> int:
    """How many decoder layers recompute in the backward (the trainer's own selection rule)."""
    from qlora_doctor.recipe.levers import checkpointed_indices

    if not s.gradient_checkpointing:
        return 0
    return len(checkpointed_indices(s.checkpoint_layers, counts.num_layers))


def calibration_path(counts: ModelCounts, s: TrainSettings) -> str:
    """`plain` when the run takes peft's prepare_model_for_kbit_training path (fp32 upcast with 4-bit, no
    Liger, no fused LoRA, checkpointing all layers or none), else `fast`: which of the measured paths of
    bench/results/memory_accuracy_h100.json the run is on (both share the fitted constants)."""
    selective = 0 < checkpointed_layers(counts, s) < counts.num_layers
    no_upcast = s.load_in_4bit and not s.upcast_unquantized
    return "fast" if (no_upcast or s.liger_kernel or s.fused_lora or selective or s.recompute == "selective"
                      or s.fp8_base or s.offload_checkpoints) else "plain"


def estimate(counts: ModelCounts, s: TrainSettings, cache_at_start_bytes: int | None = None) -> Estimate:
    """Predict the peak of a training step (after the first, when optimizer states exist).

    `cache_at_start_bytes`: the allocator cache (reserved - allocated) when training starts, where it is
    known (a measured point records it); None: what loading leaves (`load_cache_bytes`)."""
    notes: list[str] = []
    compute = _DTYPE_BYTES[s.compute_dtype]
    unquantized = _unquantized_bytes(s)
    act, residual = _activation_bytes(s)
    levers = Levers(liger_kernel=s.liger_kernel, fused_lora=s.fused_lora, fp8_base=s.fp8_base)
    path = calibration_path(counts, s)

    rows: list[tuple[str, int]] = []
    # What is allocated when training starts (the Trainer's first step has not run): weights, workspaces
    # and LoRA weights; optimizer states, gradients and autocast copies come with the first step.
    at_start: list[int] = []
    if s.load_in_4bit:
        rows.append(("4-bit weights (NF4, 2 per byte)", counts.linear // 2))
        constants = quantization_constants_bytes(counts, s)
        rows.append(("quantization constants" + (" (double quant)" if s.double_quant else ""), constants))
        at_start += [counts.linear // 2, constants]
        rows.append(("dequantization buffer (largest weight)", counts.linear_largest * compute))
        if s.fp8_base:
            # trainer/fp8.py: the input-gradient GEMM reads the weight cast to float8 (W^T, column-major) and
            # torchao's copy of it laid out for torch._scaled_mm (`preprocess_addmm`), 1 byte per element each.
            rows.append(("float8 copies of the largest weight (fp8_base)", 2 * counts.linear_largest))
            if s.fp8_weight_cache:
                # made during the first forward and backward and kept: static memory from then on; two layouts
                rows.append(("float8 weight cache (fp8_weight_cache)", 2 * counts.linear))
    else:
        rows.append((f"linear weights ({s.compute_dtype}, not quantized)", counts.linear * compute))
        at_start.append(counts.linear * compute)
    kept = counts.embedding + counts.lm_head + counts.norms + counts.other
    name = "float32" if unquantized == 4 else s.compute_dtype
    rows.append((f"embeddings, lm_head, norms ({name})", kept * unquantized))
    at_start.append(kept * unquantized)
    if s.mixed_precision and unquantized != compute:
        # Autocast casts lm_head's float32 weight for the matmul (Liger's chunks: for each chunk).
        rows.append(("lm_head weight cast for autocast", counts.vocab_size * counts.hidden_size * compute))
    rows.append(("cuBLAS workspaces (forward and backward threads)", 2 * CUBLAS_WORKSPACE_BYTES))
    at_start.append(2 * CUBLAS_WORKSPACE_BYTES)

    targets = lora_targets(counts, s.lora_targets)
    if not targets:
        notes.append(f"lora.target_modules {s.lora_targets!r} matches no linear layer of this model")
    per_layer_trainable = sum(s.lora_r * (t.in_features + t.out_features) for t in targets)
    trainable = counts.num_layers * per_layer_trainable
    # peft keeps adapters in float32 (autocast_adapter_dtype); autocast caches a compute-dtype copy of each
    # adapter weight, which the backward keeps. Fused LoRA casts them inside its own function (no autocast
    # op), so nothing is cached. Their float32 gradients exist only from the backward on (the Trainer's
    # zero_grad sets them to None each step): they are part of the moments below, not static.
    lora_copy = compute if s.mixed_precision and not s.fused_lora else 0
    rows.append(("LoRA weights (float32)" + (" and their autocast copies" if lora_copy else ""),
                 trainable * (4 + lora_copy)))
    at_start.append(trainable * 4)
    states, known = optimizer_state_bytes(s.optim, trainable, s.lora_r)
    if not known:
        notes.append(f"optimizer {s.optim!r}: state size unknown, counted as AdamW's 8 bytes per parameter")
    paged = s.optim.startswith("paged_")
    if paged:
        # bitsandbytes allocates paged states with cudaMallocManaged, outside torch's caching allocator:
        # on the GPU while there is room (so counted in the total), but not in torch's counters.
        notes.append(f"{s.optim}: its states live in CUDA unified memory (outside torch's reserved memory) "
                     "and page out to CPU memory when the GPU runs short")
    else:
        rows.append((f"optimizer states ({s.optim})", states))
    static = sum(b for _, b in rows)

    activation_rows, phase = _step_activations(counts, s, targets, act, residual, levers, per_layer_trainable)
    step_rows = [("LoRA gradients (float32)", trainable * 4),
                 (f"optimizer step temporaries ({s.optim})", trainable * OPTIMIZER_STEP_TEMP_BYTES.get(s.optim, 0))]
    if sum(b for _, b in step_rows) > sum(b for _, b in activation_rows):
        activation_rows, phase = step_rows, "optimizer step"
    if s.eval_micro_batch:
        # Evaluation runs between steps without grad: nothing saved per layer, but its logits go through
        # the same float32 loss (compute-dtype logits, their float32 copy, log_softmax's output).
        eval_tokens = s.eval_micro_batch * s.seq_len
        eval_logits = counts.vocab_size * (act + 4 + 4) * eval_tokens
        eval_hidden = 3 * counts.hidden_size * residual * eval_tokens
        if eval_logits + eval_hidden > sum(b for _, b in activation_rows) * (1 + FRAGMENTATION_LOGITS):
            phase = "eval"
            activation_rows = [("activations: evaluation forward (no grad)", eval_hidden),
                               ("logits and loss buffers (evaluation)", eval_logits)]
    rows += activation_rows
    allocated = sum(b for _, b in rows)

    logits_bytes = sum(b for n, b in activation_rows if n.startswith("logits"))
    working_bytes = sum(b for n, b in activation_rows if n.startswith("working"))
    fragmentation = int(FRAGMENTATION_LOGITS * logits_bytes + FRAGMENTATION_WORKING * working_bytes
                        + FRAGMENTATION_BYTES)
    cache = load_cache_bytes(counts, s) if cache_at_start_bytes is None else cache_at_start_bytes
    reserved_at_start = sum(at_start) + cache
    if reserved_at_start > allocated + fragmentation:
        # The step fits in what training starts with (module docstring): the reserved peak is that.
        rows.append(("allocator cache left by loading (reserved from the start, not filled by the step)",
                     reserved_at_start - allocated))
        reserved, phase = reserved_at_start, "start"
    else:
        rows.append(("allocator fragmentation (reserved - allocated)", fragmentation))
        reserved = allocated + fragmentation
    outside = CUDA_CONTEXT_BYTES
    if paged:
        rows.append((f"optimizer states ({s.optim}, unified memory)", states))
        outside += states
    rows.append(("CUDA context (not in torch's counters)", CUDA_CONTEXT_BYTES))
    assert static > 0
    return Estimate(breakdown=tuple((n, int(b)) for n, b in rows), peak_allocated_bytes=int(allocated),
                    peak_reserved_bytes=int(reserved), reserved_at_start_bytes=int(reserved_at_start),
                    total_bytes=int(reserved + outside),
                    peak_phase=phase, calibration=path, trainable_params=trainable, notes=tuple(notes))


def _unquantized_bytes(s: TrainSettings) -> int:
    """peft's prepare (upcast_unquantized) casts every fp16/bf16 parameter that is not 4-bit to float32;
    without it, or without 4-bit loading, everything stays in the compute dtype."""
    return 4 if s.load_in_4bit and s.upcast_unquantized else _DTYPE_BYTES[s.compute_dtype]


def _activation_bytes(s: TrainSettings) -> tuple[int, int]:
    """(act, residual): what matmuls and attention produce (the autocast dtype, or without autocast the residual
    stream's dtype: bnb casts its output back to its input's dtype), and the residual stream's dtype (the embedding
    output's; adds keep it)."""
    unquantized = _unquantized_bytes(s)
    return (_DTYPE_BYTES[s.compute_dtype] if s.mixed_precision else unquantized), unquantized


def offload_host_bytes(counts: ModelCounts, s: TrainSettings) -> int:
    """Pinned host memory offload_checkpoints holds at the end of a micro-batch's forward (trainer/offload.py):
    every checkpointed layer's input but the first layer's, and with recompute: selective every selective layer's
    kept outputs but the last checkpointed layer's (0 when the lever is off)."""
    if not s.offload_checkpoints:
        return 0
    checkpointed = checkpointed_layers(counts, s)
    if not checkpointed:
        return 0
    act, residual = _activation_bytes(s)
    kept, stays = _selective_kept(counts, s, lora_targets(counts, s.lora_targets), act)
    selective = selective_layers(counts, s)
    on_host = max(checkpointed - 1, 0) * counts.hidden_size * residual + max(selective - 1, 0) * (kept - stays)
    return on_host * s.tokens


def _selective_kept(counts: ModelCounts, s: TrainSettings, targets: tuple, act: int) -> tuple[int, int]:
    """(bytes per token a selective layer keeps, of which offload_checkpoints leaves on the GPU: the whole-LoRA
    op's A x, trainer/offload.py STAY_ON_DEVICE); (0, 0) without selective recompute."""
    if s.recompute != "selective":
        return 0, 0
    fused = targets if s.fused_lora else ()
    return (per_token.selective_kept_per_token(counts, act, fused, s.lora_r),
            per_token.whole_lora_a_x_per_token(fused, s.lora_r, act))


def _step_activations(counts: ModelCounts, s: TrainSettings, targets: tuple, act: int, residual: int,
                      levers: Levers, per_layer_trainable: int) -> tuple[list[tuple[str, int]], str]:
    """The rows of the largest moment of a step's forward and backward, and which it is:

    * `loss`: every layer's saved tensors (a checkpointed layer: its input only), the final norm's, and
      the loss buffers (no LoRA gradient yet);
    * `backward`: without checkpointing (or selective), the backward of the last layer that kept its
      activations: all of them, the incoming gradient and that layer's working memory;
    * `recompute`: with checkpointing, the backward of the last checkpointed layer, recomputed: the
      checkpointed inputs, its full saved tensors and its working memory; the layers after it have freed
      theirs (and the final norm its input) but left their LoRA gradients.

    Row names matter: fragmentation applies FRAGMENTATION_LOGITS to rows named `logits...` and
    FRAGMENTATION_WORKING to rows named `working...`."""
    tokens, layers = s.tokens, counts.num_layers
    dropout = s.lora_dropout > 0
    layer_saved = per_token.layer_saved_per_token(counts, targets, s.lora_r, act, residual, dropout, levers)
    layer_input = counts.hidden_size * residual
    # A selectively checkpointed layer keeps some op outputs besides its input until its replay consumes them.
    kept_outputs, stays = _selective_kept(counts, s, targets, act)
    working = per_token.layer_working_per_token(counts, act, residual, dropout, levers)
    head = per_token.head_per_token(counts, act, residual, levers)
    checkpointed = checkpointed_layers(counts, s)
    kept = layers - checkpointed

    if levers.liger_kernel:
        chunk, hidden = per_token.liger_loss_bytes(counts, tokens, act, residual)
        loss_rows = [("logits: one chunk of Liger's fused linear cross-entropy", chunk),
                     ("activations: lm_head input and its gradient (fused cross-entropy)", hidden)]
    else:
        loss_rows = [("logits and loss buffers", per_token.full_logits_per_token(counts, act) * tokens)]
    # offload_checkpoints: only OFFLOAD_RESIDENT_LAYERS checkpointed inputs are on the GPU at any moment.
    resident = min(checkpointed, OFFLOAD_RESIDENT_LAYERS) if s.offload_checkpoints else checkpointed
    selective = selective_layers(counts, s)  # the first `selective` of the checkpointed layers keep outputs
    # offloaded, only OFFLOAD_RESIDENT_CACHES layers' kept outputs are on the GPU at once
    kept_on_gpu = min(selective, OFFLOAD_RESIDENT_CACHES) if s.offload_checkpoints else selective
    # the other selective layers' caches leave what never moves (A x) on the GPU
    inputs = (resident * layer_input + kept_on_gpu * kept_outputs + (selective - kept_on_gpu) * stays) * tokens
    label = "checkpointed layer inputs" + (" and kept outputs (selective)" if kept_outputs else "")
    if s.offload_checkpoints and checkpointed:
        label += f" ({resident} inputs on the GPU, the rest offloaded to host memory)"
    if checkpointed == layers:
        stored = [(f"activations: {label}", inputs + head * tokens)]
    elif checkpointed == 0:
        stored = [("activations: all layers", (layers * layer_saved + head) * tokens)]
    else:
        stored = [(f"activations: {label} ({checkpointed} of {layers} layers)", inputs),
                  (f"activations: the {kept} layers not checkpointed", (kept * layer_saved + head) * tokens)]
    moments = [(stored + loss_rows, "loss")]
    if kept:
        moments.append(([(f"activations: {label} ({checkpointed} of {layers} layers)", inputs),
                         (f"activations: the {kept} layers not checkpointed", kept * layer_saved * tokens),
                         ("working: one layer's backward (gradients)", working * tokens)], "backward"))
    if checkpointed:
        # The layer being replayed (the last checkpointed one) has handed its kept outputs, if it kept any, to
        # its recomputed tensors (layer_saved).
        alive = kept_on_gpu - 1 if selective == checkpointed else kept_on_gpu
        cached = selective - 1 if selective == checkpointed else selective  # layers whose cache is still alive
        inputs = (resident * layer_input + max(alive, 0) * kept_outputs + max(cached - max(alive, 0), 0) * stays) * tokens
        moments.append(([(f"activations: {label}", inputs),
                         ("working: one layer recomputed + its backward", (layer_saved - layer_input + working) * tokens),
                         ("LoRA gradients of the layers after it (float32)", kept * per_layer_trainable * 4)],
                        "recompute"))
    return max(moments, key=lambda m: sum(b for _, b in m[0]))

"""Peak GPU memory of one QLoRA training step, from parameter counts and the run's settings.

The model of a step is what `qlora_doctor.trainer.model.load_for_training` builds and the transformers
Trainer runs: the base loaded in the compute dtype and quantized by bitsandbytes,
`prepare_model_for_kbit_training` (which upcasts every non-4-bit parameter to float32 and enables
non-reentrant gradient checkpointing), peft LoRA adapters (float32), and the forward under autocast
(`bf16`/`fp16` in TrainingArguments). Because the embeddings are float32 after that upcast, the residual
stream between layers is float32 too: autocast only changes what matmuls and attention produce.

Peak = static memory (weights, adapters, optimizer) + the largest of these moments:
  * the loss: every layer's saved activations (or, with checkpointing, each layer's input) plus the
    logits buffers;
  * with checkpointing, the recompute of one layer: its full activations and its gradients;
  * evaluation (per_device_eval_batch_size, no grad): its logits through the float32 loss.
`torch.cuda.max_memory_reserved` adds the caching allocator's fragmentation; the GPU also holds the CUDA
context, which torch does not count.

Every constant below says where it comes from. The fitted ones (FRAGMENTATION_*, LOGITS_*) were
calibrated on one H100 measurement (Llama-3-8B shape, seq 2048, NF4 + double quant, LoRA r=16 on all
linear layers, checkpointing, bf16 autocast): batch 8 -> 44.4 GiB allocated / 57.5 GiB reserved,
batch 4 -> 26.6 / 32.9 GiB. Refit them from `bench/memory_accuracy.py` (see `bench/memory_table.py --fit`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_doctor.memory.model import LinearShape, ModelCounts, lora_targets

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

LOGITS_FP32_COPIES = 3
"""In the loss's backward three float32 b*s*vocab tensors are alive together: log_softmax's output (saved
for its backward), the gradient of the loss w.r.t. it (from nll_loss's backward) and the gradient w.r.t. the
logits that log_softmax's backward produces (transformers' ForCausalLMLoss upcasts logits to float32)."""
LOGITS_COMPUTE_COPIES = 1
"""Plus one b*s*vocab tensor in the activation dtype (the logits lm_head produced): the calibration
measurement's peak is one such tensor above the three float32 ones."""

FRAGMENTATION_LOGITS = 0.44
"""Reserved minus allocated, as a fraction of the logits buffers: these are by far the largest blocks, and
each step the allocator cannot fit them into the holes the previous step left (LoRA grads and optimizer
states get allocated inside freed logits blocks), so it reserves new segments. Fitted on the calibration
points (13.1 GiB at batch 8, 6.3 GiB at batch 4: both ~0.44 of their logits buffers after
FRAGMENTATION_ACTIVATIONS)."""
FRAGMENTATION_ACTIVATIONS = 0.10
"""Reserved minus allocated for the per-layer activations: same-sized tensors allocated and freed in stack
order each step, so little; 10% is a prior until GPU measurements without checkpointing refit it."""

ACTIVATION_MASK_BYTES = 1
"""Dropout keeps a bool mask (1 byte per element) for backward."""


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

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

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
    """Predicted `torch.cuda.max_memory_reserved` (allocated + fragmentation)."""
    total_bytes: int
    """What the GPU must hold: reserved + the CUDA context (+ paged optimizer states)."""
    peak_phase: str
    """`loss`, `recompute` or `eval`: the moment of the run the peak is at."""
    trainable_params: int
    notes: tuple[str, ...]


def estimate(counts: ModelCounts, s: TrainSettings) -> Estimate:
    """Predict the peak of a training step (after the first, when optimizer states exist)."""
    notes: list[str] = []
    compute = _DTYPE_BYTES[s.compute_dtype]
    # prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not 4-bit to float32;
    # without 4-bit loading there is no prepare, and everything stays in the compute dtype.
    unquantized = 4 if s.load_in_4bit else compute
    # What matmuls and attention produce: the autocast dtype, or without autocast the residual
    # stream's dtype (bnb casts its output back to its input's dtype).
    act = compute if s.mixed_precision else unquantized
    # The residual stream starts as the embedding output (float32 after prepare) and adds keep it so.
    residual = unquantized

    rows: list[tuple[str, int]] = []
    if s.load_in_4bit:
        rows.append(("4-bit weights (NF4, 2 per byte)", counts.linear // 2))
        blocks = -(-counts.linear // BNB_BLOCKSIZE)
        if s.double_quant:
            constants = blocks + 4 * -(-blocks // BNB_NESTED_BLOCKSIZE)
        else:
            constants = 4 * blocks
        rows.append(("quantization constants" + (" (double quant)" if s.double_quant else ""), constants))
        rows.append(("dequantization buffer (largest weight)", counts.linear_largest * compute))
    else:
        rows.append((f"linear weights ({s.compute_dtype}, not quantized)", counts.linear * compute))
    kept = counts.embedding + counts.lm_head + counts.norms + counts.other
    name = "float32" if unquantized == 4 else s.compute_dtype
    rows.append((f"embeddings, lm_head, norms ({name})", kept * unquantized))
    if s.mixed_precision and unquantized != compute:
        # Autocast casts lm_head's float32 weight for the matmul; the copy is saved for the backward.
        rows.append(("lm_head weight cast for autocast", counts.vocab_size * counts.hidden_size * compute))

    targets = lora_targets(counts, s.lora_targets)
    if not targets:
        notes.append(f"lora.target_modules {s.lora_targets!r} matches no linear layer of this model")
    trainable = counts.num_layers * sum(s.lora_r * (t.in_features + t.out_features) for t in targets)
    # peft keeps adapters in float32 (autocast_adapter_dtype); grads are float32; autocast caches a
    # compute-dtype copy of each adapter weight, which the backward keeps.
    lora_copy = compute if s.mixed_precision else 0
    rows.append(("LoRA weights + gradients (float32)", trainable * (8 + lora_copy)))
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

    tokens = s.tokens
    mask = ACTIVATION_MASK_BYTES if s.lora_dropout > 0 else 0
    layer_saved = _layer_saved_per_token(counts, targets, s.lora_r, act, residual, mask)
    layer_input = counts.hidden_size * residual
    # The backward of one layer: gradients of the MLP's three intermediate tensors and of the residual.
    layer_working = 3 * counts.intermediate_size * act + 2 * counts.hidden_size * 4
    head = counts.hidden_size * (residual + act)  # final norm output + lm_head's input cast
    logits = counts.vocab_size * (LOGITS_FP32_COPIES * 4 + LOGITS_COMPUTE_COPIES * act)

    if s.gradient_checkpointing:
        kept_acts = counts.num_layers * layer_input + head
        recompute = layer_saved - layer_input + layer_working
        if logits >= recompute:
            phase = "loss"
            activation_rows = [("activations: checkpointed layer inputs", kept_acts * tokens),
                               ("logits and loss buffers", logits * tokens)]
        else:
            phase = "recompute"
            activation_rows = [("activations: checkpointed layer inputs", kept_acts * tokens),
                               ("activations: one layer recomputed + its gradients", recompute * tokens)]
    else:
        phase = "loss"
        activation_rows = [("activations: all layers", (counts.num_layers * layer_saved + head) * tokens),
                           ("logits and loss buffers", max(logits, layer_working) * tokens)]
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
    activation_bytes = sum(b for n, b in activation_rows if n.startswith("activations"))
    fragmentation = int(FRAGMENTATION_LOGITS * logits_bytes + FRAGMENTATION_ACTIVATIONS * activation_bytes)
    rows.append(("allocator fragmentation (reserved - allocated)", fragmentation))
    reserved = allocated + fragmentation
    outside = CUDA_CONTEXT_BYTES
    if paged:
        rows.append((f"optimizer states ({s.optim}, unified memory)", states))
        outside += states
    rows.append(("CUDA context (not in torch's counters)", CUDA_CONTEXT_BYTES))
    assert static > 0
    return Estimate(breakdown=tuple((n, int(b)) for n, b in rows), peak_allocated_bytes=int(allocated),
                    peak_reserved_bytes=int(reserved), total_bytes=int(reserved + outside),
                    peak_phase=phase, trainable_params=trainable, notes=tuple(notes))


def _layer_saved_per_token(counts: ModelCounts, targets: tuple[LinearShape, ...], r: int, act: int,
                           residual: int, mask: int) -> int:
    """Bytes one decoder layer keeps for its backward, per token, without checkpointing.

    * the two residual-stream tensors the two RMSNorms save (the layer's input, the post-attention sum);
    * per LoRA-wrapped linear: its input cast to the activation dtype for lora_A (autocast makes a fresh
      copy for every adapter, and lora_A's backward needs it), the dropout mask, and lora_A's r outputs.
      bitsandbytes' 4-bit matmul saves no input (its weight is frozen), so plain 4-bit layers add nothing;
    * attention (SDPA, memory-efficient/flash: no s x s matrix): q, k, v and the output;
    * the MLP: gate and up outputs and the activation's output (SwiGLU), or the first projection's.
    """
    h, inter = counts.hidden_size, counts.intermediate_size
    norms = 2 * h * residual
    lora = sum(t.in_features * (act + mask) + r * act for t in targets)
    attention = (2 * counts.q_dim + 2 * counts.kv_dim) * act
    mlp = (3 if counts.gated_mlp else 1) * inter * act
    return norms + lora + attention + mlp

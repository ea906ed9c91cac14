"""What one training step keeps per token: a decoder layer's saved tensors, the working memory of one
layer's backward, the head, and the loss buffers, on the plain path and with each speed lever of
`qlora_doctor/trainer/speed.py`. `estimate.py` combines them into the moments of a step.

Dtypes, in bytes: `act` is what matmuls and attention produce (the autocast dtype); `residual` is the
residual stream's, which is the embeddings' dtype: float32 after peft's prepare (upcast_unquantized),
else the compute dtype; `projection_dtype` is what q/k/v/gate/up produce from a norm's output in that dtype. Each count names the op that saves the tensor (torch keeps a tensor for
backward only when an op saves it; bitsandbytes' 4-bit matmul saves no input, its weight is frozen).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_doctor.memory.model import LinearShape, ModelCounts
from qlora_doctor.recipe.levers import SELECTIVE_KEPT_PROJECTIONS, SELECTIVE_WHOLE_LORA_PROJECTIONS

ACTIVATION_MASK_BYTES = 1
"""Dropout keeps a bool mask (1 byte per element) for backward (`torch.native_dropout`)."""

LOGITS_FP32_COPIES = 3
"""In the loss's backward three float32 b*s*vocab tensors are alive together: log_softmax's output (saved
for its backward), the gradient of the loss w.r.t. it (from nll_loss's backward) and the gradient w.r.t. the
logits that log_softmax's backward produces (transformers' ForCausalLMLoss upcasts logits to float32). The
logits lm_head produced (compute dtype) are gone by then: the Trainer's `compute_loss` keeps only the loss
of the model's output, and their float32 copy is not saved by anything. (A hand-written loop that holds
`outputs.logits` through `backward()` keeps one more compute-dtype copy: the issue's 57.5 GiB point.)
The forward's own peak (compute-dtype logits, their float32 copy, log_softmax's output: 2 + 4 + 4 bytes)
is below these 12 bytes. Checked on the H100 points of bench/results/memory_accuracy_h100.json."""

LIGER_CE_TOKEN_BYTES = 4 + 8 + 8 + 1
"""Liger's fused linear cross-entropy, per token besides the hidden-size tensors: the float32 per-token
loss (`loss_1d`), the padded and the shifted int64 labels (`LigerForCausalLMLoss`), the bool target mask."""

SHARED_INPUTS = (frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}))
"""Linear layers of one decoder layer that read the same tensor (the attention norm's / the MLP norm's
output): where their LoRA saves that tensor itself rather than a copy, it is kept once for the group."""

ATTENTION_OUTPUT_READERS = frozenset({"o_proj"})
"""The linear layer reading the attention's output. SDPA (flash / memory-efficient) returns it laid out as
[batch, seq, heads, head_dim], so transformers' `transpose(1, 2).contiguous()` copies nothing: where LoRA
saves that tensor itself (fused LoRA), it is the one SDPA saved for its own backward, counted once. On the
H100 points without checkpointing, counting it twice over-predicted by q_dim x 2 bytes per token per layer."""


@dataclass(frozen=True)
class Levers:
    """The memory-relevant speed levers of one run (decided by `speed.speed_plan`)."""

    liger_kernel: bool
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy."""
    fused_lora: bool
    """`trainer/fused_lora.py`'s one autograd function per LoRA-on-4-bit layer."""
    fp8_base: bool = False
    """`trainer/fp8.py`'s float8 GEMMs for the 4-bit base layers."""


FP8_GRAD_COPY_BYTES = 1
"""fp8_base: the input-gradient GEMM of a base layer reads its incoming gradient cast to float8 (1 byte per
element; compiled casts make no other temporary). At the down projection's backward that is hidden-size wide,
alive beside the GEMM's output."""


def projection_dtype(act: int, residual: int) -> int:
    """Bytes per element of what a linear layer outputs when it reads the residual stream's dtype (the
    norms' outputs feed q/k/v and gate/up): bitsandbytes' Linear4bit casts its output back to its input's
    dtype (`matmul_4bit(...).to(inp_dtype)`) and fused LoRA does the same, so with a float32 residual
    stream (upcast_unquantized) these outputs, and the MLP's intermediate tensors after them, are float32
    even under autocast; peft adds LoRA's compute-dtype output into that."""
    return max(act, residual)


def layer_saved_per_token(counts: ModelCounts, targets: tuple[LinearShape, ...], r: int, act: int, residual: int,
                          dropout: bool, levers: Levers) -> int:
    """Bytes one decoder layer keeps for its backward, per token, without checkpointing.

    * the two RMSNorms: transformers' LlamaRMSNorm computes in float32 and its pow/mul save that float32
      copy of the input (the input itself when the residual stream is float32); Liger's RMSNorm saves its
      input as it is (plus one float32 rstd per row, negligible);
    * per LoRA-wrapped linear (peft): `lora_A(dropout(x))` saves dropout's output (a fresh copy in the
      activation dtype; with an fp32 input autocast's cast is that fresh copy) and dropout's mask; without
      dropout (nn.Identity) and an input already in the activation dtype lora_A saves x itself, kept once
      per group of layers reading it (SHARED_INPUTS). Fused LoRA saves a reference to x (a copy only where
      x must be cast to the compute dtype) and regenerates the mask from the RNG state instead of storing
      it. Both keep lora_A's r outputs;
    * attention (SDPA, memory-efficient/flash: no s x s matrix): q, k, v and the output, cast to the
      activation dtype by autocast; Liger's RoPE saves only cos/sin, as transformers' does;
    * the MLP: SwiGLU's gate and up outputs and the activation's output, in the projection dtype
      (`projection_dtype`: float32 on the plain path); Liger's fused SwiGLU saves gate and up only (it
      recomputes silu in its backward).
    """
    h, inter = counts.hidden_size, counts.intermediate_size
    proj = projection_dtype(act, residual)
    norm_saved = residual if levers.liger_kernel else max(residual, 4)
    norms = 2 * h * norm_saved
    lora = sum(r * act for _ in targets) + _lora_inputs(h, targets, act, residual, dropout, levers.fused_lora)
    attention = (2 * counts.q_dim + 2 * counts.kv_dim) * act
    if counts.gated_mlp:
        mlp = (2 if levers.liger_kernel else 3) * inter * proj
    else:
        mlp = inter * proj
    return norms + lora + attention + mlp


def _lora_inputs(h: int, targets: tuple[LinearShape, ...], act: int, residual: int, dropout: bool,
                 fused: bool) -> int:
    """The LoRA layers' saved inputs (see layer_saved_per_token)."""
    if dropout and not fused:
        return sum(t.in_features * (act + ACTIVATION_MASK_BYTES) for t in targets)
    total, seen = 0, set()
    for t in targets:
        short = t.name.split(".")[-1]
        if fused and short in ATTENTION_OUTPUT_READERS:
            continue  # attention's saved output (ATTENTION_OUTPUT_READERS)
        group = next((g for g in SHARED_INPUTS if short in g), None)
        # The grouped layers read a norm's output, in the residual stream's dtype; a cast to the compute
        # dtype makes one copy per layer.
        if group is not None and residual == act:
            key = (t.name.rsplit(".", 1)[0], group)
            if key in seen:
                continue
            seen.add(key)
        total += t.in_features * act
    return total


def layer_working_per_token(counts: ModelCounts, act: int, residual: int, dropout: bool, levers: Levers) -> int:
    """What one layer's backward allocates on top of its saved tensors, per token, at its largest: the
    backward of the MLP's down projection (the first linear of the layer the gradient reaches, while every
    saved tensor of the layer is still alive), plus the incoming gradient of the residual stream.

    Fused LoRA (`trainer/fused_lora.py`, LoraLinear4bitFunction.backward) with dropout holds, for the down
    projection's input width: the dropped-out input and its mask, drawn again from the saved RNG state;
    `grad_x = g @ W`; `g_a @ A` and native_dropout_backward's output, both alive while the latter is
    computed: 4 tensors in the compute dtype and one bool mask. Without dropout `grad_x.addmm_` works in
    place: one tensor. Liger's SwiGLU backward then writes its gradients into its saved inputs.

    peft's unfused LoRA (not the peak of any measured point yet, so from the autograd graph): the
    gradients of the three MLP intermediates in the projection dtype and the LoRA branch's compute-dtype
    input gradient. fp8_base adds the float8 copy of the incoming gradient (FP8_GRAD_COPY_BYTES)."""
    inter, h = counts.intermediate_size, counts.hidden_size
    if levers.fused_lora:
        down = inter * (4 * act + ACTIVATION_MASK_BYTES) if dropout else inter * act
    else:
        down = (1 if levers.liger_kernel else 3) * inter * projection_dtype(act, residual) + inter * act
    # fp8_base, an upper bound: with fused LoRA's dropout the float8 gradient is freed before the peak above.
    fp8_grad = h * FP8_GRAD_COPY_BYTES if levers.fp8_base else 0
    return down + h * residual + fp8_grad


def head_per_token(counts: ModelCounts, act: int, residual: int, levers: Levers) -> int:
    """The final norm's saved tensor (lm_head is frozen, so its matmul saves no input; with Liger the fused
    cross-entropy's buffers are in liger_loss_bytes)."""
    if levers.liger_kernel:
        return counts.hidden_size * residual
    return counts.hidden_size * max(residual, 4)


def full_logits_per_token(counts: ModelCounts, act: int) -> int:
    """Logits and loss buffers of transformers' loss (LOGITS_FP32_COPIES), per token, at the loss's backward."""
    return counts.vocab_size * LOGITS_FP32_COPIES * 4


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Rows of one chunk of Liger's fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py,
    0.8.5 and main): `inc_factor = cdiv(V, H)`, `chunk_size = min(next_power_of_2(cdiv(BT, inc_factor)), BT)`,
    so a chunk's logits are about BT x H elements whatever the vocabulary."""
    inc_factor = -(-vocab // hidden)
    rows = -(-tokens // inc_factor)
    return min(1 << max(rows - 1, 0).bit_length(), tokens)


def liger_loss_bytes(counts: ModelCounts, tokens: int, act: int, residual: int) -> tuple[int, int]:
    """(logits chunk, hidden-size tensors) of Liger's fused linear cross-entropy at its peak, in bytes.

    It computes the gradient during the forward, chunk by chunk: one [chunk, vocab] buffer in the
    activation dtype that the cross-entropy kernel overwrites with the logits' gradient, and
    `grad_input = zeros_like(_input)`, which it saves for backward in place of the logits; `_input`
    (the final norm's output, in the residual stream's dtype) is alive until the forward returns."""
    chunk = liger_chunk_tokens(tokens, counts.vocab_size, counts.hidden_size) * counts.vocab_size * act
    hidden = tokens * (2 * counts.hidden_size * residual + LIGER_CE_TOKEN_BYTES)
    return chunk, hidden


def selective_kept_per_token(counts: ModelCounts, act: int, fused_lora_targets: tuple[LinearShape, ...] = (),
                             r: int = 0) -> int:
    """Bytes a selectively checkpointed layer keeps per token on top of its input (trainer/selective.py):
    the base GEMM output of each of SELECTIVE_KEPT_PROJECTIONS the layer has, and the attention kernel's
    output (q_dim wide), all in the activation dtype; with fused LoRA on `fused_lora_targets` (rank `r`), the
    whole-LoRA ops' A x too (whole_lora_a_x_per_token). The kernel's log-sum-exp (float32, one per head and
    token: under 1% of this for head_dim >= 64) and its RNG seed/offset are not counted."""
    kept = sum(t.out_features for t in counts.layer_linears if t.name.rsplit(".", 1)[-1] in SELECTIVE_KEPT_PROJECTIONS)
    return (kept + counts.q_dim) * act + whole_lora_a_x_per_token(fused_lora_targets, r, act)


def whole_lora_a_x_per_token(fused_lora_targets: tuple[LinearShape, ...], r: int, act: int) -> int:
    """Bytes per token of A x (rank `r` wide) that the whole-LoRA op of each of SELECTIVE_WHOLE_LORA_PROJECTIONS
    among `fused_lora_targets` keeps (trainer/fused_lora.py lora_gemm_4bit)."""
    whole = sum(1 for t in fused_lora_targets if t.name.rsplit(".", 1)[-1] in SELECTIVE_WHOLE_LORA_PROJECTIONS)
    return whole * r * act

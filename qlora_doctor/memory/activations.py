"""What one training step keeps per token: a decoder layer's saved tensors, the working memory of one
layer's backward, the head, and the loss buffers, on the plain path and with each speed lever of
`qlora_doctor/trainer/speed.py`. `estimate.py` combines them into the moments of a step.

Dtypes, in bytes: `act` is what matmuls and attention produce (the autocast dtype); `residual` is the
residual stream's, which is the embeddings' dtype: float32 after peft's prepare (upcast_unquantized),
else the compute dtype. Each count names the op that saves the tensor (torch keeps a tensor for
backward only when an op saves it; bitsandbytes' 4-bit matmul saves no input, its weight is frozen).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_doctor.memory.model import LinearShape, ModelCounts

ACTIVATION_MASK_BYTES = 1
"""Dropout keeps a bool mask (1 byte per element) for backward (`torch.native_dropout`)."""

LOGITS_FP32_COPIES = 3
"""In the loss's backward three float32 b*s*vocab tensors are alive together: log_softmax's output (saved
for its backward), the gradient of the loss w.r.t. it (from nll_loss's backward) and the gradient w.r.t. the
logits that log_softmax's backward produces (transformers' ForCausalLMLoss upcasts logits to float32)."""
LOGITS_COMPUTE_COPIES = 1
"""Plus one b*s*vocab tensor in the activation dtype (the logits lm_head produced): the calibration
measurement's peak is one such tensor above the three float32 ones."""

LIGER_CE_TOKEN_BYTES = 4 + 8 + 8 + 1
"""Liger's fused linear cross-entropy, per token besides the hidden-size tensors: the float32 per-token
loss (`loss_1d`), the padded and the shifted int64 labels (`LigerForCausalLMLoss`), the bool target mask."""

SHARED_INPUTS = (frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}))
"""Linear layers of one decoder layer that read the same tensor (the attention norm's / the MLP norm's
output): where their LoRA saves that tensor itself rather than a copy, it is kept once for the group."""


@dataclass(frozen=True)
class Levers:
    """The memory-relevant speed levers of one run (decided by `speed.speed_plan`)."""

    liger_kernel: bool
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy."""
    fused_lora: bool
    """`trainer/fused_lora.py`'s one autograd function per LoRA-on-4-bit layer."""


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
    * attention (SDPA, memory-efficient/flash: no s x s matrix): q, k, v and the output; Liger's RoPE
      saves only cos/sin, as transformers' does;
    * the MLP: SwiGLU's gate and up outputs and the activation's output; Liger's fused SwiGLU saves gate
      and up only (it recomputes silu in its backward).
    """
    h, inter = counts.hidden_size, counts.intermediate_size
    norm_saved = residual if levers.liger_kernel else max(residual, 4)
    norms = 2 * h * norm_saved
    lora = sum(r * act for _ in targets) + _lora_inputs(h, targets, act, residual, dropout, levers.fused_lora)
    attention = (2 * counts.q_dim + 2 * counts.kv_dim) * act
    if counts.gated_mlp:
        mlp = (2 if levers.liger_kernel else 3) * inter * act
    else:
        mlp = inter * act
    return norms + lora + attention + mlp


def _lora_inputs(h: int, targets: tuple[LinearShape, ...], act: int, residual: int, dropout: bool,
                 fused: bool) -> int:
    """The LoRA layers' saved inputs (see layer_saved_per_token)."""
    if dropout and not fused:
        return sum(t.in_features * (act + ACTIVATION_MASK_BYTES) for t in targets)
    total, seen = 0, set()
    for t in targets:
        short = t.name.split(".")[-1]
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


def layer_working_per_token(counts: ModelCounts, act: int, residual: int, levers: Levers) -> int:
    """The backward of one layer: gradients of the MLP's intermediate tensors (Liger's SwiGLU backward
    writes the gate and up gradients into its saved inputs, leaving one new tensor) and two gradients of
    the residual stream (in its dtype)."""
    mlp_grads = 1 if levers.liger_kernel else 3
    return mlp_grads * counts.intermediate_size * act + 2 * counts.hidden_size * residual


def head_per_token(counts: ModelCounts, act: int, residual: int, levers: Levers) -> int:
    """The final norm's saved tensor; without Liger also lm_head's input in the activation dtype (with
    Liger the fused cross-entropy keeps no input: see liger_loss_bytes)."""
    if levers.liger_kernel:
        return counts.hidden_size * residual
    return counts.hidden_size * (max(residual, 4) + act)


def full_logits_per_token(counts: ModelCounts, act: int) -> int:
    """Logits and loss buffers of transformers' loss (LOGITS_*), per token."""
    return counts.vocab_size * (LOGITS_FP32_COPIES * 4 + LOGITS_COMPUTE_COPIES * act)


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

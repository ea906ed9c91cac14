"""The speed levers of `qlora-doctor run` applied to a model and the Trainer (decided, with reasons, by
qlora_doctor/recipe/levers.py):

    model = prepare_for_training(model, recipe, plan)       # instead of peft's prepare_model_for_kbit_training
    model = get_peft_model(model, LoraConfig(...))
    apply_after_peft(model, plan)                           # fused LoRA layers
    TrainingArguments(**kwargs, **training_arguments_overrides(plan))
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

from qlora_doctor.core.hazards import AttentionScope
from qlora_doctor.recipe.levers import Lever, checkpointed_indices

if TYPE_CHECKING:
    from qlora_doctor.recipe.levers import SpeedPlan
    from qlora_doctor.recipe.schema import Recipe

def apply_process_settings(plan: SpeedPlan, device: str) -> None:
    """Levers that are torch settings of this process (each rank calls it): cuDNN attention off, or on with the
    calls a scoped knowledge-base rule names sent to the other kernels (`gate_cudnn_attention`)."""
    if device != "cuda":
        return
    import torch

    if not plan.cudnn_attention.on:
        torch.backends.cuda.enable_cudnn_sdp(False)
    elif plan.cudnn_gate:
        gate_cudnn_attention(plan.cudnn_gate)


def gate_cudnn_attention(scopes: tuple[AttentionScope, ...]) -> Callable[[], None]:
    """Route the attention calls a scope names (pytorch/pytorch#196678: an explicit mask and key length
    L % 128 == 64) away from cuDNN, and leave every other call to torch's choice (cuDNN first on Hopper).

    Wraps `torch.nn.functional.scaled_dot_product_attention`, which transformers' SDPA attention looks up at
    each call. The choice is per call and follows from the call's shapes, so a checkpointed layer's replay in
    the backward chooses as its forward did, and the backward kernel is the one of the forward's node: a call
    sent to the flash/efficient kernels never reaches cuDNN's backward. Returns the undo (the bench calls
    it between variants); installing twice replaces the earlier gate."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    functional = torch.nn.functional
    original = getattr(functional.scaled_dot_product_attention, "__qlora_wrapped__",
                       functional.scaled_dot_product_attention)
    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    @functools.wraps(original)
    def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = None, *args: Any,
                                     **kwargs: Any) -> Any:
        if any(scope.bites(key.shape[-2], attn_mask is not None) for scope in scopes):
            with sdpa_kernel(others):
                return original(query, key, value, attn_mask, *args, **kwargs)
        return original(query, key, value, attn_mask, *args, **kwargs)

    scaled_dot_product_attention.__qlora_wrapped__ = original  # type: ignore[attr-defined]
    functional.scaled_dot_product_attention = scaled_dot_product_attention

    def undo() -> None:
        functional.scaled_dot_product_attention = original

    return undo



# --- applying to the model ------------------------------------------------------------------------

def decoder_layers(model: Any) -> list[Any]:
    """The model's checkpointable blocks (transformers' GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: Any, selection: str | int | float, selective: bool | str | int | float = False,
                         offload: Any = False) -> list[int]:
    """Non-reentrant gradient checkpointing on the selected decoder layers only; returns their indices.
    `selective`: those layers keep some op outputs and recompute the rest (trainer/selective.py); True or `all`
    for every checkpointed layer, a count or fraction for the first of them (`performance.selective_layers`).
    `offload`: True, or a trainer/offload.py CheckpointOffloader: their saved inputs live in host memory
    between forward and backward (`performance.offload_checkpoints`)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = decoder_layers(model)
    chosen = checkpointed_indices(selection, len(layers))
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    offloader = None
    if offload:
        from qlora_doctor.trainer.offload import CheckpointOffloader

        offloader = offload if isinstance(offload, CheckpointOffloader) else CheckpointOffloader()
    if selective is not False:
        from qlora_doctor.trainer import offload as offload_module
        from qlora_doctor.trainer.selective import make_selective

        kept = chosen if selective is True else [chosen[i] for i in checkpointed_indices(selective, len(chosen))]
        for index in kept:
            # Offloaded, a selective layer's kept outputs wait in host memory too, except the last checkpointed
            # layer's: its backward comes right after the forward, before their copy would be of use.
            make_selective(layers[index], offloader=offloader if offload_module.OFFLOAD_SELECTIVE_CACHE else None,
                           keep_on_device=index == chosen[-1])
    if offloader is not None:
        from qlora_doctor.trainer.offload import offload_layers

        offload_layers([layers[i] for i in chosen], offloader)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return chosen


def prepare_for_training(model: Any, recipe: Recipe, plan: SpeedPlan) -> Any:
    """The base model ready for LoRA: frozen, dtypes per `upcast_unquantized`, checkpointing per the plan,
    Liger kernels applied. Replaces peft's prepare_model_for_kbit_training (which upcast=True calls)."""
    if plan.upcast_unquantized.on:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
    if plan.checkpointing.on:
        enable_checkpointing(model, plan.checkpoint_layers,
                             selective=plan.selective_layers if plan.recompute.on else False,
                             offload=plan.offload_checkpoints.on)
        model.enable_input_require_grads()  # only reentrant checkpointing needs it; harmless otherwise
    # Training needs no KV cache, and with one transformers does not detect padding-free (packed) rows
    # from their position ids, so attention would cross from one example into the next.
    model.config.use_cache = False
    if plan.liger_kernel.on:
        apply_liger(model)
    return model


def apply_liger(model: Any) -> None:
    """Liger Kernel's patches for this model instance (its RoPE patch is module-wide)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type](model=model)


def apply_after_peft(model: Any, plan: SpeedPlan) -> SpeedPlan:
    """Levers that act on the LoRA layers; returns the plan with fused_lora's outcome."""
    import dataclasses

    if not plan.fused_lora.on:
        return plan
    from qlora_doctor.trainer.fused_lora import fuse_lora_layers

    count, skipped = fuse_lora_layers(model)
    reason = f"{count} LoRA layers fused" + (f"; not fused: {'; '.join(skipped)}" if skipped else "")
    return dataclasses.replace(plan, fused_lora=Lever("fused_lora", count > 0, reason))


# --- applying to the Trainer ----------------------------------------------------------------------

def training_arguments_overrides(plan: SpeedPlan) -> dict[str, Any]:
    """TrainingArguments changes: the model's checkpointing is already set (the Trainer would
    re-enable it on every layer), grouping by length, torch.compile."""
    from qlora_doctor.trainer.arguments import training_arguments_accept

    overrides: dict[str, Any] = {}
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if training_arguments_accept(name):
            overrides[name] = False
            break
    if plan.group_by_length.on:
        if training_arguments_accept("train_sampling_strategy"):  # transformers >= 5.2x
            overrides["train_sampling_strategy"] = "group_by_length"
        elif training_arguments_accept("group_by_length"):
            overrides["group_by_length"] = True
    if plan.torch_compile.on:
        overrides["torch_compile"] = True
    return overrides


# --- the doctor's view ----------------------------------------------------------------------------


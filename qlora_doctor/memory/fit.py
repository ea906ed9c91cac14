"""Training settings that fit a GPU, chosen with the memory planner: the largest micro-batch (of a fixed
effective batch) at the longest wanted sequence length whose predicted total stays within
AUTO_CHECKPOINT_SHARE of the GPU's memory. Used by `qlora-doctor init` to write a starter recipe that
`qlora-doctor plan` accepts as written.

Each candidate is planned by `plan_recipe`, the function `qlora-doctor plan` and the doctor's memory check
use, so a choice made here is the prediction those commands will show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora_doctor.memory.plan import AUTO_CHECKPOINT_SHARE, SEQ_STEP, Plan, plan_recipe

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.schema import Recipe

MICRO_BATCHES = (16, 8, 4, 2, 1)
"""Micro-batches tried, largest first (each divides the effective batch when it is a multiple of 16)."""


@dataclass(frozen=True)
class Fit:
    """The settings chosen for one machine, and the plan that justifies them."""

    micro_batch: int
    grad_accum: int
    seq_len: int
    plan: Plan
    """The planner's prediction for these settings (on the machine's smallest NVIDIA GPU)."""
    budget_bytes: int | None
    """AUTO_CHECKPOINT_SHARE of the GPU's memory; None without a GPU or when its memory is unknown."""
    fits: bool | None
    """plan.total_bytes <= budget_bytes; None when there is nothing to compare with."""
    shortened: bool
    """The wanted sequence length did not fit at micro-batch 1 and was lowered."""


def fit_training(recipe: Recipe, machine: Machine, effective_batch: int = 16, allow_network: bool = True) -> Fit:
    """`recipe` (gradient checkpointing and checkpoint_layers as it says) at the largest micro-batch of
    MICRO_BATCHES that divides `effective_batch` and fits, at its max_seq_length; when not even micro-batch 1
    fits, at the longest multiple of SEQ_STEP that does. Without a GPU to plan against (or with its memory
    unknown), the recipe's own batch and length are kept and `fits` is None."""
    t = recipe.training
    first = plan_recipe(recipe, machine, allow_network=allow_network)
    gpu_bytes = first.gpu_bytes
    if gpu_bytes is None:
        return Fit(micro_batch=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
                   seq_len=t.max_seq_length, plan=first, budget_bytes=None, fits=None, shortened=False)
    budget = int(AUTO_CHECKPOINT_SHARE * gpu_bytes)
    batches = [b for b in MICRO_BATCHES if b <= effective_batch and effective_batch % b == 0] or [1]
    seq_lens = [t.max_seq_length] + [s for s in range((t.max_seq_length - 1) // SEQ_STEP * SEQ_STEP, 0, -SEQ_STEP)]
    last = None
    for seq_len in seq_lens:
        for batch in batches:
            candidate = _with(recipe, batch, effective_batch // batch, seq_len)
            plan = plan_recipe(candidate, machine, allow_network=allow_network)
            last = (batch, seq_len, plan)
            if plan.total_bytes <= budget:
                return Fit(micro_batch=batch, grad_accum=effective_batch // batch, seq_len=seq_len, plan=plan,
                           budget_bytes=budget, fits=True, shortened=seq_len != t.max_seq_length)
        if seq_len <= SEQ_STEP:
            break
    assert last is not None
    batch, seq_len, plan = last
    return Fit(micro_batch=batch, grad_accum=effective_batch // batch, seq_len=seq_len, plan=plan,
               budget_bytes=budget, fits=False, shortened=seq_len != t.max_seq_length)


def _with(recipe: Recipe, micro_batch: int, grad_accum: int, seq_len: int) -> Recipe:
    training = recipe.training.model_copy(update={
        "per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": grad_accum,
        "max_seq_length": seq_len, "per_device_eval_batch_size": None})
    return recipe.model_copy(update={"training": training})

"""A recipe's `training:` section as `transformers.TrainingArguments` keyword arguments, for the
transformers version installed (renames between 4.x and 5.x handled here)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe


def training_arguments_kwargs(recipe: Recipe, precision: Precision) -> dict[str, Any]:
    """Keyword arguments for `transformers.TrainingArguments` (all but `max_seq_length`, which the
    data pipeline uses, and `watch`/`early_stopping_patience`, which trainer/watch.py applies). Handles the
    transformers 5 rename of `warmup_ratio` into a float `warmup_steps`."""
    t = recipe.training
    kwargs = t.model_dump(exclude={"max_seq_length", "fp16", "bf16", "num_train_epochs", "max_steps",
                                   "warmup_ratio", "warmup_steps", "per_device_eval_batch_size", "eval_steps",
                                   "eval_strategy", "watch", "early_stopping_patience", "run_name", "project"})
    kwargs.update(
        fp16=precision.fp16, bf16=precision.bf16, num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        per_device_eval_batch_size=t.per_device_eval_batch_size or t.per_device_train_batch_size,
        eval_strategy=t.eval_strategy if recipe.evaluates else "no",
        eval_steps=t.eval_steps or t.save_steps,
        use_cpu=precision.device == "cpu",
        run_name=run_name(recipe),
    )
    if t.project is not None and training_arguments_accept("project"):  # Trackio's project (transformers >= 5)
        kwargs["project"] = t.project
    if t.warmup_steps is not None:
        kwargs["warmup_steps"] = t.warmup_steps
    else:
        ratio = 0.03 if t.warmup_ratio is None else t.warmup_ratio
        if training_arguments_accept("warmup_ratio"):
            kwargs["warmup_ratio"] = ratio
        else:  # transformers >= 5: a float in [0, 1) is a ratio of the total steps
            kwargs["warmup_steps"] = ratio
    if recipe.distributed.strategy != "none":
        # Every LoRA weight gets a gradient each step; without this DDP walks the graph for unused ones.
        kwargs["ddp_find_unused_parameters"] = False
    if not training_arguments_accept("gradient_checkpointing") or training_arguments_accept(
            "activation_checkpointing"):  # transformers 5.x renamed it and warns on the old name
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return kwargs


def run_name(recipe: Recipe) -> str:
    """`training.run_name`, else the output folder's name (`runs/demo` -> `demo`): the run's name in W&B, MLflow,
    Trackio, Comet and SwanLab. (transformers' own default is the whole output_dir path, which W&B warns about.)"""
    import os

    t = recipe.training
    return t.run_name or os.path.basename(os.path.normpath(t.output_dir))


def integration_environment(recipe: Recipe) -> dict[str, str]:
    """Environment variables that carry `training.project` to the report_to integrations that read one
    (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, ...: recipe/integrations.toml, with the transformers lines that read
    each). Set them before the Trainer is made; empty when the recipe names no project."""
    from qlora_doctor.recipe.integrations import project_environment

    return project_environment(recipe.training.report_targets, recipe.training.project)


@functools.lru_cache(maxsize=None)
def training_arguments_accept(name: str) -> bool:
    import dataclasses

    from transformers import TrainingArguments

    return any(f.name == name for f in dataclasses.fields(TrainingArguments))

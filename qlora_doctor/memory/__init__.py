"""Memory planner: predict a QLoRA run's peak GPU memory from the model's config and the recipe, before
anything is downloaded, and say what fits (`qlora-doctor plan`).

    model.py     the config (builtin, local folder or hub) and parameters counted on the meta device
    estimate.py  the peak of one training step, part by part, with every constant explained
    activations.py  what a step keeps per token, on the plain path and with each speed lever
    plan.py      the fit against the machine's smallest GPU, and suggestions when it does not fit
    render.py    the terminal table (used by the CLI only)
"""

from qlora_doctor.memory.estimate import Estimate, TrainSettings, estimate
from qlora_doctor.memory.model import ModelCounts, count_parameters, load_model_config
from qlora_doctor.memory.plan import Plan, Suggestion, plan_config, plan_for, plan_recipe, settings_from_recipe

__all__ = ["Estimate", "ModelCounts", "Plan", "Suggestion", "TrainSettings", "count_parameters", "estimate",
           "load_model_config", "plan_config", "plan_for", "plan_recipe", "settings_from_recipe"]

"""The doctor's memory-fit check: `qlora-doctor check --recipe R` asks the planner whether R fits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_doctor.core.report import Check
from qlora_doctor.memory.estimate import GIB

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.runplan import RunPlan

CHECK_ID = "recipe.memory"
TITLE = "GPU memory for the recipe"


def memory_fit_check(run: RunPlan, machine: Machine) -> Check | None:
    """FAILED when the run plan's memory prediction does not fit the smallest GPU (the fix lists what
    would), unknown when that GPU's memory or the model's config cannot be read, None (no check) on a
    machine without an NVIDIA GPU or for fsdp (one rank holds a shard: doctor/distributed.py judges that)."""
    recipe, plan = run.recipe, run.memory
    if not machine.nvidia_gpus or recipe.distributed.strategy == "fsdp":
        return None
    if plan is None:  # config unreadable offline (no hub), or torch/transformers missing
        return Check(CHECK_ID, "unknown", TITLE, f"cannot plan memory: {run.memory_error}",
                     fix=f"run `qlora-doctor plan RECIPE` where {recipe.model.name_or_path}'s config can be read "
                         "and torch + transformers import", found="not planned")
    found = f"{plan.total_bytes / GIB:.1f} GiB predicted"
    if plan.gpu_bytes is None:
        return Check(CHECK_ID, "unknown", TITLE,
                     f"{found}, but the memory of {plan.gpu_name} could not be read",
                     fix="add memory_total_mib to the GPU in the --machine file, or run `nvidia-smi`",
                     found=found, expected="the GPU's memory")
    expected = f"<= {plan.gpu_bytes / GIB:.1f} GiB ({plan.gpu_name})"
    settings = plan.settings
    step = (f"micro-batch {settings.micro_batch} x {settings.seq_len} tokens, checkpointing "
            f"{'on' if settings.gradient_checkpointing else 'off'}, {settings.optim}")
    if plan.fits:
        return Check(CHECK_ID, "pass", TITLE, f"{step}: {found}, {(plan.gpu_bytes - plan.total_bytes) / GIB:.1f} "
                     f"GiB to spare on {plan.gpu_name}", found=found, expected=expected)
    fitting = [s.text for s in plan.suggestions if s.fits]
    others = [s.text for s in plan.suggestions if not s.fits]
    fix = ("any one of: " + "; ".join(fitting)) if fitting else "; ".join(others)
    return Check(CHECK_ID, "fail", TITLE,
                 f"{step}: {found}, {(plan.total_bytes - plan.gpu_bytes) / GIB:.1f} GiB more than {plan.gpu_name} "
                 f"has, so training would stop with CUDA out of memory (`qlora-doctor plan` shows the breakdown)",
                 fix=fix, found=found, expected=expected)

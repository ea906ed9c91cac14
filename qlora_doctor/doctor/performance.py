"""`check --recipe`: the recipe's speed levers (performance:) as the run will decide them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_doctor.core.report import Check

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.runplan import RunPlan


LIGER_SOURCES = ("https://github.com/linkedin/Liger-Kernel#high-level-apis",)
FP8_SOURCES = ("https://docs.pytorch.org/ao/stable/workflows/training.html",
               "https://github.com/pytorch/ao/issues/2919")  # torchao's float8 training; its torch compatibility


def performance_check(run: RunPlan, machine: Machine | None = None) -> Check:
    """`check --recipe`: which speed levers will be on, and for those asked for but unavailable, why.
    warn: a lever set to `true` cannot be used; fail: `fp8_base: true` cannot be (no FP8 tensor cores, no
    torchao); pass otherwise (an `auto` lever that stays off is said). The numerics trade of fp8_base is the
    recipe rule fp8-base-numerics (knowledge/data/recipe_rules.toml)."""
    plan = run.levers
    perf = run.recipe.performance
    on = [lever.name for lever in plan.levers() if lever.on]
    found = ", ".join(f"{lever.name}={'on' if lever.on else 'off'}" for lever in plan.levers())
    if perf.fp8_base and not plan.fp8_base.on:
        return fp8_base_refused(plan.fp8_base.reason, found)
    forced_off = [lever for lever in plan.levers()
                  if getattr(perf, lever.name, None) is True and not lever.on
                  and lever.name not in ("upcast_unquantized", "fp8_base")]
    auto_off = [lever for lever in plan.levers() if getattr(perf, lever.name, None) == "auto" and not lever.on]
    detail = "on: " + (", ".join(on) or "none")
    if plan.offload_checkpoints.on:  # a trade the recipe opted into: say what it does
        detail += f"; offload_checkpoints: {plan.offload_checkpoints.reason}"
    if plan.cudnn_gate:  # on, with the calls a knowledge-base rule names sent elsewhere: say which
        detail += f"; cudnn_attention: {plan.cudnn_attention.reason}"
    if auto_off:
        detail += "; auto and off: " + "; ".join(f"{lever.name} ({lever.reason})" for lever in auto_off)
    title = "Speed levers (performance:)"
    if forced_off:
        lever = forced_off[0]
        fix = ("install it (`pip install liger-kernel`) or set `performance.liger_kernel: auto`"
               if lever.name == "liger_kernel" and "not installed" in lever.reason
               else f"set `performance.{lever.name}: false` in the recipe" if lever.name == "offload_checkpoints"
               else f"set `performance.{lever.name}: auto` in the recipe")
        return Check("recipe.performance", "warn", title,
                     "; ".join(f"performance.{lv.name}: true but {lv.reason}" for lv in forced_off) + f" ({detail})",
                     fix=fix, sources=LIGER_SOURCES if lever.name == "liger_kernel" else (),
                     found=found, expected="every lever set to true available")
    return Check("recipe.performance", "pass", title, detail, found=found, expected="auto")


def fp8_base_refused(reason: str, found: str) -> Check:
    """`performance.fp8_base: true` where it cannot run: fail (the recipe asks for a numerics change the machine
    cannot make), with the one command or recipe edit that fixes it."""
    from qlora_doctor.recipe.levers import TORCHAO_REQUIREMENT

    if "torchao is not installed" in reason:
        fix = f"pip install '{TORCHAO_REQUIREMENT}'"
    elif "torchao" in reason:
        fix = f"add `{TORCHAO_REQUIREMENT}` to the requirements"
    else:
        fix = "set `performance.fp8_base: false` in the recipe (bf16 base GEMMs)"
    return Check("recipe.performance", "fail", "Speed levers (performance:)",
                 f"performance.fp8_base: true but {reason}", fix=fix, sources=FP8_SOURCES, found=found,
                 expected="fp8_base on a GPU with compute capability >= 8.9, with torchao installed")

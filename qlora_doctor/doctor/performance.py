"""`check --recipe`: the recipe's speed levers (performance:) as the run will decide them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_doctor.core.report import Check

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.runplan import RunPlan


LIGER_SOURCES = ("https://github.com/linkedin/Liger-Kernel#high-level-apis",)


def performance_check(run: RunPlan, machine: Machine | None = None) -> Check:
    """`check --recipe`: which speed levers will be on, and for those asked for but unavailable, why.
    warn: a lever set to `true` cannot be used; pass otherwise (an `auto` lever that stays off is said)."""
    plan = run.levers
    perf = run.recipe.performance
    on = [lever.name for lever in plan.levers() if lever.on]
    forced_off = [lever for lever in plan.levers()
                  if getattr(perf, lever.name, None) is True and not lever.on and lever.name != "upcast_unquantized"]
    auto_off = [lever for lever in plan.levers() if getattr(perf, lever.name, None) == "auto" and not lever.on]
    detail = "on: " + (", ".join(on) or "none")
    if auto_off:
        detail += "; auto and off: " + "; ".join(f"{lever.name} ({lever.reason})" for lever in auto_off)
    found = ", ".join(f"{lever.name}={'on' if lever.on else 'off'}" for lever in plan.levers())
    title = "Speed levers (performance:)"
    if forced_off:
        lever = forced_off[0]
        fix = ("install it (`pip install liger-kernel`) or set `performance.liger_kernel: auto`"
               if lever.name == "liger_kernel" and "not installed" in lever.reason
               else f"set `performance.{lever.name}: auto` in the recipe")
        return Check("recipe.performance", "warn", title,
                     "; ".join(f"performance.{lv.name}: true but {lv.reason}" for lv in forced_off) + f" ({detail})",
                     fix=fix, sources=LIGER_SOURCES if lever.name == "liger_kernel" else (),
                     found=found, expected="every lever set to true available")
    return Check("recipe.performance", "pass", title, detail, found=found, expected="auto")

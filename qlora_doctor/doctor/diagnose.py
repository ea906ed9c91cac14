"""`qlora-doctor check`: judge a machine + an environment (+ a recipe's run plan) and return a Report.

The order of the report: what the machine has, what is installed, whether torch's build can run on
this driver and these GPUs, whether bitsandbytes ships a library for that build, then every rule of
the knowledge base that fires (or cannot be judged), then recipe-aware checks and the smoke test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_doctor.core.report import Check, Report
from qlora_doctor.doctor.environment import environment_checks, uses_of
from qlora_doctor.doctor.tested import tested_status
from qlora_doctor.sources.installed import installed_environment

if TYPE_CHECKING:
    from qlora_doctor.core.environment import Environment
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.doctor.resolved import Additions
    from qlora_doctor.recipe.schema import Recipe
    from qlora_doctor.runplan import RunPlan


def diagnose(machine: Machine, env: Environment | None = None, *, run_plan: RunPlan | None = None,
             recipe: Recipe | None = None, smoke: bool = False, smoke_timeout: int = 180,
             extra_checks: list[Check] | None = None, additions: Additions | None = None) -> Report:
    """Everything `check` reports about `machine` and `env` (default: the installed packages), plus the
    recipe checks of `run_plan` (or of a run plan built here for `recipe`) and the smoke test."""
    if env is None:
        env = installed_environment()
    if run_plan is None and recipe is not None:
        from qlora_doctor.runplan import build_run_plan

        run_plan = build_run_plan(recipe, machine, env, where="recipe")
    uses = None if run_plan is None else uses_of(run_plan)
    checks = [*(extra_checks or []), *environment_checks(machine, env, uses)]
    if additions is not None:  # `check -r` of a file leaving out bitsandbytes, peft...: judged with them added
        from qlora_doctor.doctor.resolved import judge_additions

        with_them = environment_checks(machine, additions.env, uses) if additions.env is not None else []
        checks = judge_additions(checks, additions, with_them)
    if run_plan is not None:
        from qlora_doctor.doctor.recipe import recipe_checks

        checks += recipe_checks(run_plan, machine)
    if smoke:
        from qlora_doctor.doctor.smoke import smoke_check

        checks.append(smoke_check(timeout_s=smoke_timeout))
    tested, tested_check = tested_status(machine, env)
    checks.append(tested_check)
    return Report(checks=tuple(checks), machine=machine.to_json(), packages=env.to_json(), tested=tested)

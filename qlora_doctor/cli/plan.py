"""`qlora-doctor plan`: the memory planner."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import echo_json, echo_rendered, json_option, load_machine, machine_option
from qlora_doctor.core.errors import EXIT_FAIL, EXIT_OK


@click.command()
@click.argument("recipe", type=str)
@machine_option
@json_option
def plan(recipe: str, machine_file: Path | None, as_json: bool) -> None:
    """Predict RECIPE's peak GPU memory (name or path) from the model's config alone, and say what fits.

    Judges the smallest GPU of this machine (or of --machine FILE). Exit 0 when it fits (or when the
    GPU's memory is unknown or there is no GPU: nothing to compare), 1 when it does not fit, 2 for a
    bad recipe, machine file or unreadable model config.
    """
    from qlora_doctor.memory.plan import plan_recipe
    from qlora_doctor.recipe.schema import load_recipe

    result = plan_recipe(load_recipe(recipe), load_machine(machine_file))
    if as_json:
        echo_json(result.to_json())
    else:
        from qlora_doctor.cli.render_plan import render_plan

        echo_rendered(render_plan, result)
    sys.exit(EXIT_FAIL if result.fits is False else EXIT_OK)

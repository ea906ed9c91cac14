"""`qlora-doctor validate` and `schema`: recipes without loading anything heavy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from qlora_doctor.cli.options import echo_json, json_option


@click.command()
@click.argument("recipe_name", metavar="RECIPE")
@json_option
def validate(recipe_name: str, as_json: bool) -> None:
    """Check a recipe (a name like `demo`, or a path) without loading anything heavy.

    Exit 0 with a one-line summary (and a warning for each recipe rule that fires, with why, the fix and
    its sources), 2 with every problem, each naming the file and the key.
    """
    from qlora_doctor.recipe.schema import display_path, find_recipe, load_recipe, recipe_summary

    from qlora_doctor.core.errors import InputError
    from qlora_doctor.recipe.preflight import preflight_problems

    path = find_recipe(recipe_name)
    recipe = load_recipe(path)
    from qlora_doctor.doctor.sanity import sanity_findings

    problems = preflight_problems(recipe, display_path(path))  # the data's fields, logging integrations
    # The recipe rules (knowledge/data/recipe_rules.toml): a `fail` one means the run cannot work (exit 2
    # with the other problems); warnings are printed and leave the exit code 0.
    findings = sanity_findings(recipe)
    problems += [f"{display_path(path)}: {c.detail}; {c.fix}" for c in findings if c.status == "fail"]
    if problems:
        raise InputError(problems)
    warnings = [c for c in findings if c.status == "warn"]
    if as_json:
        echo_json({"recipe": display_path(path), "valid": True, "resolved": recipe.model_dump(mode="json"),
                   "warnings": [c.to_json() for c in warnings]})
    else:
        click.echo(f"OK {display_path(path)}: {recipe_summary(recipe)}")
        for c in warnings:
            click.echo(f"warning: {c.found}: {c.title} [{c.id.removeprefix('recipe.sanity.')}]\n"
                       f"  why: {c.detail.removeprefix(c.found).lstrip(': ')}\n  fix: {c.fix}\n  sources: {', '.join(c.sources)}")


@click.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the schema to this file instead of printing it.")
@click.option("--report", type=click.Choice(["check", "explain", "error"]), default=None,
              help="The schema of a --json report instead of the recipe's.")
def schema(output: Path | None, report: str | None) -> None:
    """Print the recipe's JSON Schema, for editor completion and checking (or, with --report, that of a
    command's --json document).

    e.g. `qlora-doctor schema -o recipe.schema.json`, then start a recipe with
    `# yaml-language-server: $schema=recipe.schema.json`.
    """
    if report is not None:
        from qlora_doctor.core.schemas import json_schema

        data = json_schema(report)
    else:
        from qlora_doctor.recipe.schema import recipe_json_schema

        data = recipe_json_schema()
    text = json.dumps(data, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        from qlora_doctor.core.fileio import write_atomic

        write_atomic(output, text)
        click.echo(f"wrote {output}")

"""Command line: parse options, call the library, render. The only module that prints or exits.

Heavy imports (torch, transformers, rich, yaml, pydantic) stay inside the commands that need them so
that `qlora-doctor --help` and the fast path of `check` start instantly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from qlora_doctor import __version__
from qlora_doctor.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, DoctorError


class DoctorGroup(click.Group):
    """Routes every user-facing error through one place: message on stderr, exit code from the error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DoctorError as err:
            from qlora_doctor.redact import redact

            for message in err.messages:
                click.echo(f"error: {redact(message)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


# --- shared options, defined once -------------------------------------------------------------

def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def machine_option(f: Callable) -> Callable:
    return click.option(
        "--machine",
        "machine_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Judge the machine described in this JSON file instead of probing this one.",
    )(f)


def verbose_option(f: Callable) -> Callable:
    return click.option("-v", "--verbose", is_flag=True, help="Show passing checks and probe notes.")(f)


def load_machine(machine_file: Path | None):
    """The machine to judge: the `--machine` file, else the QLORA_DOCTOR_MACHINE file, else a probe."""
    from qlora_doctor.doctor import machine as machine_mod

    if machine_file is not None:
        return machine_mod.load_machine_file(machine_file)
    return machine_mod.probe_machine()


def echo_json(data: Any) -> None:
    """Print `data` as JSON, with secrets redacted (qlora_doctor/redact.py)."""
    from qlora_doctor.redact import redact_data

    click.echo(json.dumps(redact_data(data), indent=2, sort_keys=False))


@click.group(cls=DoctorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qlora-doctor")
def cli() -> None:
    """Diagnose, pin and run QLoRA fine-tunes on one GPU."""


def main() -> None:
    cli(prog_name="qlora-doctor")


# --- doctor: check, explain -------------------------------------------------------------------

@cli.command()
@json_option
@machine_option
@verbose_option
@click.option("--save-machine", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the probed machine to this JSON file (the --machine format).")
@click.option("--requirements", "-r", "requirements_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Judge this pip requirements file (name==version) instead of the installed packages.")
@click.option("--recipe", "recipe_file", type=str,
              help="Add recipe-aware checks (bf16 vs the GPU, memory fit) for this recipe (name or path).")
@click.option("--smoke", is_flag=True, help="Also run a functional test (bitsandbytes + LoRA) in a subprocess.")
@click.option("--smoke-timeout", type=click.IntRange(min=1), default=180, show_default=True,
              help="Seconds before the functional test counts as hung.")
def check(as_json: bool, machine_file: Path | None, verbose: bool, save_machine: Path | None,
          requirements_file: Path | None, recipe_file: str | None, smoke: bool, smoke_timeout: int) -> None:
    """Judge this environment (or a proposed one) for QLoRA training.

    Exit 0 for pass or warnings, 1 when a check fails, 2 for a bad input file.
    """
    from qlora_doctor.doctor.checks import diagnose

    machine = load_machine(machine_file)
    if save_machine is not None:
        from qlora_doctor.doctor.machine import save_machine_file

        save_machine_file(machine, save_machine)
    report = diagnose(machine, requirements_file=requirements_file, recipe=recipe_file,
                      smoke=smoke, smoke_timeout=smoke_timeout)
    if as_json:
        echo_json(report.to_json())
    else:
        from qlora_doctor.doctor.render import print_report
        from qlora_doctor.redact import redact_data

        print_report(redact_data(report), verbose=verbose)
    sys.exit(EXIT_FAIL if report.status == "fail" else EXIT_OK)


@cli.command()
@click.argument("log", type=click.File("r", encoding="utf-8", errors="replace"), default="-")
@json_option
def explain(log, as_json: bool) -> None:
    """Explain a pasted error, traceback or training log (a FILE, or - for stdin).

    Exit 0 when a known failure matched, 1 when nothing did.
    """
    from qlora_doctor.doctor.explain import explain_text

    matches = explain_text(log.read())
    if as_json:
        echo_json({"matches": [m.to_json() for m in matches]})
    else:
        from qlora_doctor.doctor.render import print_matches

        print_matches(matches)
    sys.exit(EXIT_OK if matches else EXIT_FAIL)


# --- trainer: validate, schema, run, generate, merge (trainer section) ------------------------

@cli.command()
@click.argument("recipe_name", metavar="RECIPE")
@json_option
def validate(recipe_name: str, as_json: bool) -> None:
    """Check a recipe (a name like `demo`, or a path) without loading anything heavy.

    Exit 0 with a one-line summary, 2 with every problem, each naming the file and the key.
    """
    from qlora_doctor.trainer.recipe import display_path, find_recipe, load_recipe, recipe_summary

    path = find_recipe(recipe_name)
    recipe = load_recipe(path)
    if as_json:
        echo_json({"recipe": display_path(path), "valid": True, "resolved": recipe.model_dump(mode="json")})
    else:
        click.echo(f"OK {display_path(path)}: {recipe_summary(recipe)}")


@cli.command()
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the schema to this file instead of printing it.")
def schema(output: Path | None) -> None:
    """Print the recipe's JSON Schema, for editor completion and checking.

    e.g. `qlora-doctor schema -o recipe.schema.json`, then start a recipe with
    `# yaml-language-server: $schema=recipe.schema.json`.
    """
    from qlora_doctor.trainer.recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        from qlora_doctor.fileio import write_atomic

        write_atomic(output, text)
        click.echo(f"wrote {output}")



# --- memory planner: plan (planner section) ---------------------------------------------------

@cli.command()
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
    from qlora_doctor.trainer.recipe import load_recipe

    result = plan_recipe(load_recipe(recipe), load_machine(machine_file))
    if as_json:
        echo_json(result.to_json())
    else:
        from qlora_doctor.memory.render import print_plan

        print_plan(result)
    sys.exit(EXIT_FAIL if result.fits is False else EXIT_OK)


# --- matrix, smoke, lock, constraints (matrix section) ----------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()

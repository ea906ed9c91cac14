"""`qlora-doctor matrix run|report|ci`: the compatibility matrix."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import (_combos, _results, combos_option, echo_json, json_option, load_machine,
                                      machine_option, results_option)
from qlora_doctor.core.errors import EXIT_FAIL, EXIT_OK


@click.group()
def matrix() -> None:
    """The compatibility matrix: run combinations, report, generate CI."""


@matrix.command("run")
@combos_option
@results_option
@machine_option
@click.option("--only", multiple=True, help="Run only this combination (repeatable).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Combinations built and tested at once.")
@click.option("--in-place", is_flag=True,
              help="Record the current environment against the --only combination(s) instead of building one.")
@click.option("--installer", type=click.Choice(["auto", "pip", "uv"]), default="auto", show_default=True,
              help="auto: uv when it can be run, else pip. uv gets pip's configured find-links and indexes.")
@click.option("--resume", is_flag=True,
              help="Skip combinations already recorded (as matrix.yaml describes them now) in --results: "
                   "continues an interrupted run.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where built environments are kept, keyed by their pins (default ~/.cache/qlora-doctor/matrix-envs).")
def matrix_run(combos_file, results_dir, machine_file, only, jobs, in_place, installer, resume, cache_dir) -> None:
    """Build each combination's env, run check and smoke in it, write one JSON record each.

    Exit 0 when every record agrees with matrix.yaml (expected passes pass, known-bad ones fail the
    documented way), 1 otherwise.
    """
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.matrix.combos import select
    from qlora_doctor.matrix.runner import RunOptions, default_cache_dir, resolve_installer, run_matrix

    where = str(combos_file or "matrix.yaml")
    combos = select(_combos(combos_file), tuple(only), where)
    if in_place and not only:
        raise InputError("--in-place records the current environment: name its combination with --only NAME")
    machine = load_machine(machine_file)
    options = RunOptions(results_dir=_results(results_dir), cache_dir=cache_dir or default_cache_dir(),
                         installer=resolve_installer(installer))
    summary = run_matrix(combos, machine, options, jobs=jobs, in_place=in_place,
                         progress=lambda m: click.echo(m, err=True), resume=resume)
    for skipped in summary.skipped:
        click.echo(f"skipped {skipped.name}: {skipped.reason}", err=True)
    if only and summary.skipped and not resume:
        raise InputError([f"--only {s.name}: {s.reason}" + ("" if "interpreter" in s.reason else
                                                             "; run it on a matching machine")
                          for s in summary.skipped])
    for record, path in zip(summary.records, summary.paths):
        mark = "ok  " if record.verdict == "pass" else "FAIL"
        click.echo(f"{mark} {record.name} on {record.platform}: {record.verdict_detail} -> {path}")
    sys.exit(EXIT_OK if summary.ok else EXIT_FAIL)


@matrix.command("report")
@combos_option
@results_option
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@json_option
def matrix_report(combos_file, results_dir, markdown, as_json) -> None:
    """Table of combinations x platforms from the records. Exit 1 when a record disagrees with matrix.yaml."""
    from qlora_doctor.matrix.records import load_records
    from qlora_doctor.matrix.report import build_table, render_markdown, render_text

    combos = _combos(combos_file)
    table = build_table(combos, load_records(_results(results_dir)))
    if as_json:
        echo_json(table.to_json())
    else:
        click.echo((render_markdown if markdown else render_text)(table, combos), nl=False)
    sys.exit(EXIT_OK if table.all_ok else EXIT_FAIL)


@matrix.command("ci")
@combos_option
@click.option("--github", is_flag=True, required=True, help="Write a GitHub Actions workflow.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (e.g. .github/workflows/matrix.yml) instead of printing.")
def matrix_ci(combos_file, github, output) -> None:
    """Generate the CI workflow whose job matrix comes from matrix.yaml."""
    from qlora_doctor.core.fileio import write_atomic
    from qlora_doctor.matrix.ci import github_workflow

    text = github_workflow(_combos(combos_file))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)

"""`qlora-doctor check` and `explain`: the doctor."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import (echo_json, echo_rendered, json_option, load_environment, load_machine,
                                      machine_option, verbose_option)
from qlora_doctor.core.errors import EXIT_FAIL, EXIT_OK


@click.command()
@json_option
@machine_option
@verbose_option
@click.option("--save-machine", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the probed machine to this JSON file (the --machine format).")
@click.option("--requirements", "-r", "requirements_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Judge what installing this requirements file gives (resolved with uv for the machine) "
                   "instead of the installed packages; also pylock.toml, pyproject.toml[extra,...], or a pasted "
                   "pip list / conda list / collect_env report.")
@click.option("--no-resolve", is_flag=True, help="With -r: judge the file's lines only (exact pins), not what pip pulls.")
@click.option("--as-of", "as_of", type=str, default=None, metavar="YYYY-MM-DD",
              help="With -r: resolve as of this date (the releases that existed then).")
@click.option("--resolver", type=click.Choice(["auto", "snapshot"]), default="auto", show_default=True,
              help="With -r: auto resolves with uv (pip without uv), falling back to qlora-doctor's bundled snapshot "
                   "of PyPI metadata when no index answers; snapshot uses only the snapshot (offline, reproducible).")
@click.option("--recipe", "recipe_file", type=str,
              help="Add recipe-aware checks (bf16 vs the GPU, memory fit) for this recipe (name or path).")
@click.option("--smoke", is_flag=True, help="Also run a functional test (bitsandbytes + LoRA) in a subprocess.")
@click.option("--smoke-timeout", type=click.IntRange(min=1), default=180, show_default=True,
              help="Seconds before the functional test counts as hung.")
def check(as_json: bool, machine_file: Path | None, verbose: bool, save_machine: Path | None,
          requirements_file: Path | None, no_resolve: bool, as_of: str | None, resolver: str, recipe_file: str | None,
          smoke: bool, smoke_timeout: int) -> None:
    """Judge this environment (or a proposed one) for QLoRA training.

    Exit 0 for pass or warnings, 1 when a check fails, 2 for a bad input file.
    """
    from qlora_doctor.doctor.diagnose import diagnose

    machine = load_machine(machine_file)
    if save_machine is not None:
        from qlora_doctor.core.machine import save_machine_file

        save_machine_file(machine, save_machine)
    extra: list = []
    additions = None
    if requirements_file is not None:
        from qlora_doctor.doctor.resolved import judge_requirements

        if no_resolve and resolver == "snapshot":
            from qlora_doctor.core.errors import InputError

            raise InputError("--no-resolve and --resolver snapshot cannot be combined; pick one")
        env, extra, additions = judge_requirements(requirements_file, machine, resolve=not no_resolve, as_of=as_of,
                                                   resolver=resolver)
    else:
        env = load_environment(None)
    run_plan = None
    if recipe_file is not None:
        from qlora_doctor.recipe.schema import display_path, find_recipe, load_recipe
        from qlora_doctor.runplan import build_run_plan

        path = find_recipe(recipe_file)
        run_plan = build_run_plan(load_recipe(path), machine, env, where=display_path(path))
    report = diagnose(machine, env, run_plan=run_plan, smoke=smoke, smoke_timeout=smoke_timeout, extra_checks=extra,
                      additions=additions)
    if as_json:
        echo_json(report.to_json())
    else:
        from qlora_doctor.cli.render import render_report
        from qlora_doctor.core.redact import redact_data

        echo_rendered(render_report, redact_data(report), verbose=verbose)
    sys.exit(EXIT_FAIL if report.status == "fail" else EXIT_OK)


@click.command()
@click.argument("log", type=click.Path(allow_dash=True, path_type=str), default="-", metavar="[FILE|RUN_DIR|-]")
@json_option
def explain(log: str, as_json: bool) -> None:
    """Explain a pasted error, traceback or training log (a FILE, or - for stdin), or a run folder.

    A RUN_DIR (a run's training.output_dir) is judged from its metrics.json or newest checkpoint and its
    recipe.yaml, as the run's watchdog judges it live: NaN or diverging loss, no learning, overfitting,
    each with the recipe value to change. A pasted Trainer log with no error line is judged the same way.

    Exit 0 when a known failure or a training problem was found, 1 when nothing was, 2 when the input
    cannot be read.
    """
    from qlora_doctor.core.errors import InputError

    if log != "-" and Path(log).is_dir():
        from qlora_doctor.trainer.watch import diagnose_run_dir

        diagnosis = diagnose_run_dir(Path(log))
        if as_json:
            echo_json({"run_dir": log, **diagnosis.to_json()})
        else:
            click.echo(_render_findings(diagnosis.findings, f"{log} ({diagnosis.records} log records from "
                                        f"{Path(diagnosis.source).name}, status {diagnosis.status or 'unknown'})"),
                       nl=False)
        sys.exit(EXIT_OK if diagnosis.findings else EXIT_FAIL)
    try:
        with click.open_file(log, "r", encoding="utf-8", errors="replace") as stream:
            text = stream.read()
    except OSError as err:
        raise InputError(f"{log}: cannot read it ({err.strerror or err}); pass a file, a run folder or - for stdin")
    if not text.strip():
        raise InputError(f"{'standard input' if log == '-' else log}: the text is empty; paste the error with its "
                         "traceback (or the training log) into the file, or pipe it: `qlora-doctor explain - < err.txt`")

    from qlora_doctor.doctor.paste import judge_pasted_versions
    from qlora_doctor.knowledge.explain import explain_text

    explanation = explain_text(text)
    version_checks = judge_pasted_versions(explanation.facts.packages)
    findings: list = []
    if not explanation.matches and not any(c.status == "fail" for c in version_checks):
        # no error line: judge the Trainer's printed loss lines as the watchdog would
        from qlora_doctor.trainer.watch import diagnose_history, parse_trainer_log

        records = parse_trainer_log(text)
        findings = diagnose_history(records) if records else []
    if as_json:
        echo_json({**explanation.to_json(), "versions_judged": [c.to_json() for c in version_checks],
                   "training_log": [f.to_json() for f in findings]})
    elif findings:
        click.echo(_render_findings(findings, f"the pasted Trainer log ({len(parse_trainer_log(text))} log records)"),
                   nl=False)
    else:
        from qlora_doctor.cli.render import render_explanation

        echo_rendered(render_explanation, explanation, version_checks)
    sys.exit(EXIT_OK if explanation.matches or findings or any(c.status == "fail" for c in version_checks)
             else EXIT_FAIL)


def _render_findings(findings, source: str) -> str:
    """The watchdog's findings as text (trainer/watch.py Finding)."""
    if not findings:
        return f"{source}: no NaN, divergence, plateau or overfitting found\n"
    lines = [f"{source}:"]
    for f in findings:
        lines.append(f"  {'STOP' if f.fatal else 'WARN'}  {f.kind.replace('_', ' ')} at step {f.step}: {f.summary}")
        lines.append(f"        likely: {f.parameter or 'no single parameter'}")
        lines.append(f"        fix:    {f.fix}")
    return "\n".join(lines) + "\n"

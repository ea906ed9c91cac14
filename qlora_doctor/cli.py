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


@cli.command()
@click.argument("recipe_name", metavar="RECIPE")
@machine_option
@json_option
@click.option("--skip-check", is_flag=True,
              help="Train even when a check fails (recorded in the output's manifest.json).")
@click.option("--resume", is_flag=True, help="Continue the run in training.output_dir from its last complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace training.output_dir when a previous run is in it.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one recipe value, e.g. --set training.max_steps=10 (repeatable).")
@click.option("--print-launch", is_flag=True,
              help="distributed recipes: print the `accelerate launch` command for each host of a multi-host "
                   "job (started by a scheduler) and exit, without checking or training.")
def run(recipe_name: str, machine_file: Path | None, as_json: bool, skip_check: bool, resume: bool,
        overwrite: bool, overrides: tuple[str, ...], print_launch: bool) -> None:
    """Check the environment, then fine-tune RECIPE (a name like `demo`, or a path) with QLoRA.

    Writes the adapter, tokenizer, resolved recipe, check report, package lock, manifest, metrics and a
    loss plot to training.output_dir. Exit 0 when training finished, 1 when a check failed (nothing
    is loaded), 2 for a bad recipe or an output folder in use, 128+N when signal N stopped training
    after saving a checkpoint.

    With `distributed.strategy: ddp` or `fsdp` the checks run here and training runs in
    `distributed.num_processes` processes started by `accelerate launch` (trainer/distributed.py).
    """
    import shlex

    from qlora_doctor.trainer.recipe import apply_overrides, find_recipe, load_recipe
    from qlora_doctor.trainer.train import RunRefused, run_recipe

    recipe_path = find_recipe(recipe_name)
    recipe = load_recipe(recipe_path)
    if overrides:
        recipe = apply_overrides(recipe, list(overrides))
    machine = load_machine(machine_file)
    argv = ["qlora-doctor", "run", recipe_name]
    argv += [f"--set={o}" for o in overrides]
    argv += [flag for flag, on in (("--skip-check", skip_check), ("--resume", resume),
                                   ("--overwrite", overwrite)) if on]
    argv += ["--machine", str(machine_file)] if machine_file else []
    if print_launch:
        click.echo(_launch_text(recipe, machine, recipe_path, overrides, machine_file), nl=False)
        return
    try:
        if recipe.distributed.strategy != "none":
            from qlora_doctor.trainer.distributed import run_distributed

            result = run_distributed(recipe, machine, recipe_path, where=str(recipe_path), overrides=overrides,
                                     skip_check=skip_check, resume=resume, overwrite=overwrite,
                                     machine_file=machine_file, command=shlex.join(argv))
        else:
            result = run_recipe(recipe, machine, where=str(recipe_path), skip_check=skip_check, resume=resume,
                                overwrite=overwrite, command=shlex.join(argv))
    except RunRefused as refused:
        from qlora_doctor.doctor.render import print_report
        from qlora_doctor.redact import redact_data

        print_report(redact_data(refused.report))
        raise
    if as_json:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        echo_json({**data, "files": list(result.files)})
    else:
        _print_run(result, recipe_name)
    if result.stopped_by is not None:
        import signal

        sys.exit(128 + signal.Signals[result.stopped_by].value)


def _launch_text(recipe, machine, recipe_path: Path, overrides: tuple[str, ...], machine_file: Path | None) -> str:
    from qlora_doctor.errors import InputError
    from qlora_doctor.trainer.distributed import (launch_argv, print_launch_text, resolve_num_processes,
                                                  worker_args)
    from qlora_doctor.trainer.recipe import resolve_precision

    if recipe.distributed.strategy == "none":
        raise InputError(f"{recipe_path}: --print-launch needs `distributed.strategy: ddp` or `fsdp` in the recipe "
                         "(or --set distributed.strategy=ddp)")
    args = worker_args(recipe_path, overrides, parent_report="-", machine_file=machine_file)
    argv = launch_argv(recipe, resolve_precision(recipe, machine), resolve_num_processes(recipe, machine, str(recipe_path)),
                       args, python="python3", multi_host=True)
    return print_launch_text(argv)


def _print_run(result, recipe_name: str) -> None:
    minutes, seconds = divmod(round(result.wall_seconds), 60)
    if result.skip_check and result.check_status == "fail":
        click.echo("warning: trained although checks failed (--skip-check); see doctor-report.json", err=True)
    if result.status == "stopped":
        click.echo(f"stopped at step {result.steps} after a signal; a checkpoint is saved. Continue with:\n"
                   f"  qlora-doctor run {recipe_name} --resume")
    else:
        click.echo(f"trained {result.steps} steps in {minutes}m{seconds:02d}s"
                   + (f" (resumed from {result.resumed_from.name})" if result.resumed_from else ""))
    if result.eval_loss_before is not None:
        after = f"{result.eval_loss_after:.4f}" if result.eval_loss_after is not None else "not measured"
        click.echo(f"eval loss: {result.eval_loss_before:.4f} before -> {after} after")
    if result.train_tokens_per_second:
        click.echo(f"throughput: {result.train_tokens_per_second:,.0f} tokens/s (non-padding)")
    click.echo(f"output: {result.output_dir}/ ({', '.join(result.files)})")
    if result.status == "completed":
        click.echo(f"try it: qlora-doctor generate {result.output_dir} --prompt \"...\" --compare")


@cli.command()
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="A user message; the model's chat template is applied.")
@click.option("--compare", is_flag=True, help="Also answer with the base model (adapter disabled).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@machine_option
@json_option
def generate(output_dir: Path, prompt: str, compare: bool, max_new_tokens: int, machine_file: Path | None,
             as_json: bool) -> None:
    """Answer a prompt with the adapter of a finished run (greedy, so deterministic).

    OUTPUT_DIR is the run's training.output_dir. Exit 2 when it holds no finished run.
    """
    from qlora_doctor.trainer.generate import generate as generate_answer

    result = generate_answer(output_dir, prompt, load_machine(machine_file), compare=compare,
                             max_new_tokens=max_new_tokens)
    if as_json:
        echo_json(result.__dict__)
        return
    click.echo(f"prompt: {result.prompt}")
    click.echo(f"tuned:  {result.answer}")
    if result.base_answer is not None:
        click.echo(f"base:   {result.base_answer}")


@cli.command()
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, type=click.Path(path_type=Path),
              help="A new (or empty) folder for the merged checkpoint.")
@machine_option
@json_option
def merge(output_dir: Path, to: Path, machine_file: Path | None, as_json: bool) -> None:
    """Fold a run's adapter into its base model and save a plain checkpoint (+ tokenizer).

    The base is reloaded in 16-bit (float32 on the CPU), not 4-bit, so the merge loses nothing.
    """
    from qlora_doctor.trainer.generate import merge as merge_adapter

    result = merge_adapter(output_dir, to, load_machine(machine_file))
    if as_json:
        echo_json({"path": str(result.path), "base_model": result.base_model, "dtype": result.dtype})
        return
    click.echo(f"merged {result.base_model} + {output_dir} ({result.dtype}) -> {result.path}")


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

@cli.command()
@json_option
@click.option("--device", type=str, default=None, help="Run on this torch device (default: cuda:0 if seen, else cpu).")
def smoke(as_json: bool, device: str | None) -> None:
    """Functional test: tiny 4-bit NF4 model, LoRA, a few steps, save, reload, generate.

    Offline, seconds. Exit 0 when every step passes, 1 when one fails.
    """
    from qlora_doctor.smoke import run_smoke

    result = run_smoke(device=device)
    if as_json:
        echo_json(result.to_json())
    else:
        marks = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}
        for step in result.steps:
            click.echo(f"{marks[step.status]} {step.name:<22} {step.duration_s:6.2f}s  {step.detail}")
        failed = result.failed_step
        if failed is not None and failed.error:
            click.echo(failed.error, err=True)
        click.echo(f"{result.status} on {result.device} in {result.duration_s:.1f} s")
    sys.exit(EXIT_OK if result.status == "pass" else EXIT_FAIL)


def combos_option(f: Callable) -> Callable:
    return click.option("--combos", "combos_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="The combinations file (default: matrix.yaml of the checkout).")(f)


def results_option(f: Callable) -> Callable:
    return click.option("--results", "results_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Folder of matrix records (default: matrix-results/ of the checkout).")(f)


def _combos(combos_file: Path | None):
    from qlora_doctor.matrix.combos import load_combinations
    from qlora_doctor.matrix.records import REPO_ROOT

    return load_combinations(combos_file or REPO_ROOT / "matrix.yaml")


def _results(results_dir: Path | None) -> Path:
    from qlora_doctor.matrix.records import default_results_dir

    return results_dir or default_results_dir()


@cli.group()
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
@click.option("--installer", type=click.Choice(["pip", "uv"]), default="pip", show_default=True,
              help="pip (venv + pip; reads pip's config, e.g. local find-links) or uv (ignores pip's config).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where built environments are kept, keyed by their pins (default ~/.cache/qlora-doctor/matrix-envs).")
def matrix_run(combos_file, results_dir, machine_file, only, jobs, in_place, installer, cache_dir) -> None:
    """Build each combination's env, run check and smoke in it, write one JSON record each.

    Exit 0 when every record agrees with matrix.yaml (expected passes pass, known-bad ones fail the
    documented way), 1 otherwise.
    """
    from qlora_doctor.errors import InputError
    from qlora_doctor.matrix.combos import select
    from qlora_doctor.matrix.runner import RunOptions, default_cache_dir, run_matrix

    where = str(combos_file or "matrix.yaml")
    combos = select(_combos(combos_file), tuple(only), where)
    if in_place and not only:
        raise InputError("--in-place records the current environment: name its combination with --only NAME")
    machine = load_machine(machine_file)
    options = RunOptions(results_dir=_results(results_dir), cache_dir=cache_dir or default_cache_dir(),
                         installer=installer)
    summary = run_matrix(combos, machine, options, jobs=jobs, in_place=in_place,
                         progress=lambda m: click.echo(m, err=True))
    for skipped in summary.skipped:
        click.echo(f"skipped {skipped.name}: {skipped.reason}", err=True)
    if only and summary.skipped:
        raise InputError([f"--only {s.name}: {s.reason}; run it on a matching machine" for s in summary.skipped])
    for record, path in zip(summary.records, summary.paths):
        mark = "ok  " if record.verdict == "pass" else "FAIL"
        click.echo(f"{mark} {record.name} on {record.platform}: {record.verdict_detail} -> {path}")
    sys.exit(EXIT_OK if summary.ok else EXIT_FAIL)


@matrix.command("report")
@combos_option
@results_option
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
def matrix_report(combos_file, results_dir, markdown) -> None:
    """Table of combinations x platforms from the records. Exit 1 when a record disagrees with matrix.yaml."""
    from qlora_doctor.matrix.records import load_records
    from qlora_doctor.matrix.report import build_table, render_markdown, render_text

    combos = _combos(combos_file)
    table = build_table(combos, load_records(_results(results_dir)))
    click.echo((render_markdown if markdown else render_text)(table, combos), nl=False)
    sys.exit(EXIT_OK if table.all_ok else EXIT_FAIL)


@matrix.command("ci")
@combos_option
@click.option("--github", is_flag=True, required=True, help="Write a GitHub Actions workflow.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here (e.g. .github/workflows/matrix.yml) instead of printing.")
def matrix_ci(combos_file, github, output) -> None:
    """Generate the CI workflow whose job matrix comes from matrix.yaml."""
    from qlora_doctor.fileio import write_atomic
    from qlora_doctor.matrix.ci import github_workflow

    text = github_workflow(_combos(combos_file))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)


@cli.command()
@machine_option
@results_option
@click.option("--python", "python_version", type=str, default=None, help="Python major.minor (default: the machine's).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the lockfile here (default: print it).")
@click.option("--untested", is_flag=True, help="Resolve with pip under the knowledge base's constraints instead.")
@click.option("--keep", multiple=True, help="name==version the lock must keep (repeatable).")
@click.option("--constraints", "constraints_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A pip constraints file the chosen combination must satisfy.")
@click.option("--repair", is_flag=True, help="Print the pip command moving this env to the nearest tested set.")
@click.option("--from-env", is_flag=True, help="Freeze the current environment (only when check passes).")
@click.option("--check", "check_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Compare the current environment with this lockfile; exit 1 on drift.")
@click.option("--force", is_flag=True, help="Replace an existing lockfile with different pins.")
@json_option
def lock(machine_file, results_dir, python_version, output, untested, keep, constraints_file, repair, from_env,
         check_file, force, as_json) -> None:
    """Write exact pins for this machine from the newest tested combination that fits it."""
    from qlora_doctor import lock as lk
    from qlora_doctor.errors import CheckFailed, InputError
    from qlora_doctor.matrix.records import load_records

    modes = [m for m, on in (("--untested", untested), ("--repair", repair), ("--from-env", from_env),
                             ("--check", check_file is not None)) if on]
    if len(modes) > 1:
        raise InputError(f"{' and '.join(modes)} cannot be combined; pick one")
    if check_file is not None:
        if not check_file.exists():
            raise InputError(f"{check_file}: no such lockfile (write one with `qlora-doctor lock -o {check_file}`)")
        locked = lk.parse_lockfile(check_file.read_text(encoding="utf-8"), str(check_file))
        diffs = lk.drift(locked, lk.installed_versions())
        if as_json:
            echo_json({"lockfile": str(check_file), "drift": lk.has_drift(diffs),
                       "differences": [{"name": d.name, "kind": d.kind, "locked": d.locked,
                                        "installed": d.installed} for d in diffs]})
        else:
            for d in diffs:
                click.echo(("  (extra) " if d.kind == "extra" else "  DRIFT   ") + d.describe())
            click.echo(f"{check_file}: " + ("drift: the environment differs from the lockfile; fix with "
                                            f"`pip install -r {check_file}`" if lk.has_drift(diffs)
                                            else "the environment matches the lockfile"))
        sys.exit(EXIT_FAIL if lk.has_drift(diffs) else EXIT_OK)
    machine = load_machine(machine_file)
    python = python_version or ".".join(machine.python.split(".")[:2])
    tables = lk.load_tables_default()
    argv = ["lock", *(["--machine", str(machine_file)] if machine_file else []),
            *(["--python", python_version] if python_version else []), *(["--untested"] if untested else []),
            *(a for k in keep for a in ("--keep", k)),
            *(["--constraints", str(constraints_file)] if constraints_file else []),
            *(["--from-env"] if from_env else []), *(["-o", str(output)] if output else [])]
    command = lk.command_line(argv)
    target = str(output) if output else None
    keep_pins = lk.parse_keep(tuple(keep))
    constraints = lk.load_constraints(constraints_file) if constraints_file else ()
    records = load_records(_results(results_dir))
    if repair:
        fix = lk.choose_repair(records, machine, python, tables, lk.installed_versions())
        if as_json:
            echo_json({**lk.describe_fit(fix.fit), "command": fix.command,
                       "changes": [{"name": n, "installed": o, "tested": v} for n, o, v in fix.changes]})
        elif not fix.changes:
            click.echo(f"nothing to change: the environment already has {fix.fit.record.name}'s versions")
        else:
            click.echo(f"# nearest tested combination: {fix.fit.record.name} ({lk.record_source(fix.fit.record)}), "
                       f"{len(fix.changes)} package(s) change")
            click.echo(fix.command)
        sys.exit(EXIT_OK)
    if from_env:
        from qlora_doctor.doctor.checks import diagnose

        report = diagnose(machine)
        if report.status == "fail":
            raise CheckFailed(["the current environment fails `qlora-doctor check`; not freezing it:"]
                              + [f"{c.id}: {c.detail}" for c in report.failed])
        pins = lk.lockable_pins(lk.installed_versions())
        from qlora_doctor.matrix.tested import env_platform
        from qlora_doctor.doctor.packages import installed_environment

        platform = env_platform(machine, installed_environment(with_conflicts=False))
        status = "tested" if report.tested.get("status") == "tested" else "untested (check passed; no matrix record)"
        lockfile = lk.Lockfile(pins, lk.torch_index_urls(pins), lk.header_lines(
            machine, python, platform, "the current environment, frozen after `qlora-doctor check` passed", status,
            command, target))
    elif untested:
        from qlora_doctor.constraints import constraints_for
        from qlora_doctor.doctor.knowledge import load_rules

        lines, _ = constraints_for(machine, load_rules())
        pins = lk.resolve_untested(machine, python, keep_pins, [l.requirement for l in lines]
                                   + [str(c) for c in constraints], tables)
        problems = lk.vet_pins(pins, machine, "pip's resolution")
        if problems:
            raise CheckFailed(["pip's resolution breaks known rules; not writing it:", *problems])
        variant = lk.torch_variant_for(machine, tables)
        from qlora_doctor.matrix.records import platform_id

        gpus = machine.nvidia_gpus
        accel = variant if variant == "cpu" or not gpus else f"{variant}-sm{(gpus[0].compute_capability or '').replace('.', '')}"
        lockfile = lk.Lockfile(pins, lk.torch_index_urls(pins) or (lk.TORCH_INDEX.format(variant=variant),),
                               lk.header_lines(machine, python, platform_id(machine.os, machine.arch, python, accel),
                                               "pip's resolver (pip install --dry-run --report) under "
                                               "`qlora-doctor constraints`; vetted by the doctor: no rule fails",
                                               "UNTESTED (no matrix record; breaks no known rule)", command, target))
    else:
        fit = lk.choose_record(records, machine, python, tables, keep_pins, constraints)
        lockfile = lk.lockfile_from_record(fit, machine, python, command, target)
    if output is None:
        click.echo(lockfile.render(), nl=False)
    else:
        written = lk.write_lockfile(lockfile, output, force)
        click.echo(f"{'wrote' if written else 'unchanged (same pins)'}: {output}", err=True)


@cli.command()
@machine_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the constraints file here (default: print it).")
def constraints(machine_file, output) -> None:
    """The knowledge base as a pip constraints file for this machine, one rule per line."""
    from qlora_doctor.constraints import constraints_for, render_constraints
    from qlora_doctor.doctor.knowledge import load_rules
    from qlora_doctor.fileio import write_atomic
    from qlora_doctor.lock import command_line

    machine = load_machine(machine_file)
    lines, skipped = constraints_for(machine, load_rules())
    text = render_constraints(machine, lines, skipped, command_line(["constraints", *(["--machine", str(machine_file)] if machine_file else []),
                                                            *(["-o", str(output)] if output else [])]))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)



if __name__ == "__main__":  # pragma: no cover
    main()

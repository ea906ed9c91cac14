"""`qlora-doctor run`, `generate`, `merge`: training and using its adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import (echo_json, echo_rendered, json_option, load_machine, machine_option,
    sampling_from_options, sampling_options)


@click.command()
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
    is loaded), 2 for a bad recipe or an output folder in use, 3 when the run watched itself diverge
    (NaN or a rising loss; `training.watch`): it saved a checkpoint, stopped, and says which recipe value
    to change (also in metrics.json and manifest.json `watch`); fix it, then --resume or --overwrite.
    128+N when signal N stopped training after saving a checkpoint.

    With `distributed.strategy: ddp` or `fsdp` the checks run here and training runs in
    `distributed.num_processes` processes started by `accelerate launch` (trainer/distributed.py).
    """
    import shlex

    from qlora_doctor.core.report import RunRefused
    from qlora_doctor.doctor.diagnose import diagnose
    from qlora_doctor.recipe.schema import apply_overrides, find_recipe, load_recipe
    from qlora_doctor.runplan import build_run_plan

    recipe_path = find_recipe(recipe_name)
    recipe = load_recipe(recipe_path)
    if overrides:
        recipe = apply_overrides(recipe, list(overrides))
    machine = load_machine(machine_file)
    if not print_launch:
        from qlora_doctor.core.errors import InputError
        from qlora_doctor.recipe.preflight import preflight_problems

        problems = preflight_problems(recipe, str(recipe_path), hub=True)  # before the checks load anything
        if problems:
            raise InputError(problems)
    argv = ["qlora-doctor", "run", recipe_name]
    argv += [f"--set={o}" for o in overrides]
    argv += [flag for flag, on in (("--skip-check", skip_check), ("--resume", resume),
                                   ("--overwrite", overwrite)) if on]
    argv += ["--machine", str(machine_file)] if machine_file else []
    if print_launch:
        click.echo(_launch_text(recipe, machine, recipe_path, overrides, machine_file), nl=False)
        return
    # Decide once (output folder first: a folder in use is exit 2 before anything runs), check, then train.
    from qlora_doctor.sources.installed import installed_environment

    env = installed_environment()  # read once: the plan's workarounds and the doctor judge the same packages
    plan = build_run_plan(recipe, machine, env, where=str(recipe_path), resume=resume, overwrite=overwrite,
                          decide_output=True)
    report = diagnose(machine, env, run_plan=plan)
    if report.status == "fail" and not skip_check:
        if not as_json:
            from qlora_doctor.cli.render import render_report
            from qlora_doctor.core.redact import redact_data

            echo_rendered(render_report, redact_data(report))
        raise RunRefused(report)
    import contextlib

    # With --json, stdout holds only the result: the Trainer's log lines and progress go to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    if as_json or not sys.stderr.isatty():  # the data pipeline's tokenizing bar (trainer/data.py): terminals only
        import datasets

        datasets.disable_progress_bars()
    if recipe.distributed.strategy != "none":
        from qlora_doctor.trainer.distributed import launch_training

        with quiet:
            result = launch_training(plan, machine, report, skip_check=skip_check, machine_file=machine_file,
                                     command=shlex.join(argv))
    else:
        from qlora_doctor.trainer.train import run_training

        with quiet:
            result = run_training(plan, machine, report, skip_check=skip_check, command=shlex.join(argv))
    if as_json:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        echo_json({**data, "files": list(result.files)})
    else:
        _print_run(result, [a for a in argv if a != "--overwrite"])
    if result.stopped_by is not None:
        import signal

        sys.exit(128 + signal.Signals[result.stopped_by].value)
    if result.status == "diverged":
        from qlora_doctor.trainer.watch import EXIT_DIVERGED

        sys.exit(EXIT_DIVERGED)


def _launch_text(recipe, machine, recipe_path: Path, overrides: tuple[str, ...], machine_file: Path | None) -> str:
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.recipe.precision import resolve_precision
    from qlora_doctor.runplan import resolve_num_processes
    from qlora_doctor.trainer.distributed import launch_argv, print_launch_text

    if recipe.distributed.strategy == "none":
        raise InputError(f"{recipe_path}: --print-launch needs `distributed.strategy: ddp` or `fsdp` in the recipe "
                         "(or --set distributed.strategy=ddp)")
    args = ["--recipe", str(recipe_path), *(f"--set={o}" for o in overrides), "--parent-report", "-"]
    args += ["--machine", str(machine_file)] if machine_file else []
    argv = launch_argv(recipe, resolve_precision(recipe, machine), resolve_num_processes(recipe, machine, str(recipe_path)),
                       args, python="python3", multi_host=True)
    return print_launch_text(argv)


def _print_run(result, argv: list[str]) -> None:
    """What the run did; a stopped run's hint repeats the exact command (its --set options included)."""
    import shlex

    minutes, seconds = divmod(round(result.wall_seconds), 60)
    if result.skip_check and result.check_status == "fail":
        click.echo("warning: trained although checks failed (--skip-check); see doctor-report.json", err=True)
    watch = getattr(result, "watch", None) or {}
    if result.status == "stopped":
        click.echo(f"stopped at step {result.steps} after a signal; a checkpoint is saved. Continue with:\n"
                   f"  {shlex.join(argv + ([] if '--resume' in argv else ['--resume']))}")
    elif result.status == "diverged" and watch.get("stopped"):
        finding = watch["stopped"]
        saved = ("a checkpoint is saved" if watch.get("checkpoint_saved") else
                 "no checkpoint was saved (the adapter's weights are no longer finite)")
        from qlora_doctor.core.rundir import last_complete_checkpoint

        again = [a for a in argv if a not in ("--resume", "--overwrite")
                 and not a.startswith(f"--set={finding['parameter']}=")]
        afresh = f"  {shlex.join(again + ['--overwrite'])}"
        then = (f"then continue from the last checkpoint (the recipe's learning rate replaces the checkpoint's; "
                f"its weights are those of the diverging run) with:\n  {shlex.join(again + ['--resume'])}\n"
                f"or start afresh with:\n{afresh}" if last_complete_checkpoint(result.output_dir)
                else f"then start afresh with:\n{afresh}")
        click.echo(f"stopped at step {result.steps}: {finding['kind'].replace('_', ' ')} ({saved})\n"
                   f"  seen:   {finding['summary']}\n"
                   f"  likely: {finding['parameter']}\n"
                   f"  fix:    {finding['fix']}\n{then}", err=True)
    else:
        click.echo(f"trained {result.steps} steps in {minutes}m{seconds:02d}s"
                   + (f" (resumed from {result.resumed_from.name})" if result.resumed_from else ""))
    if result.eval_loss_before is not None:
        after = f"{result.eval_loss_after:.4f}" if result.eval_loss_after is not None else "not measured"
        click.echo(f"eval loss: {result.eval_loss_before:.4f} before -> {after} after")
    if result.train_tokens_per_second:
        click.echo(f"throughput: {result.train_tokens_per_second:,.0f} tokens/s (non-padding)")
    for warning in watch.get("warnings", ()):
        click.echo(f"watch: {warning['kind'].replace('_', ' ')} at step {warning['step']}: {warning['summary']}; "
                   f"likely {warning['parameter']}: {warning['fix']}", err=True)
    click.echo(f"output: {result.output_dir}/ ({', '.join(result.files)})")
    if result.status == "completed":
        click.echo(f"try it: qlora-doctor generate {result.output_dir} --prompt \"...\" --compare")


@click.command()
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True, help="A user message; the model's chat template is applied.")
@click.option("--compare", is_flag=True, help="Also answer with the base model (adapter disabled), from the same seed.")
@sampling_options
@machine_option
@json_option
def generate(output_dir: Path, prompt: str, compare: bool, system: str | None, temperature: float, top_p: float,
             top_k: int, max_new_tokens: int, seed: int | None, machine_file: Path | None, as_json: bool) -> None:
    """Answer a prompt with the adapter of a finished run: greedy (deterministic) by default, sampled with
    --temperature (reproducible with --seed). For a conversation, `qlora-doctor chat OUTPUT_DIR`.

    OUTPUT_DIR is the run's training.output_dir. Exit 2 when it holds no finished run or an option is out of range.
    """
    from qlora_doctor.trainer.generate import generate as generate_answer

    sampling = sampling_from_options(temperature, top_p, top_k, max_new_tokens, seed)
    result = generate_answer(output_dir, prompt, load_machine(machine_file), compare=compare, sampling=sampling,
                             system=system)
    if as_json:
        echo_json(result.__dict__)
        return
    click.echo(f"prompt: {result.prompt}")
    click.echo(f"tuned:  {result.answer}")
    if result.base_answer is not None:
        click.echo(f"base:   {result.base_answer}")
    if result.seed is not None:
        click.echo(f"(sampled at temperature {result.temperature:g}, top_p {result.top_p:g}, top_k {result.top_k}, "
                   f"seed {result.seed}: --seed {result.seed} repeats it)", err=True)


@click.command()
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

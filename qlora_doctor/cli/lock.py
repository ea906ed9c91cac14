"""`qlora-doctor lock` and `constraints`: pins."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import _results, echo_json, json_option, load_machine, machine_option, results_option
from qlora_doctor.core.errors import EXIT_FAIL, EXIT_OK


@click.command()
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
    from qlora_doctor.pins import lock as lk
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.knowledge.loading import load_tables
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
    tables = load_tables()
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
            echo_json({**lk.describe_fit(fix.fit), "source": fix.source or None, "command": fix.command,
                       "changes": [{"name": n, "installed": o, "tested": v} for n, o, v in fix.changes],
                       "still_failing": list(fix.problems)})
        elif not fix.changes:
            click.echo(f"nothing to change: the environment already has {fix.fit.record.name}'s versions")
        else:
            click.echo(f"# nearest tested combination: {fix.fit.record.name} ({lk.record_source(fix.fit.record)}), "
                       f"{len(fix.changes)} package(s) change" if not fix.source else
                       f"# {fix.source}; {len(fix.changes)} package(s) change")
            click.echo(fix.command)
            for problem in fix.problems:
                click.echo(f"# still failing after it, with packages outside the record: {problem}")
        sys.exit(EXIT_FAIL if fix.problems else EXIT_OK)
    if from_env:
        lockfile = lk.lockfile_from_env(machine, python, command, target)
    elif untested:
        lockfile = lk.lockfile_untested(machine, python, keep_pins, constraints, tables, command, target)
    else:
        from qlora_doctor.core.errors import CheckFailed

        try:
            fit = lk.choose_record(records, machine, python, tables, keep_pins, constraints)
            lockfile = lk.lockfile_from_record(fit, machine, python, command, target)
        except CheckFailed:
            if not machine.nvidia_gpus or keep_pins or constraints:
                raise
            # No GPU record fits this machine: the Python level from a CPU record, the torch build for the GPU.
            lockfile = lk.lockfile_for_gpu_from_cpu_record(records, machine, python, tables, command, target)
    written = lk.write_lockfile(lockfile, output, force) if output is not None else None
    if as_json:
        echo_json({"pins": dict(sorted(lockfile.pins.items())), "index_urls": list(lockfile.index_urls),
                   "header": list(lockfile.header), "output": str(output) if output else None,
                   "written": written, "text": lockfile.render()})
    elif output is None:
        click.echo(lockfile.render(), nl=False)
    else:
        click.echo(f"{'wrote' if written else 'unchanged (same pins)'}: {output}", err=True)


@click.command()
@machine_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the constraints file here (default: print it).")
@json_option
def constraints(machine_file, output, as_json) -> None:
    """The knowledge base as a pip constraints file for this machine, one rule per line."""
    from qlora_doctor.pins.constraints import constraints_for, render_constraints
    from qlora_doctor.knowledge.loading import load_rules
    from qlora_doctor.core.fileio import write_atomic
    from qlora_doctor.pins.lock import command_line

    machine = load_machine(machine_file)
    lines, skipped = constraints_for(machine, load_rules())
    command = command_line(["constraints", *(["--machine", str(machine_file)] if machine_file else []),
                            *(["-o", str(output)] if output else [])])
    text = render_constraints(machine, lines, skipped, command)
    if as_json:
        if output is not None:
            write_atomic(output, text)
        echo_json({"constraints": [{"requirement": line.requirement, "rule": line.rule_id, "title": line.title}
                                   for line in lines],
                   "skipped": [vars(s) for s in skipped], "output": str(output) if output else None})
    elif output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)

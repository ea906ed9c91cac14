"""`qlora-doctor init`: write a commented starter recipe fitted to a model, a data file and a machine."""

from __future__ import annotations

from pathlib import Path

import click

from qlora_doctor.cli.options import load_machine, machine_option


@click.command()
@click.option("--model", default=None, metavar="ID",
              help="builtin:NAME, a local model folder or a Hugging Face id (default: builtin:smollm2-135m-instruct).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A local .jsonl/.json/.csv/.parquet file; its format is detected (default: the demo data).")
@machine_option
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the recipe to this file (default: print it).")
@click.option("--force", is_flag=True, help="With -o: replace an existing file.")
def init(model: str | None, data: Path | None, machine_file: Path | None, output: Path | None, force: bool) -> None:
    """Print (or write with -o) a starter recipe: commented YAML that validates as written.

    The data's format and columns come from its first rows; batch size, sequence length and gradient
    checkpointing from the memory planner for this machine's GPU (or --machine FILE); the optimizer and
    precision from the device. Exit 2 for a missing or unreadable data file, or an existing -o file without --force.
    """
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.memory.starter import starter_recipe

    if output is not None and output.exists() and not force:
        raise InputError(f"-o: {output} exists; choose another file or add --force to replace it")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)  # its paths are checked relative to it
    starter = starter_recipe(load_machine(machine_file), model=model, data=data, recipe_file=output)
    for warning in starter.warnings:
        click.echo(f"warning: {warning}", err=True)
    if output is None:
        click.echo(starter.text, nl=False)
        return
    from qlora_doctor.core.fileio import write_atomic

    write_atomic(output, starter.text, redact_secrets=False)
    click.echo(f"wrote {output} ({starter.detected.format} data, micro-batch {starter.fit.micro_batch} x "
               f"{starter.fit.grad_accum}, max_seq_length {starter.fit.seq_len}); next: qlora-doctor run {output}",
               err=True)

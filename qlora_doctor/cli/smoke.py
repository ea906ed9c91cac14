"""`qlora-doctor smoke`: the seconds-long functional test."""

from __future__ import annotations

import sys

import click

from qlora_doctor.cli.options import echo_json, json_option
from qlora_doctor.core.errors import EXIT_FAIL, EXIT_OK


@click.command()
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

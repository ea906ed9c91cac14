"""Command line: a package of small command modules that parse, call the library and render; the only
place that prints or exits. Commands are imported when used (LazyGroup), so `qlora-doctor --help` and
the fast path of `check` do not pay for the others' imports.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from qlora_doctor import __version__
from qlora_doctor.core.errors import DoctorError

COMMANDS = {
    "check": "qlora_doctor.cli.check:check",
    "explain": "qlora_doctor.cli.check:explain",
    "validate": "qlora_doctor.cli.recipes:validate",
    "schema": "qlora_doctor.cli.recipes:schema",
    "run": "qlora_doctor.cli.run:run",
    "generate": "qlora_doctor.cli.run:generate",
    "chat": "qlora_doctor.cli.chat:chat",
    "init": "qlora_doctor.cli.init:init",
    "merge": "qlora_doctor.cli.run:merge",
    "export": "qlora_doctor.cli.export:export",
    "push": "qlora_doctor.cli.export:push",
    "plan": "qlora_doctor.cli.plan:plan",
    "smoke": "qlora_doctor.cli.smoke:smoke",
    "matrix": "qlora_doctor.cli.matrix:matrix",
    "lock": "qlora_doctor.cli.lock:lock",
    "constraints": "qlora_doctor.cli.lock:constraints",
}
"""Command name -> "module:attribute", imported on first use (hatch's cli/lazy.py)."""


class LazyGroup(click.Group):
    """A group whose commands are imported on use, and that routes every user-facing error through one
    place: message on stderr, exit code from the error."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context) -> Any:
        wants_json = "--json" in [*getattr(ctx, "_protected_args", []), *ctx.args]  # click clears them below
        try:
            return super().invoke(ctx)
        except DoctorError as err:
            from qlora_doctor.core.redact import redact

            if wants_json:
                # stdout holds exactly one JSON document in every outcome (a refused run carries its report)
                from qlora_doctor.cli.options import echo_json

                report = getattr(err, "report", None)
                echo_json({"status": "refused" if report is not None else "ok" if err.exit_code == 0 else "error",
                           "exit_code": err.exit_code, "errors": err.messages,
                           **({"report": report.to_json()} if report is not None else {})})
            prefix = "note" if err.exit_code == 0 else "error"
            for message in err.messages:
                click.echo(f"{prefix}: {redact(message)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qlora-doctor")
def cli() -> None:
    """Diagnose, pin and run QLoRA fine-tunes on one GPU."""
    # Before any command imports bitsandbytes (run, chat, generate, merge, export, smoke each do, by
    # different paths): its misleading CPU-kernel warning is annotated where it is logged.
    from qlora_doctor.trainer.known_warnings import annotate_known_warnings

    annotate_known_warnings()


def main() -> None:
    cli(prog_name="qlora-doctor")

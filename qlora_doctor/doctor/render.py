"""Terminal rendering of reports and explanations (rich). Only the CLI calls these."""

from __future__ import annotations

from qlora_doctor.doctor.explain import Match
from qlora_doctor.doctor.report import Report

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "unknown": "magenta"}
_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "unknown": "????"}


def print_report(report: Report, verbose: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False)
    machine = report.machine
    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "no GPU"
    console.print(f"[bold]machine[/]: {machine['os']} {machine['arch']}, Python {machine['python']}, "
                  f"driver {machine['driver_version'] or '-'}, {gpus}  [dim]({machine['source']})[/]")
    table = Table(show_lines=False, expand=False)
    for column in ("status", "check", "found", "expected", "fix"):
        table.add_column(column, overflow="fold")
    shown = [c for c in report.checks if verbose or c.status != "pass"]
    for c in shown:
        table.add_row(f"[{_STYLE[c.status]}]{_MARK[c.status]}[/]", c.title, c.found or c.detail,
                      c.expected, c.fix)
    if shown:
        console.print(table)
    hidden = len(report.checks) - len(shown)
    if hidden:
        console.print(f"[dim]{hidden} passing checks hidden (-v shows them)[/]")
    for c in report.checks:
        if c.status in ("fail", "warn", "unknown"):
            console.print(f"[{_STYLE[c.status]}]{c.status}[/] {c.id}: {c.detail}", highlight=False)
            if c.fix:
                console.print(f"    fix: [green]{c.fix}[/]", highlight=False)
            for src in c.sources:
                console.print(f"    [dim]{src}[/]", highlight=False)
    if verbose and machine.get("notes"):
        for note in machine["notes"]:
            console.print(f"[dim]probe: {note}[/]")
    console.print(f"[bold]result[/]: [{_STYLE[report.status]}]{report.status}[/]")


def print_matches(matches: list[Match]) -> None:
    from rich.console import Console

    console = Console()
    if not matches:
        console.print("no known failure matches this text; `qlora-doctor check` may still find the cause")
        return
    for m in matches:
        console.print(f"[bold]{m.id}[/]: {m.title}", highlight=False)
        console.print(f"  matched: {m.matched!r}", highlight=False)
        console.print(f"  cause:   {m.cause}", highlight=False)
        console.print(f"  fix:     [green]{m.fix}[/]", highlight=False)
        for src in m.sources:
            console.print(f"  source:  {src}", highlight=False)

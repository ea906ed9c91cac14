"""Terminal rendering of reports and explanations (rich), returned as text: only the CLI writes it."""

from __future__ import annotations

from typing import Any

from qlora_doctor.knowledge.explain import Explanation
from qlora_doctor.core.report import Report


def _console(width: int | None, color: bool) -> Any:
    """A rich Console that writes into a string: renderers return text, the CLI writes it."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=width or 100, force_terminal=color, color_system="auto" if color else None,
                   soft_wrap=False, highlight=False)


def _text(console: Any) -> str:
    return console.file.getvalue()


_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "unknown": "magenta"}
_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "unknown": "????"}


def render_report(report: Report, verbose: bool = False, width: int | None = None, color: bool = False) -> str:
    from rich.table import Table

    console = _console(width, color)
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
    return _text(console)


def render_explanation(explanation: Explanation, version_checks: list[Any] | None = None, width: int | None = None,
                       color: bool = False) -> str:
    """The best answer in full (at most 15 lines at 100 columns), the other candidates one line each."""
    import textwrap

    console = _console(width, color)
    cols = width or 100
    best = explanation.best
    if best is None:
        console.print("no known failure matches this text; `qlora-doctor check` may still find the cause")
    else:
        def block(label: str, text: str, lines: int, style: str = "") -> None:
            wrapped = textwrap.wrap(text, width=max(cols - 9, 30), break_long_words=False,
                                    break_on_hyphens=False) or [""]
            if len(wrapped) > lines:
                wrapped = wrapped[:lines]
                wrapped[-1] = wrapped[-1][: max(cols - 12, 20)] + " ..."
            for i, line in enumerate(wrapped):
                head = f"  {label:<6} " if i == 0 else " " * 9
                console.print(head + (f"[{style}]{line}[/]" if style else line), highlight=False, soft_wrap=True)

        console.print(f"[bold]{best.id}[/]: {best.title}  [dim]({explanation.confidence} confidence)[/]",
                      highlight=False, soft_wrap=True)
        block("cause", best.cause, 4)
        block("fix", best.fix, 3, "green")
        why = f"matched {best.matched.strip()[:90]!r}" + (f"; {'; '.join(best.evidence)}" if best.evidence else "")
        block("why", why, 2)
        sources = best.sources[0] + (f" (+{len(best.sources) - 1} more with --json)" if len(best.sources) > 1 else "")
        console.print(f"  source {sources}", highlight=False, soft_wrap=True)
        if explanation.others:
            console.print(f"[dim]{len(explanation.others)} other candidate(s), less likely:[/]")
            for other in explanation.others:
                line = f"  - {other.id}: {other.title}"
                console.print(line if len(line) <= cols else line[: cols - 3] + "...", highlight=False, soft_wrap=True)
    if version_checks:
        console.print("[bold]versions in the paste[/], judged as `check -r` would:")
        for check in version_checks:
            console.print(f"  [{_STYLE[check.status]}]{_MARK[check.status]}[/] {check.title}: {check.fix}",
                          highlight=False, soft_wrap=True)
    return _text(console)

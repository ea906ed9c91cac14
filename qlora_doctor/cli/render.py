"""Terminal rendering of reports and explanations (rich), returned as text: only the CLI writes it."""

from __future__ import annotations

import collections
import re

from typing import Any

from qlora_doctor.knowledge.explain import Explanation
from qlora_doctor.core.report import Report


def escape(text: str) -> str:
    """Data printed through rich: `qlora-doctor[train]`, `[rank0]:` or `[fp8]` must print as written, not be
    read as markup and vanish."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


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
    counts = collections.Counter(g["name"] for g in machine["gpus"])  # `8x H100`, not the name eight times
    gpus = ", ".join(name if n == 1 else f"{n}x {name}" for name, n in counts.items()) or "no GPU"
    console.print(f"[bold]machine[/]: {machine['os']} {machine['arch']}, Python {machine['python']}, "
                  f"driver {machine['driver_version'] or '-'}, {escape(gpus)}  [dim]({escape(str(machine['source']))})[/]")
    # The table wraps at spaces; a command or URL is never in it (the fix column would cut one in two):
    # each failing check's fix and sources follow below the table on lines of their own.
    table = Table(show_lines=False, expand=False)
    for column in ("status", "check", "found", "expected"):
        table.add_column(column, overflow="fold")
    # Rules that cannot be judged because a version is unknown (a file that names a package without one, a
    # closure resolved offline) are one row, not one each: -v lists them.
    unjudged = [] if verbose else [c for c in report.checks if c.status == "unknown" and c.id.startswith("rule:")]
    shown = [c for c in report.checks if (verbose or c.status != "pass") and c not in unjudged]
    for c in shown:
        table.add_row(f"[{_STYLE[c.status]}]{_MARK[c.status]}[/]", escape(c.title), escape(c.found or c.detail),
                      escape(c.expected or ""))
    if unjudged:
        names = sorted({m for c in unjudged for m in re.findall(r"cannot read (\S+?)'s version", c.found or "")})
        table.add_row(f"[{_STYLE['unknown']}]{_MARK['unknown']}[/]",
                      f"{len(unjudged)} known failures cannot be ruled out",
                      escape(f"versions unknown: {', '.join(names)}") if names else "facts missing", "-v lists them")
    if shown or unjudged:
        console.print(table)
    hidden = len(report.checks) - len(shown) - len(unjudged)
    if hidden:
        console.print(f"[dim]{hidden} passing checks hidden (-v shows them)[/]")
    for c in report.checks:
        if c.status in ("fail", "warn", "unknown") and c not in unjudged:
            console.print(f"[{_STYLE[c.status]}]{c.status}[/] {escape(c.id)}: {escape(c.detail)}", highlight=False)
            if c.fix:  # soft_wrap: never broken inside a command; the terminal wraps it, copying keeps it whole
                console.print(f"    fix: [green]{escape(c.fix)}[/]", highlight=False, soft_wrap=True)
            for src in c.sources:
                console.print(f"    [dim]{escape(src)}[/]", highlight=False, soft_wrap=True)
    if verbose and machine.get("notes"):
        label = "probe" if machine.get("source") in ("probe", "") else "machine"  # read from a file: not probed
        for note in machine["notes"]:
            console.print(f"[dim]{label}: {escape(note)}[/]")
    added = next((c for c in report.checks if c.id == "packages.training" and c.status == "pass"
                  and "(added by pip)" in (c.found or "")), None)
    if added is not None and not verbose:  # passes, but the user should pin what the file leaves to pip
        console.print(f"[dim]{escape(added.detail)}[/]", highlight=False)
        console.print(f"[dim]    {escape(added.fix)}[/]", highlight=False, soft_wrap=True)
    tested = next((c for c in report.checks if c.id == "matrix.tested"), None)
    if tested is not None and tested.status == "pass" and not verbose:
        console.print(f"[dim]{escape(tested.detail)}[/]", highlight=False)
        if tested.fix and report.tested.get("status") != "tested":
            console.print(f"[dim]    to a tested set: {escape(tested.fix)}[/]", highlight=False, soft_wrap=True)
    evidence = {"tested": " (tested)", "compatible": " (compatible: no known failure, not tested)",
                "unknown": " (some facts could not be read)", "none": ""}[report.evidence]
    console.print(f"[bold]result[/]: [{_STYLE[report.status]}]{report.status}[/]{evidence}")
    return _text(console)


def render_explanation(explanation: Explanation, version_checks: list[Any] | None = None, width: int | None = None,
                       color: bool = False) -> str:
    """The best answer in full and the other candidates one line each: at most 15 lines at 100 columns
    (title 2, cause 4, fix 3, why 1, source 1, other candidates 4), before the judged versions."""
    import textwrap

    console = _console(width, color)
    cols = width or 100
    best = explanation.best

    def fit(lines: list[str], most: int, room: int) -> list[str]:
        """At most `most` lines of at most `room` characters; " ..." ends what was cut."""
        cut = len(lines) > most or any(len(line) > room for line in lines)
        lines = [line[:room] for line in lines[:most]]
        if cut:
            lines[-1] = lines[-1][: max(room - 4, 16)].rstrip() + " ..."
        return lines

    if best is None:
        console.print("no known failure matches this text; `qlora-doctor check` may still find the cause")
    else:
        def block(label: str, text: str, lines: int, style: str = "") -> None:
            room = max(cols - 9, 30)
            wrapped = fit(textwrap.wrap(text, width=room, break_long_words=False, break_on_hyphens=False) or [""],
                          lines, room)
            for i, line in enumerate(wrapped):
                head = f"  {label:<6} " if i == 0 else " " * 9
                line = escape(line)
                console.print(head + (f"[{style}]{line}[/]" if style else line), highlight=False, soft_wrap=True)

        title = textwrap.wrap(f"{best.id}: {best.title}  ({explanation.confidence} confidence)", width=cols,
                              break_long_words=True) or [best.id]
        for i, line in enumerate(fit(title, 2, cols)):
            line = escape(line)
            if i == 0 and line.startswith(best.id):
                line = f"[bold]{best.id}[/]" + line[len(best.id):]
            console.print(line, highlight=False, soft_wrap=True)
        block("cause", best.cause, 4)
        block("fix", best.fix, 3, "green")
        matched = " ".join(best.matched.split())
        why = f"matched '{matched[:70]}{'...' if len(matched) > 70 else ''}'" + (
            f"; {'; '.join(best.evidence)}" if best.evidence else "")
        block("why", why, 1)
        source = f"  source {best.sources[0]}"
        more = f" (+{len(best.sources) - 1} more with --json)" if len(best.sources) > 1 else ""
        console.print(source + more if len(source + more) <= cols else source[:cols], highlight=False, soft_wrap=True)
        if explanation.others:
            others = sorted(explanation.others, key=lambda m: m.contradicted)   # stable: ranked order otherwise
            console.print(f"[dim]{len(others)} other candidate(s), less likely:[/]")
            shown = others if len(others) <= 3 else others[:2]
            for other in shown:
                line = f"  - {other.id}: {other.title}" + ("  (the paste's facts contradict it)" if other.contradicted
                                                           else "")
                console.print(escape(line if len(line) <= cols else line[: cols - 3] + "..."), highlight=False,
                              soft_wrap=True)
            if len(shown) < len(others):
                console.print(f"  - and {len(others) - len(shown)} more (qlora-doctor explain --json lists them)",
                              highlight=False, soft_wrap=True)
    if version_checks:
        console.print("[bold]versions in the paste[/], judged as `check -r` would:")
        for check in version_checks:
            console.print(f"  [{_STYLE[check.status]}]{_MARK[check.status]}[/] {escape(check.title)}: {escape(check.fix)}",
                          highlight=False, soft_wrap=True)
    return _text(console)

"""`qlora-doctor matrix report`: combinations x platforms, from the records on disk.

A cell says whether the record agrees with matrix.yaml: `pass` (works as expected), `fails as
documented` (a known-bad combination tripped its rule), or what went wrong instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_doctor.matrix.combos import Combination
from qlora_doctor.matrix.records import Record


@dataclass(frozen=True)
class Cell:
    text: str
    ok: bool
    record: str


@dataclass(frozen=True)
class MatrixTable:
    names: tuple[str, ...]
    platforms: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]
    expect: dict[str, str]

    @property
    def all_ok(self) -> bool:
        return all(c.ok for c in self.cells.values())

    def to_json(self) -> dict:
        return {"ok": self.all_ok, "platforms": list(self.platforms),
                "combinations": [{"name": name, "expect": self.expect.get(name, "?"), "results": {
                    platform: {"text": cell.text, "ok": cell.ok, "record": cell.record}
                    for platform in self.platforms if (cell := self.cells.get((name, platform))) is not None}}
                    for name in self.names]}


def cell_for(record: Record) -> Cell:
    if record.expect == "fail":
        text = ("fails as documented" if record.verdict == "pass" else "NOT as documented") + \
               f" ({record.combination.get('rule', '')})"
    elif record.verdict == "pass":
        text = "pass"
    else:
        failed = next((s for s in record.steps if s.status == "fail"), None)
        text = f"FAIL at {failed.name}" if failed else "FAIL"
    return Cell(f"{text}, {record.date[:10]}", record.verdict == "pass", record.path)


def build_table(combos: tuple[Combination, ...], records: tuple[Record, ...]) -> MatrixTable:
    names = [c.name for c in combos]
    names += sorted({r.name for r in records} - set(names))
    platforms = sorted({r.platform for r in records} | {p for c in combos for p in c.platforms if "*" not in p})
    cells = {(r.name, r.platform): cell_for(r) for r in records}
    expect = {c.name: c.expect for c in combos}
    for r in records:
        expect.setdefault(r.name, r.expect)
    return MatrixTable(tuple(names), tuple(platforms), cells, expect)


def _empty(table: MatrixTable, combos: dict[str, Combination], name: str, platform: str) -> str:
    combo = combos.get(name)
    if combo is not None and combo.applies_to(platform):
        return "not run"
    return "-"


def render_markdown(table: MatrixTable, combos: tuple[Combination, ...]) -> str:
    by_name = {c.name: c for c in combos}
    lines = ["| combination | expect | " + " | ".join(f"`{p}`" for p in table.platforms) + " |",
             "|---|---|" + "---|" * len(table.platforms)]
    for name in table.names:
        row = [table.cells[(name, p)].text if (name, p) in table.cells else _empty(table, by_name, name, p)
               for p in table.platforms]
        lines.append(f"| `{name}` | {table.expect.get(name, '?')} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def render_text(table: MatrixTable, combos: tuple[Combination, ...]) -> str:
    by_name = {c.name: c for c in combos}
    header = ["combination", "expect", *table.platforms]
    rows = [[name, table.expect.get(name, "?"),
             *(table.cells[(name, p)].text if (name, p) in table.cells else _empty(table, by_name, name, p)
               for p in table.platforms)] for name in table.names]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in out) + "\n"

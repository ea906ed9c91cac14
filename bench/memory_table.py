"""Turn bench/memory_accuracy.py results into a Markdown table for the README: the planner's predicted
peak against the measured `torch.cuda.max_memory_reserved` (and allocated), error in percent.

    python3 bench/memory_table.py bench/results/memory_accuracy.json [more.json ...] [--fit]

--fit also refits the planner's two fragmentation constants (reserved - allocated, as fractions of the
logits buffers and of the activations) by least squares on the measured points, to paste into
qlora_doctor/memory/estimate.py with the measurement they came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    runs, points = [], []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            sys.exit(f"{path}: cannot read the results ({err}); pass the JSON bench/memory_accuracy.py wrote")
        if not isinstance(data, dict) or "points" not in data:
            sys.exit(f"{path}: no `points` in it; pass the JSON bench/memory_accuracy.py wrote")
        runs.append({"file": str(path), **{k: data.get(k) for k in ("device", "versions", "command", "started_at")}})
        points.extend(data["points"])
    return runs, points


def table(runs: list[dict[str, Any]], points: list[dict[str, Any]]) -> str:
    lines = []
    for run in runs:
        versions = ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items() if v)
        lines.append(f"Measured on {run.get('device') or 'an unknown device'} ({versions}) by "
                     f"`{run.get('command')}`, {run.get('started_at')}.")
    lines += ["", "| model | seq | micro-batch | checkpointing | LoRA r | predicted reserved | measured reserved "
              "| error | predicted allocated | measured allocated | error |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        pred = p.get("predicted") or {}
        head = (f"| {p['shape']} | {p['seq']} | {p['batch']} | {'on' if p['checkpointing'] else 'off'} | {p['r']} "
                f"| {_gib(pred.get('peak_reserved_bytes'))} ")
        measured = p.get("measured")
        if p.get("status") == "measured" and measured:
            lines.append(head + f"| {_gib(measured['max_memory_reserved_bytes'])} | {p['error_reserved_pct']:+.1f}% "
                         f"| {_gib(pred.get('peak_allocated_bytes'))} | {_gib(measured['max_memory_allocated_bytes'])} "
                         f"| {p['error_allocated_pct']:+.1f}% |")
        else:
            why = p.get("reason") or p.get("error") or p.get("status")
            lines.append(head + f"| {p.get('status')}: {str(why)[:80]} | | {_gib(pred.get('peak_allocated_bytes'))} | | |")
    errors = [abs(p["error_reserved_pct"]) for p in points if p.get("error_reserved_pct") is not None]
    if errors:
        lines += ["", f"{len(errors)} measured points; largest reserved error {max(errors):.1f}%, "
                      f"{sum(e <= 10 for e in errors)} within 10%."]
    return "\n".join(lines)


def fit_fragmentation(points: list[dict[str, Any]]) -> str:
    """Least squares for reserved - allocated = a * logits + b * activations (measured points only)."""
    rows = []
    for p in points:
        m, pred = p.get("measured"), p.get("predicted") or {}
        if p.get("status") != "measured" or not m:
            continue
        parts = {r["name"]: r["bytes"] for r in pred.get("breakdown", [])}
        logits = sum(b for n, b in parts.items() if n.startswith("logits"))
        acts = sum(b for n, b in parts.items() if n.startswith("activations"))
        rows.append((logits, acts, m["max_memory_reserved_bytes"] - m["max_memory_allocated_bytes"]))
    if len(rows) < 2:
        return "fit: fewer than 2 measured points"
    sll = sum(l * l for l, _, _ in rows)
    saa = sum(a * a for _, a, _ in rows)
    sla = sum(l * a for l, a, _ in rows)
    sly = sum(l * y for l, _, y in rows)
    say = sum(a * y for _, a, y in rows)
    det = sll * saa - sla * sla
    if det == 0:
        return "fit: the points do not separate logits from activations"
    a = (sly * saa - say * sla) / det
    b = (sll * say - sla * sly) / det
    return (f"fit on {len(rows)} points: FRAGMENTATION_LOGITS = {a:.3f}, FRAGMENTATION_ACTIVATIONS = {b:.3f} "
            "(qlora_doctor/memory/estimate.py)")


def _gib(value: Any) -> str:
    return f"{value / GIB:.1f} GiB" if isinstance(value, (int, float)) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--fit", action="store_true", help="also refit the fragmentation constants")
    args = parser.parse_args()
    runs, points = load(args.results)
    print(table(runs, points))
    if args.fit:
        print()
        print(fit_fragmentation(points))


if __name__ == "__main__":
    main()

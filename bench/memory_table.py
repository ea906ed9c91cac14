"""Turn bench/memory_accuracy.py results into a Markdown table for the README: the planner's predicted
peak against the measured `torch.cuda.max_memory_reserved` (and allocated), error in percent.

    python3 bench/memory_table.py bench/results/memory_accuracy.json [more.json ...] [--fit]

--fit also refits the planner's fragmentation constants (reserved - allocated, as fractions of the
logits buffers and of the activations) by least squares on the measured points, separately for each
calibration path the planner used (`predicted.calibration`: `plain` -> FRAGMENTATION_*, `fast` ->
FAST_FRAGMENTATION_*; results from before the fast path count as plain), to paste into
qlora_doctor/memory/estimate.py with the measurement they came from. Where a path's points cannot
separate the two (with Liger the logits buffer is one small chunk), only the activations fraction is fitted.
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
    lines += ["", "| path | model | seq | micro-batch | checkpointing | LoRA r | predicted reserved | measured reserved "
              "| error | predicted allocated | measured allocated | error |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        pred = p.get("predicted") or {}
        ckpt = "off" if not p["checkpointing"] else "on" if p.get("checkpoint_layers", "all") == "all" \
            else f"first {p['checkpoint_layers']}"
        head = (f"| {_path_label(p)} | {p['shape']} | {p['seq']} | {p['batch']} | {ckpt} | {p['r']} "
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


def _path_label(p: dict[str, Any]) -> str:
    """The variant, and the levers the trainer turned on (from the point's `levers`)."""
    levers = p.get("levers") or {}
    on = [name for name, lever in levers.items() if lever.get("on") and name in ("upcast_unquantized", "liger_kernel",
                                                                                  "fused_lora")]
    return p.get("variant", "plain") + (f" ({', '.join(on)})" if on else "")


def calibration_of(p: dict[str, Any]) -> str:
    return (p.get("predicted") or {}).get("calibration", "plain")


def fit_fragmentation(points: list[dict[str, Any]]) -> str:
    """One fit per calibration path (see the module docstring)."""
    names = {"plain": ("FRAGMENTATION_LOGITS", "FRAGMENTATION_ACTIVATIONS"),
             "fast": ("FAST_FRAGMENTATION_LOGITS", "FAST_FRAGMENTATION_ACTIVATIONS")}
    out = []
    for path, (logits_name, acts_name) in names.items():
        some = [p for p in points if calibration_of(p) == path]
        if some:
            out.append(f"{path} path: " + _fit(some, logits_name, acts_name))
    return "\n".join(out) or "fit: no points"


def _fit(points: list[dict[str, Any]], logits_name: str, acts_name: str) -> str:
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
    if det <= 1e-6 * sll * saa:
        # Logits and activations move together (or there are no logits): one fraction of their sum.
        sxx = sum((l + a) ** 2 for l, a, _ in rows)
        if sxx == 0:
            return "fit: no logits or activations in the predicted breakdowns"
        b = sum((l + a) * y for l, a, y in rows) / sxx
        return (f"fit on {len(rows)} points (logits not separable, one fraction for both): {acts_name} = {b:.3f} "
                f"(keep {logits_name}; qlora_doctor/memory/estimate.py)")
    a = (sly * saa - say * sla) / det
    b = (sll * say - sla * sly) / det
    return (f"fit on {len(rows)} points: {logits_name} = {a:.3f}, {acts_name} = {b:.3f} "
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

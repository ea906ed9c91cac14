"""Turn bench/memory_accuracy.py results into a Markdown table for the README: the memory planner's
prediction, recomputed by the current planner code for every measured point, against the measured
`torch.cuda.max_memory_reserved` (and allocated), error in percent.

    python3 bench/memory_table.py bench/results/memory_accuracy_h100.json [more.json ...] [--fit]

Each point is replayed with the settings it ran with and the levers the trainer decided (`levers` in the
point, from speed.py), so the table always says what the planner predicts now, not what it predicted
when the point was measured (the stored `predicted` is ignored).

The reserved peak of a point starts at what the process held when its counters were reset
(`reset_peak_memory_stats`). Results that record it (`reserved_at_start_bytes`, `allocated_at_start_bytes`)
are replayed from that state: the planner is given the measured cache at the start (column `cache at
start`) instead of the cache loading alone leaves, and its reserved peak is never below what the point
started with (qlora_doctor/memory/estimate.py). Older results do not record it: a point whose reserved peak
holds more cache than it can have made itself (`inherited_cache`, a bound) is marked and left out of the
fit and of the error summary. Each worker's load is described under the table (`load_note`): whether the
worker had written the random checkpoint from the GPU first, and how far the load peaked above the model.

--fit refits the planner's three fragmentation constants (reserved - allocated = FRAGMENTATION_LOGITS *
logits rows + FRAGMENTATION_WORKING * working rows + FRAGMENTATION_BYTES) by least squares on the usable
points of every path together, and reports the errors in sample, leave-one-out and with each model shape
held out (fit on the others), to paste into qlora_doctor/memory/estimate.py with the measurement they
came from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
INHERITED_CACHE_TOLERANCE_BYTES = 256 * 2**20
"""Cache carried into a point below this is noise (the allocator's small segments)."""


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, points): each point carries its run's `shapes` under `config`."""
    runs, points = [], []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            sys.exit(f"{path}: cannot read the results ({err}); pass the JSON bench/memory_accuracy.py wrote")
        if not isinstance(data, dict) or "points" not in data or "shapes" not in data:
            sys.exit(f"{path}: no `points`/`shapes` in it; pass the JSON bench/memory_accuracy.py wrote")
        runs.append({"file": str(path), **{k: data.get(k) for k in ("device", "versions", "command", "started_at")}})
        for p in data["points"]:
            points.append({**p, "config": data["shapes"].get(p["shape"])})
    return runs, points


def settings_of(point: dict[str, Any]) -> Any:
    """The planner's TrainSettings for a measured point: bench_recipe's settings (adamw_torch, LoRA on all
    linear layers, dropout 0.05, NF4 + double quant, bf16 autocast) and the levers as the trainer decided
    them for that run."""
    from qlora_doctor.memory.estimate import TrainSettings

    levers = point.get("levers") or {}

    def on(name: str, default: bool) -> bool:
        return bool(levers[name]["on"]) if name in levers else default

    return TrainSettings(
        micro_batch=point["batch"], seq_len=point["seq"], gradient_checkpointing=point["checkpointing"],
        optim="adamw_torch", lora_r=point["r"], lora_targets="all-linear", lora_dropout=0.05,
        load_in_4bit=True, double_quant=True, compute_dtype="bfloat16", mixed_precision=True,
        upcast_unquantized=on("upcast_unquantized", point.get("variant") == "plain"),
        checkpoint_layers=point.get("checkpoint_layers", "all"),
        liger_kernel=on("liger_kernel", False), fused_lora=on("fused_lora", False))


def start_cache(point: dict[str, Any]) -> int | None:
    """The allocator cache (reserved - allocated) when the point's counters were reset, where recorded."""
    m = point.get("measured") or {}
    if "reserved_at_start_bytes" not in m or "allocated_at_start_bytes" not in m:
        return None
    return max(m["reserved_at_start_bytes"] - m["allocated_at_start_bytes"], 0)


def replay(point: dict[str, Any]) -> Any:
    """The current planner's Estimate for a measured point, from the cache it started with where recorded."""
    from qlora_doctor.memory.estimate import estimate

    return estimate(counts_of(point), settings_of(point), cache_at_start_bytes=start_cache(point))


def counts_of(point: dict[str, Any]) -> Any:
    from qlora_doctor.memory.model import count_parameters

    return count_parameters(point["config"], where=f"shape {point['shape']}")


def is_measured(point: dict[str, Any]) -> bool:
    return point.get("status") == "measured" and bool(point.get("measured")) and point.get("config") is not None


def inherited_cache(point: dict[str, Any], est: Any) -> str | None:
    """Why the point's measured reserved peak includes cache from before it that the replay cannot know
    of, or None.

    A point that recorded the cache at its start is replayed from it (`start_cache`): None. Otherwise a
    bound: cached free blocks (reserved - allocated at the peak) larger than everything the point
    allocated on top of the base model it started with cannot have come from the point itself."""
    m = point["measured"]
    if start_cache(point) is not None:
        return None
    parts = dict(est.breakdown)
    base = sum(b for n, b in parts.items() if n.startswith(("4-bit weights", "quantization constants",
                                                              "embeddings, lm_head, norms")))
    own = m["max_memory_allocated_bytes"] - base
    cached = m["max_memory_reserved_bytes"] - m["max_memory_allocated_bytes"]
    if cached > own + INHERITED_CACHE_TOLERANCE_BYTES:
        return (f"{cached / GIB:.2f} GiB cached at the peak, more than the {own / GIB:.2f} GiB the point allocated "
                "beyond its base model: cache left by the previous point")
    return None


def load_note(point: dict[str, Any], recorded: bool = True) -> str | None:
    """How the worker of a fresh point got its base, from `load_peak_reserved_bytes` (the reserved peak of
    the process from its start to the loaded model): with the whole model in bf16 or more, the worker had
    written the random checkpoint from the GPU before loading it (bench/memory_accuracy.py's
    save_random_checkpoint builds it there); else the load's peak above the loaded model, beside the cache
    the planner assumes loading leaves. `recorded`: whether the shape's points recorded their start cache."""
    from qlora_doctor.memory.estimate import load_cache_bytes, loaded_model_bytes

    peak = point.get("load_peak_reserved_bytes")
    if not point.get("fresh_process") or not peak or point.get("config") is None:
        return None
    counts, settings = counts_of(point), settings_of(point)
    model, bf16 = loaded_model_bytes(counts, settings), counts.total * 2
    if peak >= bf16:
        return (f"{point['shape']}: the worker's reserved peak before training, {_gib2(peak)}, is at least the "
                f"whole model in bf16 ({_gib2(bf16)}): it wrote the random checkpoint from the GPU before loading "
                "it (bench/memory_accuracy.py, save_random_checkpoint), " + (
                    "and its points started with whatever that left cached (`cache at start`)." if recorded else
                    "so its points may have started with cache that left (not recorded in these results)."))
    how = "built in 4-bit by the bench" if point.get("built_in_memory") else "loaded from disk"
    in_flight = counts.linear_largest * 2 + counts.linear_largest // 2
    return (f"{point['shape']}: {how}; its reserved peak up to the loaded model ({_gib2(model)}) was {_gib2(peak)}, "
            f"{_gib2(peak - model)} above it: about one weight in flight (the largest in bf16 with its 4-bit copy, "
            f"{_gib2(in_flight)}). The planner counts {_gib2(load_cache_bytes(counts, settings))} (that weight in "
            "bf16) as the cache loading leaves.")


def error_pct(predicted: int, measured: int) -> float:
    return 100 * (predicted / measured - 1)


def table(runs: list[dict[str, Any]], points: list[dict[str, Any]]) -> str:
    lines = []
    for run in runs:
        versions = ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items() if v)
        lines.append(f"Measured on {run.get('device') or 'an unknown device'} ({versions}) by "
                     f"`{run.get('command')}`, {run.get('started_at')}.")
    lines += ["", "Predictions recomputed by the current planner (`python3 bench/memory_table.py "
              + " ".join(_shown(r["file"]) for r in runs) + "`).",
              "", "| path | model | seq | micro-batch | checkpointing | LoRA r | cache at start | predicted reserved "
              "| measured reserved | error | predicted allocated | measured allocated | error | peak at |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    errors, alloc_errors, excluded, from_start = [], [], [], 0
    for p in points:
        ckpt = "off" if not p["checkpointing"] else "on" if p.get("checkpoint_layers", "all") == "all" \
            else f"first {p['checkpoint_layers']}"
        head = f"| {_path_label(p)} | {p['shape']} | {p['seq']} | {p['batch']} | {ckpt} | {p['r']} "
        if not is_measured(p):
            why = p.get("reason") or p.get("error") or p.get("status")
            lines.append(head + f"| | | {p.get('status')}: {str(why)[:80]} | | | | | |")
            continue
        est, m = replay(p), p["measured"]
        cache = start_cache(p)
        from_start += cache is not None
        er = error_pct(est.peak_reserved_bytes, m["max_memory_reserved_bytes"])
        ea = error_pct(est.peak_allocated_bytes, m["max_memory_allocated_bytes"])
        why = inherited_cache(p, est)
        mark = ""
        if why:
            excluded.append((p["name"], er, why))
            mark = f" [^{len(excluded)}]"
        else:
            errors.append(abs(er))
        alloc_errors.append(abs(ea))
        lines.append(head + f"| {_gib(cache)} | {_gib(est.peak_reserved_bytes)} | {_gib(m['max_memory_reserved_bytes'])} "
                     f"| {er:+.1f}%{mark} | {_gib(est.peak_allocated_bytes)} | {_gib(m['max_memory_allocated_bytes'])} "
                     f"| {ea:+.1f}% | {est.peak_phase} |")
    if errors:
        lines += ["", f"{len(errors)} measured points compared; largest reserved error {max(errors):.1f}%, "
                      f"{sum(e <= 10 for e in errors)} within 10%; largest allocated error "
                      f"{max(alloc_errors):.1f}% (all {len(alloc_errors)} points)."]
    measured = [p for p in points if is_measured(p)]
    if from_start:
        lines += ["", f"`cache at start`: the allocator cache (reserved - allocated) when the point's counters were "
                      f"reset, recorded by {from_start} of the {len(measured)} points, which are replayed from it: the "
                      "reserved peak is never below what training starts with, and the step reuses that cache "
                      "(qlora_doctor/memory/estimate.py); `start` under `peak at` marks a step that fits in it."
                      + (" `-`: not recorded, replayed with the planner's own figure for what loading leaves."
                         if from_start < len(measured) else "")]
    else:
        lines += ["", "`cache at start`: not recorded in these results (`-`); every point is replayed with the "
                      "planner's own figure for what loading leaves."]
    recorded = {p["shape"] for p in measured if start_cache(p) is not None}
    notes = [note for p in points if (note := load_note(p, p["shape"] in recorded))]
    if notes:
        lines += ["", "How each worker got its base model (`load_peak_reserved_bytes`):", ""] + [f"- {n}" for n in notes]
    for i, (name, er, why) in enumerate(excluded, 1):
        lines += ["", f"[^{i}]: {name}: not compared ({why}; {er:+.1f}% against that peak). "
                      "bench/memory_accuracy.py now empties the cache before undoing a point's levers and "
                      "records `reserved_at_start_bytes`."]
    return "\n".join(lines)


def _shown(file: str) -> str:
    """A results file as the command to regenerate the table names it: relative to the repository."""
    path = Path(file).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.as_posix()


def _path_label(p: dict[str, Any]) -> str:
    """The variant, and the levers the trainer turned on (from the point's `levers`)."""
    levers = p.get("levers") or {}
    on = [name for name, lever in levers.items() if lever.get("on") and name in ("upcast_unquantized", "liger_kernel",
                                                                                  "fused_lora")]
    return p.get("variant", "plain") + (f" ({', '.join(on)})" if on else "")


# --- the fit ---------------------------------------------------------------------------------------------

FIT_NAMES = ("FRAGMENTATION_LOGITS", "FRAGMENTATION_WORKING", "FRAGMENTATION_BYTES")


def fit_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per usable point: the features of the fragmentation model, the allocated prediction and the measurement."""
    rows = []
    for p in points:
        if not is_measured(p):
            continue
        est = replay(p)
        if inherited_cache(p, est) or est.peak_phase == "start":  # a start-bound peak holds no fragmentation
            continue
        parts = est.breakdown
        rows.append({
            "name": p["name"], "shape": p["shape"],
            "features": (sum(b for n, b in parts if n.startswith("logits")),
                         sum(b for n, b in parts if n.startswith("working")), GIB),
            "allocated": est.peak_allocated_bytes, "reserved": p["measured"]["max_memory_reserved_bytes"]})
    return rows


def least_squares(rows: list[dict[str, Any]]) -> tuple[float, ...]:
    """Coefficients c minimizing sum((allocated + c . features - reserved)^2) (normal equations, 3x3)."""
    n = len(rows[0]["features"])
    a = [[sum(r["features"][i] * r["features"][j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r["features"][i] * (r["reserved"] - r["allocated"]) for r in rows) for i in range(n)]
    return tuple(_solve(a, b))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12 * max(1.0, max(abs(x) for row in m for x in row)):
            raise ValueError("the points cannot separate the fragmentation terms; measure more varied points")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def predicted_reserved(row: dict[str, Any], coef: tuple[float, ...]) -> float:
    return row["allocated"] + sum(c * f for c, f in zip(coef, row["features"]))


def fit_report(points: list[dict[str, Any]]) -> str:
    rows = fit_rows(points)
    if len(rows) < 5:
        return "fit: fewer than 5 usable measured points"
    coef = least_squares(rows)
    in_sample = [error_pct(predicted_reserved(r, coef), r["reserved"]) for r in rows]
    loo = [error_pct(predicted_reserved(r, least_squares(rows[:i] + rows[i + 1:])), r["reserved"])
           for i, r in enumerate(rows)]
    lines = [f"fit on {len(rows)} points: {FIT_NAMES[0]} = {coef[0]:.3f}, {FIT_NAMES[1]} = {coef[1]:.3f}, "
             f"{FIT_NAMES[2]} = {coef[2]:.3f} GiB (qlora_doctor/memory/estimate.py)",
             f"  in sample: largest reserved error {max(map(abs, in_sample)):.1f}%",
             f"  leave-one-out: largest {max(map(abs, loo)):.1f}% "
             f"({rows[max(range(len(rows)), key=lambda i: abs(loo[i]))]['name']})"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        train = [r for r in rows if r["shape"] != shape]
        if len(train) < 5:
            continue
        held = least_squares(train)
        errs = [error_pct(predicted_reserved(r, held), r["reserved"]) for r in rows if r["shape"] == shape]
        lines.append(f"  {shape} held out (fit on the other shapes): largest {max(map(abs, errs)):.1f}% "
                     f"over {len(errs)} points")
    return "\n".join(lines)


def _gib(value: Any) -> str:
    return f"{value / GIB:.1f} GiB" if isinstance(value, (int, float)) else "-"


def _gib2(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--fit", action="store_true", help="also refit the fragmentation constants")
    args = parser.parse_args()
    runs, points = load(args.results)
    print(table(runs, points))
    if args.fit:
        print()
        print(fit_report(points))


if __name__ == "__main__":
    main()

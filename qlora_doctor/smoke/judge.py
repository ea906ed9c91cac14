"""Running `qlora-doctor smoke --json` in a subprocess and judging its result (used by `check --smoke` and
by `matrix run`).

A subprocess, because the thing under test can hang (a CUDA init that never returns) or kill the
interpreter (a segfault in a native library): either is a failed check with an excerpt of what the
process printed, never a hung or crashed doctor. The child gets its own process group so a timeout
also ends anything it started.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from qlora_doctor.core.report import Check
from qlora_doctor.core.subprocs import Completed, run_bounded


TITLE = "Functional test (4-bit NF4 + LoRA train, save, reload, generate)"


EXCERPT_CHARS = 1500


def smoke_command() -> list[str]:
    return [sys.executable, "-m", "qlora_doctor.cli", "smoke", "--json"]


def run_smoke_process(timeout_s: float, argv: list[str] | None = None) -> Completed:
    return run_bounded(argv or smoke_command(), timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def parse_smoke_output(stdout: str) -> dict[str, Any] | None:
    """The JSON object `smoke --json` printed, or None when there is none (crash, garbage)."""
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and "steps" in data else None


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def judge_smoke(process: Completed, timeout_s: float) -> Check:
    """The check for one smoke run (pure: tested on captured outputs)."""
    tail = excerpt(process.stderr or process.stdout)
    if process.returncode is None:
        return Check("smoke", "fail", TITLE, f"no result within {timeout_s:g} s: the test hung (killed). "
                     f"Last output: {tail or '(none)'}",
                     fix="run `qlora-doctor smoke` directly to see where it stops; a hang at the first CUDA "
                         "call usually means a driver/runtime mismatch (`qlora-doctor check`)",
                     found="hung", expected="pass")
    data = parse_smoke_output(process.stdout)
    if data is None:
        how = (f"killed by signal {-process.returncode}" if process.returncode < 0
               else f"exited {process.returncode}")
        return Check("smoke", "fail", TITLE, f"the test process {how} without a result: {tail or '(no output)'}",
                     fix="run `qlora-doctor smoke` to see the full error; paste it into `qlora-doctor explain -`",
                     found=how, expected="pass")
    steps = data.get("steps", [])
    facts = data.get("facts", {})
    passed = [s for s in steps if s.get("status") == "pass"]
    failed = next((s for s in steps if s.get("status") == "fail"), None)
    summary = "; ".join(_fact_lines(data, facts))
    if failed is not None or data.get("status") != "pass":
        detail = (f"step {failed['name']} failed: {failed['detail']}" if failed else "the test reported failure")
        error = excerpt(failed.get("error", ""), 800) if failed else ""
        return Check("smoke", "fail", TITLE, f"{detail}. {len(passed)}/{len(steps)} steps passed"
                     + (f"; {summary}" if summary else "") + (f"\n{error}" if error else ""),
                     fix="paste the error into `qlora-doctor explain -`; `qlora-doctor lock --repair` proposes "
                         "a tested set of versions",
                     found=f"{failed['name'] if failed else 'fail'}", expected="all steps pass")
    return Check("smoke", "pass", TITLE, f"all {len(steps)} steps passed in {data.get('duration_s', 0):.1f} s; "
                 + summary, found=data.get("device", "?"), expected="all steps pass")


def _fact_lines(data: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    lines = [f"device {data.get('device', '?')}"]
    if facts.get("bnb_library"):
        lines.append(f"bitsandbytes {facts.get('bnb_version')} loaded {facts['bnb_library']}")
    if "nf4_mean_abs_error" in facts:
        lines.append(f"NF4 round-trip mean |error| {facts['nf4_mean_abs_error']}")
    if "linear4bit_relative_error" in facts:
        lines.append("Linear4bit+LoRA forward/backward ok")
    losses = data.get("losses") or []
    if losses:
        lines.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return lines

"""How long `check -r` takes to resolve a requirements file: cold (an empty uv cache and an empty qlora-doctor
cache: every index page and wheel's metadata fetched from PyPI) against cached (the same call again: the
resolution is read from qlora-doctor's cache). Each call is the CLI in a fresh process, as a user runs it.

    python bench/resolve_speed.py --out bench/results/resolve_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "pinsets"
FILES = [("02-edgetam-gradio444-hub1.txt", "2025-11-16", "3.11"),
         ("29-good-axolotl-v0.12.2.txt", "2025-08-18", "3.11"),
         ("48-good-georgian-llmft-lock-tf4372.txt", "2024-03-27", "3.11"),
         ("13-ppllava-torch220-cu121-driver515.txt", "2024-11-07", "3.10")]


def timed_check(path: Path, as_of: str, machine: Path, env: dict[str, str]) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "qlora_doctor.cli", "check", "--json", "-r", str(path), "--machine", str(machine),
            "--as-of", as_of]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    seconds = time.perf_counter() - started
    report = json.loads(done.stdout)
    resolved = next(c for c in report["checks"] if c["id"] == "packages.resolved")
    return round(seconds, 2), {"status": resolved["status"], "found": resolved.get("found", "")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="resolve-speed-") as tmp:
        for name, as_of, python in FILES:
            machine = Path(tmp) / f"cpu-{python}.json"
            machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": f"{python}.0",
                                           "driver_version": None, "gpus": []}))
            env = {**os.environ, "UV_CACHE_DIR": str(Path(tmp) / name / "uv"),
                   "QLORA_DOCTOR_CACHE": str(Path(tmp) / name / "qlora-doctor")}
            cold, what = timed_check(CORPUS / name, as_of, machine, env)
            cached, again = timed_check(CORPUS / name, as_of, machine, env)
            rows.append({"file": name, "as_of": as_of, "python": python, "cold_s": cold, "cached_s": cached,
                         "resolved": what, "cached_resolved": again})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python bench/resolve_speed.py --out " + str(args.out),
              "what": "wall time of `qlora-doctor check --json -r FILE --machine cpu.json --as-of DATE` in a fresh "
                      "process; cold = empty UV_CACHE_DIR and QLORA_DOCTOR_CACHE, cached = the same call again",
              "machine": f"{platform.node()}: {os.cpu_count()} CPUs (shared with other work), {platform.platform()}",
              "resolver": subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True,
                                         text=True).stdout.strip(),
              "cases": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Time `qlora-doctor check` (no --smoke) against `python -m torch.utils.collect_env`, same machine, same run.

    python bench/check_speed.py --runs 5 --out bench/results/check_speed.json

Each command runs as a fresh process (what a user waits for); we report the median wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


def time_command(argv: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {"argv": argv, "runs": runs, "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4), "max_s": round(max(times), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    exe = Path(sys.executable).parent / "qlora-doctor"
    doctor = time_command([str(exe), "check", "--json"], args.runs)
    collect_env = time_command([sys.executable, "-m", "torch.utils.collect_env"], args.runs)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {n: metadata.version(n) for n in ("qlora-doctor", "torch", "transformers")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "qlora_doctor_check": doctor,
        "torch_collect_env": collect_env,
        "ratio_collect_env_over_check": round(collect_env["median_s"] / doctor["median_s"], 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Fixture matrix records, written as JSON files the way `matrix run` writes them, then read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CPU_MACHINE_JSON = {"os": "linux", "arch": "x86_64", "python": "3.11.7", "libc": "glibc 2.36", "driver_version": None,
                    "cuda_driver_version": None, "gpus": [], "gpu_vendor": "none", "source": "probe"}
A100_MACHINE_JSON = {"os": "linux", "arch": "x86_64", "python": "3.11.7", "libc": "glibc 2.36",
                     "driver_version": "570.86.15", "cuda_driver_version": "12.8",
                     "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
                               "memory_total_mib": 81920}], "gpu_vendor": "nvidia", "source": "probe"}


def record_json(name: str, platform: str, freeze: dict[str, str], *, works: bool = True, expect: str = "pass",
                verdict: str = "pass", date: str = "2026-11-01T00:00:00Z", rule: str = "",
                failed_at: str | None = None) -> dict[str, Any]:
    steps = []
    for stage in ("install", "check", "smoke"):
        if failed_at is None:
            steps.append({"name": stage, "status": "pass", "duration_s": 1.0, "detail": "", "excerpt": ""})
        elif steps and steps[-1]["status"] != "pass":
            steps.append({"name": stage, "status": "skip", "duration_s": 0.0, "detail": "", "excerpt": ""})
        else:
            status = "fail" if stage == failed_at else "pass"
            steps.append({"name": stage, "status": status, "duration_s": 1.0, "detail": "", "excerpt": ""})
    combination = {"name": name, "python": platform.split("-py")[1].split("-")[0], "expect": expect,
                   "pins": {k: freeze[k] for k in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
                            if k in freeze}, "platforms": [platform]}
    if expect == "fail":
        combination.update(reason="known bad", rule=rule, fails_at=failed_at or "check")
    machine = A100_MACHINE_JSON if "-cu" in platform else CPU_MACHINE_JSON
    return {"schema": 1, "combination": combination, "platform": platform, "verdict": verdict,
            "verdict_detail": "", "works": works, "date": date, "tool_version": "0.1.0", "mode": "venv",
            "duration_s": 3.0, "steps": steps, "failed_checks": [f"rule:{rule}"] if rule else [], "smoke": {},
            "machine": machine, "freeze": freeze}


def write_records(folder: Path, *records: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        (folder / f"{r['combination']['name']}--{r['platform']}.json").write_text(json.dumps(r))
    return folder


def stack(torch: str, transformers: str = "5.24.0", peft: str = "0.21.2", bnb: str = "0.50.2",
          accelerate: str = "1.15.0", datasets: str = "5.2.0", **extra: str) -> dict[str, str]:
    return {"torch": torch, "transformers": transformers, "peft": peft, "bitsandbytes": bnb,
            "accelerate": accelerate, "datasets": datasets, "numpy": "2.3.1", "pip": "24.0", **extra}

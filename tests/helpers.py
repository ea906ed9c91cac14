"""Build machines and environments for tests the way the product reads them (no fakes of logic)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from qlora_doctor.core.machine import Machine, machine_from_dict
from qlora_doctor.core.environment import Environment
from qlora_doctor.sources.requirements import environment_from_pins

DEFAULT_MACHINE: dict[str, Any] = {
    "os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": "550.54.15",
    "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_total_mib": 81920}],
}
CPU_MACHINE: dict[str, Any] = {"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": None,
                               "gpus": []}


def machine(**overlay: Any) -> Machine:
    data = copy.deepcopy(DEFAULT_MACHINE)
    data.update(overlay)
    for key, value in list(data.items()):
        if value == "":
            data[key] = None
    return machine_from_dict(data, "test-machine")


def env(**pins: str) -> Environment:
    return environment_from_pins({k.replace("_", "-"): v for k, v in pins.items()}, "test-pins")


def write_machine(path: Path, **overlay: Any) -> Path:
    data = copy.deepcopy(DEFAULT_MACHINE)
    data.update(overlay)
    path.write_text(json.dumps(data))
    return path

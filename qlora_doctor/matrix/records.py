"""Matrix result records: one JSON file per (combination, platform) under `matrix-results/`.

A record says what ran where and what came of it: the combination as matrix.yaml had it, the machine
(the `--machine` JSON), the environment's full list of installed versions, each step (install, check,
smoke) with pass/fail, an excerpt of the failure and its duration, the date and the tool version.
Records are small and read without importing anything heavy: `check` reads them on its fast path.

Platform ids: `os-arch-pyX.Y-accelerator`, the accelerator being `cpu`, or `cuXYZ-smNN` (torch's CUDA
build and the first NVIDIA GPU's compute capability), e.g. `linux-x86_64-py3.12-cu130-sm90`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packaging.version import InvalidVersion, Version

from qlora_doctor.core.errors import InputError
from qlora_doctor.core.fileio import write_atomic
from qlora_doctor.core.shipped import shipped_path

SCHEMA = 1
RESULTS_ENV = "QLORA_DOCTOR_RESULTS"


def default_results_dir() -> Path:
    """QLORA_DOCTOR_RESULTS, else `matrix-results/` of the source checkout the package runs from."""
    override = os.environ.get(RESULTS_ENV)
    return Path(override) if override else shipped_path("matrix-results")


def accelerator_id(gpu_vendor: str, torch_backend: str | None, torch_cuda: str | None,
                   compute_capability: str | None) -> str:
    """`cpu` unless torch is a CUDA build on an NVIDIA machine: then `cu130-sm90` (`cu130` if cc unknown)."""
    if gpu_vendor != "nvidia" or torch_backend != "cuda" or not torch_cuda:
        return "cpu"
    cuda = "cu" + "".join(torch_cuda.split(".")[:2])
    return f"{cuda}-sm{compute_capability.replace('.', '')}" if compute_capability else cuda


def platform_id(os_name: str, arch: str, python: str, accelerator: str) -> str:
    major_minor = ".".join(python.split(".")[:2])
    return f"{os_name}-{arch}-py{major_minor}-{accelerator}"


@dataclass(frozen=True)
class PlatformParts:
    os: str
    arch: str
    python: str
    accelerator: str
    cuda: Version | None
    """`cu130` -> 13.0; None for cpu."""
    sm: str | None
    """`sm90` -> `9.0`; None for cpu or unknown."""


def parse_platform(platform: str) -> PlatformParts:
    match = re.fullmatch(r"([a-z]+)-([a-z0-9_]+)-py(\d+\.\d+)-(cpu|cu(\d+)(\d)(?:-sm(\d+)(\d))?)", platform)
    if match is None:
        raise ValueError(f"{platform!r} is not a platform id like linux-x86_64-py3.11-cpu")
    cuda = Version(f"{match.group(5)}.{match.group(6)}") if match.group(5) else None
    sm = f"{match.group(7)}.{match.group(8)}" if match.group(7) else None
    return PlatformParts(match.group(1), match.group(2), match.group(3), match.group(4), cuda, sm)


@dataclass(frozen=True)
class StepResult:
    name: str
    """install, check or smoke."""
    status: Literal["pass", "fail", "skip"]
    duration_s: float = 0.0
    detail: str = ""
    """One line: what passed, or what failed (failed check ids, the failing smoke step)."""
    excerpt: str = ""
    """The end of the failing step's output."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "duration_s": self.duration_s, "detail": self.detail,
                "excerpt": self.excerpt}


@dataclass(frozen=True)
class Record:
    combination: dict[str, Any] = field(hash=False)
    """The combination as matrix.yaml described it when the record was made."""
    platform: str
    machine: dict[str, Any] = field(hash=False)
    freeze: dict[str, str] = field(hash=False)
    """Every installed distribution: canonical name -> version (empty when install failed)."""
    steps: tuple[StepResult, ...]
    works: bool
    """install, check and smoke all passed."""
    verdict: Literal["pass", "fail"]
    """Whether the outcome is the documented one (expect=pass: it works; expect=fail: it failed as documented)."""
    verdict_detail: str
    date: str
    tool_version: str
    mode: Literal["venv", "in-place"] = "venv"
    duration_s: float = 0.0
    failed_checks: tuple[str, ...] = ()
    """Ids of the checks that failed in `check --json`."""
    smoke: dict[str, Any] = field(default_factory=dict, hash=False)
    """device, losses, facts and failing step of the smoke run (when it ran)."""
    closure: tuple[str, ...] = ()
    """In place on a host image: the names `pip install qlora-doctor[train]` needs among `freeze` (the rest is the
    image's own). Empty for a fresh environment, whose freeze is that set already."""
    path: str = field(default="", compare=False)

    @property
    def locked_freeze(self) -> dict[str, str]:
        """What a lock made from this record pins: the freeze, less a host image's unrelated packages."""
        if not self.closure:
            return dict(self.freeze)
        keep = set(self.closure)
        return {n: v for n, v in self.freeze.items() if n in keep}

    @property
    def name(self) -> str:
        return str(self.combination.get("name", ""))

    @property
    def expect(self) -> str:
        return str(self.combination.get("expect", "pass"))

    def version(self, package: str) -> Version | None:
        raw = self.freeze.get(package)
        try:
            return Version(raw) if raw else None
        except InvalidVersion:
            return None

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "combination": self.combination, "platform": self.platform,
                "verdict": self.verdict, "verdict_detail": self.verdict_detail, "works": self.works,
                "date": self.date, "tool_version": self.tool_version, "mode": self.mode,
                "duration_s": self.duration_s, "steps": [s.to_json() for s in self.steps],
                "failed_checks": list(self.failed_checks), "smoke": self.smoke, "machine": self.machine,
                "freeze": dict(sorted(self.freeze.items())),
                **({"closure": list(self.closure)} if self.closure else {})}


def record_filename(name: str, platform: str) -> str:
    return f"{name}--{platform}.json"


def write_record(record: Record, results_dir: Path) -> Path:
    """Atomically: an interrupted run leaves the previous record or none, never half of one."""
    path = Path(results_dir) / record_filename(record.name, record.platform)
    write_atomic(path, json.dumps(record.to_json(), indent=2) + "\n")
    return path


def record_from_json(data: Any, where: str) -> Record:
    try:
        if data.get("schema") != SCHEMA:
            raise InputError(f"{where}: schema {data.get('schema')!r} is not {SCHEMA}; regenerate it with "
                             "`qlora-doctor matrix run`")
        steps = tuple(StepResult(s["name"], s["status"], float(s.get("duration_s", 0)), s.get("detail", ""),
                                 s.get("excerpt", "")) for s in data["steps"])
        return Record(combination=dict(data["combination"]), platform=str(data["platform"]),
                      machine=dict(data["machine"]), freeze={str(k): str(v) for k, v in data["freeze"].items()},
                      steps=steps, works=bool(data["works"]), verdict=data["verdict"],
                      verdict_detail=str(data.get("verdict_detail", "")), date=str(data["date"]),
                      tool_version=str(data["tool_version"]), mode=data.get("mode", "venv"),
                      duration_s=float(data.get("duration_s", 0)), failed_checks=tuple(data.get("failed_checks", ())),
                      smoke=dict(data.get("smoke", {})), closure=tuple(data.get("closure", ())), path=where)
    except InputError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{where}: not a matrix record ({type(err).__name__}: {err}); "
                         "delete it and rerun `qlora-doctor matrix run`")


def load_record(path: Path) -> Record:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the record ({err})")
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); rerun `qlora-doctor matrix run`")
    return record_from_json(data, str(path))


def load_records(results_dir: Path | None = None) -> tuple[Record, ...]:
    folder = Path(results_dir) if results_dir is not None else default_results_dir()
    if not folder.is_dir():
        return ()
    return tuple(load_record(p) for p in sorted(folder.glob("*.json")))

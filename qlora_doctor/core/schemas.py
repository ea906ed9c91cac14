"""The JSON documents `--json` prints, as types: published with `qlora-doctor schema --report NAME` (JSON
Schema) and checked against the real outputs by tests/test_json_schemas.py, so a field that changes is a
`schema_version` change, not a surprise.

Every document carries `schema_version` (qlora_doctor/cli/options.py SCHEMA_VERSION).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import ConfigDict
from typing_extensions import NotRequired, TypedDict

STRICT = ConfigDict(extra="forbid")

Status = Literal["pass", "warn", "fail", "unknown"]


class CheckDoc(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    id: str
    status: Status
    title: str
    detail: str
    fix: str
    sources: list[str]
    found: str
    expected: str


class GpuDoc(TypedDict, total=False):
    name: str
    compute_capability: str
    memory_total_mib: int
    memory_free_mib: int
    vendor: str


class MachineDoc(TypedDict):
    os: str
    arch: str
    python: str
    libc: Optional[str]
    driver_version: Optional[str]
    cuda_driver_version: Optional[str]
    gpus: list[GpuDoc]
    gpu_vendor: str
    host_memory_mib: Optional[int]
    source: str
    notes: list[str]


class CheckReportDoc(TypedDict):
    """`qlora-doctor check --json`."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    schema_version: int
    status: Literal["pass", "warn", "fail"]
    evidence: Literal["tested", "compatible", "unknown", "none"]
    checks: list[CheckDoc]
    machine: MachineDoc
    packages: dict[str, Any]
    tested: NotRequired[dict[str, Any]]


class MatchDoc(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    id: str
    title: str
    cause: str
    fix: str
    sources: list[str]
    matched: str
    score: float
    evidence: list[str]
    contradicted: bool


class ExplainDoc(TypedDict):
    """`qlora-doctor explain --json` (a pasted error or log)."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    schema_version: int
    confidence: Literal["high", "medium", "low", "none"]
    matches: list[MatchDoc]
    facts: dict[str, Any]
    versions_judged: list[CheckDoc]
    training_log: NotRequired[list[Any]]
    """Findings of the run watchdog on a pasted Trainer log (qlora_doctor/trainer/watch.py)."""


class ErrorDoc(TypedDict):
    """Any command with `--json` that stops on an error or a refusal (exit 1 or 2)."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    schema_version: int
    status: Literal["error", "refused", "ok"]
    exit_code: int
    errors: list[str]
    report: NotRequired[CheckReportDoc]


DOCUMENTS: dict[str, Any] = {"check": CheckReportDoc, "explain": ExplainDoc, "error": ErrorDoc}
"""`schema --report NAME` -> the type of that document."""


def json_schema(name: str) -> dict[str, Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(DOCUMENTS[name]).json_schema()


def validate(name: str, data: Any) -> None:
    """Raise pydantic's ValidationError when `data` is not a `name` document (unknown keys allowed at the top
    of `packages`/`facts`, which grow with the knowledge base)."""
    from pydantic import TypeAdapter

    TypeAdapter(DOCUMENTS[name]).validate_python(data, strict=False)

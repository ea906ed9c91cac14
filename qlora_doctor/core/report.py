"""Results of the doctor's checks: small frozen dataclasses, rendered by the CLI (qlora_doctor/cli/render.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qlora_doctor.core.errors import CheckFailed

Status = Literal["pass", "warn", "fail", "unknown"]

# A report's overall status: the worst of its checks. `unknown` never counts as pass, but it does not
# fail the report either: the check says what could not be read, and the exit code stays 0.
_RANK = {"pass": 0, "unknown": 1, "warn": 2, "fail": 3}


@dataclass(frozen=True)
class Check:
    """One judgement about the environment."""

    id: str
    """Stable identifier, e.g. `cuda.driver` or `rule:bnb-4bit-min-version`."""
    status: Status
    """pass, warn, fail, or unknown (the probe could not tell; `detail` says why)."""
    title: str
    """What was checked, in a few words."""
    detail: str = ""
    """What was found, and for a failure why it breaks."""
    fix: str = ""
    """The command or pin that fixes it (empty when nothing needs fixing)."""
    sources: tuple[str, ...] = ()
    """Upstream issues, release notes or docs behind the judgement."""
    found: str = ""
    """The value found on this machine or environment (for the table's `found` column)."""
    expected: str = ""
    """The value the check wants (for the table's `expected` column)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sources"] = list(self.sources)
        return data


def overall_status(checks: list[Check] | tuple[Check, ...]) -> Literal["pass", "warn", "fail"]:
    """fail if any check failed, warn if any warned or could not tell, else pass."""
    worst = max((_RANK[c.status] for c in checks), default=0)
    if worst == _RANK["fail"]:
        return "fail"
    return "warn" if worst >= _RANK["unknown"] else "pass"


@dataclass(frozen=True)
class Report:
    """Everything `qlora-doctor check` found: the checks plus the facts they were judged on."""

    checks: tuple[Check, ...]
    machine: dict[str, Any]
    """The machine judged, in the `--machine` file format."""
    packages: dict[str, Any]
    """name -> version (or null when not installed), plus torch's build."""
    tested: dict[str, Any] = field(default_factory=dict)
    """Whether the environment equals a combination with a passing matrix record."""

    @property
    def status(self) -> Literal["pass", "warn", "fail"]:
        return overall_status(self.checks)

    @property
    def evidence(self) -> str:
        """What a verdict rests on: `tested` (a passing matrix record for this platform and these versions),
        `compatible` (every rule and table check cleared, but no record), `unknown` (facts missing), or
        `none` when a check failed."""
        if self.status == "fail":
            return "none"
        if any(c.status == "unknown" for c in self.checks):
            return "unknown"
        return "tested" if self.tested.get("status") == "tested" else "compatible"

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": self.status,
            "evidence": self.evidence,
            "checks": [c.to_json() for c in self.checks],
            "machine": self.machine,
            "packages": self.packages,
        }
        if self.tested:
            data["tested"] = self.tested
        return data


class RunRefused(CheckFailed):
    """The doctor's checks failed, so training did not start. Carries the report for the CLI to show."""

    def __init__(self, report: Report):
        self.report = report
        failed = [f"{c.title}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in report.failed]
        super().__init__(["training refused: the environment failed the checks below; fix them, or pass "
                          "--skip-check to train anyway (recorded in manifest.json)", *failed])


def report_from_json(data: dict[str, Any]) -> Report:
    """A `Report` back from its JSON (report.to_json()), e.g. the parent's report in a launched rank."""
    checks = tuple(Check(**{**c, "sources": tuple(c.get("sources", ()))}) for c in data["checks"])
    return Report(checks=checks, machine=data.get("machine", {}), packages=data.get("packages", {}),
                  tested=data.get("tested", {}))

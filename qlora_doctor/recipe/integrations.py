"""The logging integrations `training.report_to` may name, read from integrations.toml (one row per
integration, each with its sources): which packages provide it, what to install, and how the recipe's
`training.project` reaches it (an environment variable, or TrainingArguments' own `project`)."""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from importlib import resources

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NO_REPORTING = "none"
"""The report_to value that logs nowhere (transformers' own spelling)."""


@dataclass(frozen=True)
class Integration:
    """One logging integration of transformers' Trainer."""

    name: str
    """The report_to value, e.g. `wandb`."""
    modules: tuple[str, ...]
    """Importable packages that provide it; any one suffices."""
    pip: str
    """The package to install when none of `modules` is importable."""
    project: str
    """`env:NAME` (the environment variable that carries the project), `arg` (TrainingArguments.project) or `none`."""
    run_name: str
    """How the integration uses TrainingArguments.run_name, in words."""
    sources: tuple[str, ...]

    @property
    def project_env(self) -> str | None:
        """The environment variable that names the project, when the integration reads one."""
        return self.project[len("env:"):] if self.project.startswith("env:") else None

    def installed(self) -> bool:
        """Whether a providing package is importable here (found, not imported: no side effects, no cost)."""
        return any(importlib.util.find_spec(module) is not None for module in self.modules)


@functools.lru_cache(maxsize=None)
def integrations() -> dict[str, Integration]:
    """Every supported integration by report_to name, in the table's order."""
    text = resources.files("qlora_doctor.recipe").joinpath("integrations.toml").read_text(encoding="utf-8")
    rows = tomllib.loads(text)["integration"]
    return {row["name"]: Integration(name=row["name"], modules=tuple(row["modules"]), pip=row["pip"],
                                     project=row["project"], run_name=row["run_name"],
                                     sources=tuple(row["sources"])) for row in rows}


def report_to_names() -> tuple[str, ...]:
    """Every value a report_to entry may take: `none` and each integration."""
    return (NO_REPORTING, *integrations())


def project_environment(targets: tuple[str, ...], project: str | None) -> dict[str, str]:
    """The environment variables that carry `project` to the chosen integrations (empty without a project)."""
    if project is None:
        return {}
    table = integrations()
    return {env: project for env in (table[t].project_env for t in targets if t in table) if env}

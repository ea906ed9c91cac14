"""`explain` on a paste that lists package versions (`pip list`, `pip freeze`, `transformers env`,
`collect_env`): the knowledge base's version rules judged on those versions, as `check -r` judges a file.

Only rules whose conditions are all about packages, and whose packages the paste names, are judged: a
paste says nothing reliable about the machine, so rules on drivers, GPUs or the OS are left to `check`.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.report import Check
from qlora_doctor.knowledge.loading import Conditions, load_rules

MIN_PACKAGES = 2
"""A paste naming fewer watched packages is not a version list (a stray `torch==2.1.0` in a command)."""


def _packages_only(when: Conditions) -> bool:
    return bool(when.packages) and not (when.missing or when.os or when.arch or when.python or when.gpu_vendor
                                        or when.driver or when.compute_capability or when.torch_cuda
                                        or when.torch_backend)


def judge_pasted_versions(packages: dict[str, str]) -> list[Check]:
    """A failing check for every package-only rule that the pasted versions fire."""
    versions: dict[str, Version] = {}
    for name, raw in packages.items():
        try:
            versions[canonical_name(name)] = Version(raw)
        except InvalidVersion:
            continue
    if len(versions) < MIN_PACKAGES:
        return []
    checks = []
    for rule in load_rules():
        if rule.when is None or rule.severity == "note" or not _packages_only(rule.when):
            continue
        if not all(name in versions for name, _ in rule.when.packages):
            continue
        if all(str(spec) == "" or spec.contains(versions[name], prereleases=True) for name, spec in rule.when.packages):
            found = ", ".join(f"{name} {versions[name]}" for name, _ in rule.when.packages)
            checks.append(Check(f"rule:{rule.id}", rule.severity, rule.title, rule.cause, fix=rule.fix,
                                sources=rule.sources, found=found, expected=f"not ({rule.when.describe()})"))
    return checks

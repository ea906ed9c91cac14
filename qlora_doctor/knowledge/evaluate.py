"""Evaluate the knowledge base's rules against a machine and an environment.

A condition is True, False, or None (the probe could not read the fact). A rule fires when all its
conditions are True, is clear when any is False, and is `unknown` otherwise: unknown is never pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from qlora_doctor.knowledge.loading import Conditions, Rule
from qlora_doctor.core.machine import Machine
from qlora_doctor.core.environment import Environment

Outcome = Literal["fires", "clear", "unknown"]


@dataclass(frozen=True)
class RuleResult:
    rule: Rule
    outcome: Outcome
    found: str
    """The facts that made it fire (or, for unknown, what could not be read)."""


def _spec_holds(spec: SpecifierSet, value: str | Version | None) -> bool | None:
    if value is None:
        return None
    try:
        version = value if isinstance(value, Version) else Version(value)
    except InvalidVersion:
        return None
    return spec.contains(version, prereleases=True)


def evaluate(conditions: Conditions, machine: Machine, env: Environment) -> tuple[Outcome, list[str], list[str]]:
    """(outcome, facts that hold, facts that could not be read)."""
    holds: list[str] = []
    unknown: list[str] = []

    def record(result: bool | None, fact: str, missing: str) -> bool:
        if result is None:
            unknown.append(missing)
            return True
        if result:
            holds.append(fact)
        return result

    for name, spec in conditions.packages:
        pkg = env.packages.get(name)
        if pkg is None and name in env.unpinned:
            record(None, name, f"{name}'s version (the file names it without one)")
            continue
        if pkg is None or (pkg.version is None and not pkg.problem):
            return "clear", [], []
        if not record(_spec_holds(spec, pkg.version), f"{name} {pkg.raw_version}",
                      f"{name}'s version ({pkg.problem or 'unreadable'})"):
            return "clear", [], []
    for name in conditions.missing:
        if env.installed(name) or name in env.unpinned:
            return "clear", [], []
        holds.append(f"{name} not installed")
    if conditions.os and not record(machine.os in conditions.os, f"os {machine.os}", "os"):
        return "clear", [], []
    if conditions.arch:
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.arch, machine.arch)
        allowed = {{"arm64": "aarch64"}.get(a, a) for a in conditions.arch}
        if not record(arch in allowed, f"arch {machine.arch}", "arch"):
            return "clear", [], []
    if conditions.python is not None and not record(
            _spec_holds(conditions.python, machine.python), f"Python {machine.python}", "Python version"):
        return "clear", [], []
    if conditions.gpu_vendor and not record(machine.gpu_vendor in conditions.gpu_vendor,
                                            f"GPU vendor {machine.gpu_vendor}", "GPU vendor"):
        return "clear", [], []
    nvidia = machine.gpu_vendor == "nvidia"
    if conditions.driver is not None:
        value = _spec_holds(conditions.driver, machine.driver) if nvidia else False
        if not record(value, f"driver {machine.driver_version}", "NVIDIA driver version"):
            return "clear", [], []
    if conditions.compute_capability is not None:
        gpus = machine.nvidia_gpus
        results = [_spec_holds(conditions.compute_capability, g.compute_capability) for g in gpus]
        if any(results):
            hit = next(g for g, r in zip(gpus, results) if r)
            holds.append(f"{hit.name} (compute capability {hit.compute_capability})")
        elif not gpus or all(r is False for r in results):
            return "clear", [], []
        else:
            unknown.append("a GPU's compute capability")
    if conditions.torch_backend or conditions.torch_cuda is not None:
        if env.torch.backend is None:
            if not env.installed("torch"):
                return "clear", [], []
            unknown.append(f"torch's build ({env.torch.how})")
        else:
            if conditions.torch_backend and not record(env.torch.backend in conditions.torch_backend,
                                                       f"torch {env.torch.backend} build", "torch build"):
                return "clear", [], []
            if conditions.torch_cuda is not None:
                value = _spec_holds(conditions.torch_cuda, env.torch.cuda) if env.torch.backend == "cuda" else False
                if not record(value, f"torch built for CUDA {env.torch.cuda}", "torch's CUDA version"):
                    return "clear", [], []
    return ("unknown" if unknown else "fires"), holds, unknown


def evaluate_rule(rule: Rule, machine: Machine, env: Environment) -> RuleResult:
    assert rule.when is not None
    outcome, holds, unknown = evaluate(rule.when, machine, env)
    found = "; ".join(holds) if outcome == "fires" else ("cannot read " + ", ".join(unknown) if unknown else "")
    return RuleResult(rule, outcome, found)


def evaluate_rules(rules: tuple[Rule, ...], machine: Machine, env: Environment) -> list[RuleResult]:
    return [evaluate_rule(r, machine, env) for r in rules if r.when is not None]

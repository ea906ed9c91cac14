"""`qlora-doctor constraints`: the knowledge base as a pip constraints file for one machine.

From each failing-severity rule whose `[rule.when]` has exactly one package condition (and no `missing` list), whose
machine conditions (os, arch, python, gpu_vendor, driver, compute_capability) all hold on the machine,
and which has no condition on torch's build: the package's affected range, negated. `<X` becomes
`>=X`, `>=X` becomes `<X`, `==X` becomes `!=X`; a bounded range `>=A,<B` can be written as one
exclusion only when it is exactly one release series (`>=0.45,<0.46` -> `!=0.45.*`). Anything else
is skipped, and the file says so. This is input for pip's resolver (`pip install -c FILE`), not one.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from qlora_doctor.knowledge.loading import Conditions, Rule
from qlora_doctor.core.machine import Machine
from qlora_doctor.core.environment import Environment, TorchBuild
from qlora_doctor.knowledge.evaluate import evaluate

_NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!="}


@dataclass(frozen=True)
class ConstraintLine:
    requirement: str
    """e.g. `accelerate>=1.1.0`."""
    rule_id: str
    title: str


@dataclass(frozen=True)
class SkippedRule:
    rule_id: str
    why: str


def negate(spec: SpecifierSet) -> str | None:
    """The complement of `spec` as one pip specifier set, or None when that needs an "or"."""
    specs = sorted(spec, key=lambda s: s.operator)
    if len(specs) == 1:
        s = specs[0]
        if s.operator in _NEGATE and not (s.operator != "==" and s.version.endswith(".*")):
            return f"{_NEGATE[s.operator]}{s.version}"
        return None
    if len(specs) == 2:
        lower = next((s for s in specs if s.operator == ">="), None)
        upper = next((s for s in specs if s.operator == "<"), None)
        if lower is None or upper is None:
            return None
        lo, hi = Version(lower.version), Version(upper.version)
        # >=A.B(.0),<A.(B+1): exactly the A.B series
        if (len(lo.release) >= 2 and all(x == 0 for x in lo.release[2:]) and not lo.pre and not lo.dev
                and hi.release[:2] == (lo.release[0], lo.release[1] + 1) and all(x == 0 for x in hi.release[2:])):
            return f"!={lo.release[0]}.{lo.release[1]}.*"
        # >=A.0,<A+1: exactly the A major series
        if lo.release[1:] in ((), (0,), (0, 0)) and hi.release[0] == lo.release[0] + 1 and all(
                x == 0 for x in hi.release[1:]):
            return f"!={lo.release[0]}.*"
    return None


def _machine_only(when: Conditions) -> Conditions:
    return Conditions(os=when.os, arch=when.arch, python=when.python, gpu_vendor=when.gpu_vendor,
                      driver=when.driver, compute_capability=when.compute_capability)


def constraints_for(machine: Machine, rules: tuple[Rule, ...]) -> tuple[list[ConstraintLine], list[SkippedRule]]:
    lines: list[ConstraintLine] = []
    skipped: list[SkippedRule] = []
    empty = Environment(packages={}, torch=TorchBuild(None, how="not judged"), source="constraints")
    for rule in rules:
        when = rule.when
        if when is None or rule.severity != "fail":
            continue  # warnings and notes are advice, not versions that break training
        if len(when.packages) != 1 or when.missing:
            if len(when.packages) > 1:
                skipped.append(SkippedRule(rule.id, f"{len(when.packages)} package conditions (a combination, "
                                                    "not one package's range)"))
            continue
        if when.torch_backend or when.torch_cuda is not None:
            skipped.append(SkippedRule(rule.id, "depends on torch's build, not on the machine"))
            continue
        outcome, _, _ = evaluate(_machine_only(when), machine, empty)
        if outcome == "clear":
            continue  # the rule cannot fire on this machine
        if outcome == "unknown":
            skipped.append(SkippedRule(rule.id, "a machine fact it needs is unknown"))
            continue
        name, spec = when.packages[0]
        if not str(spec):
            skipped.append(SkippedRule(rule.id, f"fires whenever {name} is installed (no range to exclude)"))
            continue
        negated = negate(spec)
        if negated is None:
            skipped.append(SkippedRule(rule.id, f"{name}{spec} has no single-range complement pip can express"))
            continue
        lines.append(ConstraintLine(f"{name}{negated}", rule.id, rule.title))
    return lines, skipped


def render_constraints(machine: Machine, lines: list[ConstraintLine], skipped: list[SkippedRule],
                       command: str) -> str:
    gpus = ", ".join(f"{g.name} (cc {g.compute_capability or '?'})" for g in machine.nvidia_gpus) or "no NVIDIA GPU"
    out = ["# pip constraints from the qlora-doctor knowledge base: versions known to break QLoRA training,",
           f"# excluded for this machine ({machine.os} {machine.arch}, Python {machine.python}, "
           f"driver {machine.driver_version or 'none'}, {gpus}).",
           f"# regenerate: {command}",
           "# use: pip install -c THIS_FILE ...   (constraints limit versions; they install nothing)"]
    width = max((len(line.requirement) for line in lines), default=0)
    out += [f"{line.requirement.ljust(width)}  # rule {line.rule_id}: {line.title}" for line in lines]
    if skipped:
        out.append("# not expressible as a constraint here:")
        out += [f"#   rule {s.rule_id}: {s.why}" for s in skipped]
    return "\n".join(out) + "\n"


def combination_constraints(machine: Machine, rules: tuple[Rule, ...], fixed: dict[str, str],
                            fired: tuple[str, ...] = ()) -> list[ConstraintLine]:
    """Constraints from rules on a combination of packages (`hub-hffolder-gradio`: huggingface_hub>=1.0 with
    gradio<5), which one package's range cannot express: once every other package of the rule is fixed
    (`fixed`, e.g. the user's `--keep gradio==4.44.0`) inside its range, the remaining package's range is
    excluded (`huggingface-hub<1.0`); and for a rule that `fired` on a resolution, the first package not fixed
    whose range can be excluded. Handed to the resolver, so it backtracks around the combination instead of
    the doctor rejecting its answer afterwards."""
    from packaging.version import InvalidVersion

    from qlora_doctor.core.environment import canonical_name

    fixed = {canonical_name(n): v for n, v in fixed.items()}
    empty = Environment(packages={}, torch=TorchBuild(None, how="not judged"), source="constraints")
    lines: list[ConstraintLine] = []
    for rule in rules:
        when = rule.when
        if (when is None or rule.severity != "fail" or len(when.packages) < 2 or when.missing
                or when.torch_backend or when.torch_cuda is not None):
            continue
        if evaluate(_machine_only(when), machine, empty)[0] == "clear":
            continue
        free = [(canonical_name(n), spec) for n, spec in when.packages if canonical_name(n) not in fixed]
        try:
            held = all(Version(fixed[canonical_name(n)]).public in spec or Version(fixed[canonical_name(n)]) in spec
                       for n, spec in when.packages if canonical_name(n) in fixed)
        except InvalidVersion:
            continue
        if not held:
            continue  # a fixed package is outside the rule's range: the combination cannot happen
        candidates = free if len(free) == 1 else (free if rule.id in fired else [])
        for name, spec in candidates:
            negated = negate(spec) if str(spec) else None
            if negated is not None:
                lines.append(ConstraintLine(f"{name}{negated}", rule.id, rule.title))
                break
    return lines

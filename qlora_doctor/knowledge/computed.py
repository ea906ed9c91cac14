"""Facts computed from the releases themselves (the harvester, knowledge/harvest/), judged like rules.

    load_computed()                      # data/computed/imports.json, typed
    computed_checks(env, rule_checks)    # `check`: one fail row per (importer, target) pair that breaks
    explain_import(paste, paste_versions) # `explain`: "cannot import name 'X' from 'Y'" answered from the facts

An import fact says: releases `importer_versions` of A run `from module import name` at import time (or on the
QLoRA path), and of B only `defined_in` define it. It breaks where A's installed version is in
`importer_versions` and B's is in none of `defined_in`. A floor says: releases of A refuse B below `minimum`
(stated in A's code, not in its metadata). Each fact keeps where it was read (package, release, file, line).

One cause, one row: where a hand-written rule on the same two packages already fires, the computed row is
dropped (the rule says it with its sources and upstream error text).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import Environment, canonical_name
from qlora_doctor.core.report import Check
from qlora_doctor.knowledge.loading import DATA_DIR, KnowledgeError, load_rules
from qlora_doctor.knowledge.paste import Match

COMPUTED = DATA_DIR / "computed" / "imports.json"
CANNOT_IMPORT = re.compile(r"cannot import name '?([A-Za-z_][A-Za-z0-9_]*)'? from (?!partially initialized)"
                           r"'?([A-Za-z_][\w.]*)'?")
"""Python's message for a name a module lacks (not the circular-import one, `from partially initialized module`)."""
HARVEST_DOC = "https://github.com/qlora-doctor/qlora-doctor/blob/main/qlora_doctor/knowledge/data/SCHEMA.md"


@dataclass(frozen=True)
class Provenance:
    package: str
    release: str
    file: str
    line: int

    def describe(self) -> str:
        return f"{self.package} {self.release}: {self.file}:{self.line}"

    @property
    def url(self) -> str:
        return f"https://pypi.org/project/{self.package}/{self.release}/"


def _within(specs: tuple[SpecifierSet, ...], version: Version) -> bool:
    """Whether `version` lies in any of the ranges (pre-releases included: harvested releases can be ones)."""
    return any(spec.contains(version, prereleases=True) for spec in specs)


@dataclass(frozen=True)
class ImportFact:
    importer: str
    importer_versions: tuple[SpecifierSet, ...]
    target: str
    module: str
    name: str
    defined_in: tuple[SpecifierSet, ...]
    """The target's releases that define `name` (empty: none of the harvested ones)."""
    module_missing_in: tuple[SpecifierSet, ...]
    provenance: tuple[Provenance, ...]

    def imports_at(self, version: Version) -> bool:
        return _within(self.importer_versions, version)

    def defined_at(self, version: Version) -> bool:
        return _within(self.defined_in, version)

    def breaks(self, importer: Version, target: Version) -> bool:
        return self.imports_at(importer) and not self.defined_at(target)

    def describe_defined(self) -> str:
        return " or ".join(_show(s) for s in self.defined_in) or "no harvested release"

    def site(self, version: Version | None = None) -> Provenance:
        """Where the import was read: the provenance of the range holding `version`, else the first."""
        for spec, where in zip(self.importer_versions, self.provenance):
            if version is not None and spec.contains(version, prereleases=True):
                return where
        return self.provenance[0]


@dataclass(frozen=True)
class FloorFact:
    importer: str
    importer_versions: tuple[SpecifierSet, ...]
    target: str
    minimum: Version
    how: str
    provenance: tuple[Provenance, ...]

    def breaks(self, importer: Version, target: Version) -> bool:
        return _within(self.importer_versions, importer) and \
            Version(target.base_version) < self.minimum


@dataclass(frozen=True)
class ComputedFacts:
    imports: tuple[ImportFact, ...]
    floors: tuple[FloorFact, ...]
    harvested: dict
    regenerate: str


def _show(spec: SpecifierSet) -> str:
    return str(spec) or "any release"


def _specs(raw: list, where: str) -> tuple[SpecifierSet, ...]:
    try:
        return tuple(SpecifierSet(s) for s in raw)
    except (InvalidSpecifier, TypeError) as err:
        raise KnowledgeError(f"{where}: {err}") from err


@functools.lru_cache(maxsize=4)
def load_computed(path: Path = COMPUTED) -> ComputedFacts:
    """The shipped facts (empty when the file is absent: a checkout before the first harvest)."""
    if not path.exists():
        return ComputedFacts((), (), {}, "")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KnowledgeError(f"{path}: {err}") from err
    imports, floors = [], []
    for i, raw in enumerate(data.get("imports", [])):
        where = f"{path.name}: imports[{i}]"
        try:
            imports.append(ImportFact(
                canonical_name(raw["importer"]), _specs(raw["importer_versions"], where), canonical_name(raw["target"]),
                raw["module"], raw["name"], _specs(raw["defined_in"], where),
                _specs(raw.get("module_missing_in", []), where),
                tuple(Provenance(canonical_name(raw["importer"]), p["release"], p["file"], int(p["line"]))
                      for p in raw["provenance"])))
        except (KeyError, TypeError, ValueError) as err:
            raise KnowledgeError(f"{where}: {err!r}") from err
    for i, raw in enumerate(data.get("floors", [])):
        where = f"{path.name}: floors[{i}]"
        try:
            floors.append(FloorFact(
                canonical_name(raw["importer"]), _specs(raw["importer_versions"], where), canonical_name(raw["target"]),
                Version(raw["minimum"]), raw["how"],
                tuple(Provenance(canonical_name(raw["importer"]), p["release"], p["file"], int(p["line"]))
                      for p in raw["provenance"])))
        except (KeyError, TypeError, ValueError, InvalidVersion) as err:
            raise KnowledgeError(f"{where}: {err!r}") from err
    return ComputedFacts(tuple(imports), tuple(floors), data.get("harvested", {}), data.get("regenerate", ""))


@functools.lru_cache(maxsize=2)
def load_requires(directory: Path = COMPUTED.parent) -> dict[str, dict[str, dict]]:
    """requires.json(.gz): name -> version -> {requires_dist, requires_python, uploaded} (format: data/SCHEMA.md)."""
    import gzip

    plain, packed = directory / "requires.json", directory / "requires.json.gz"
    try:
        if packed.exists():
            return json.loads(gzip.decompress(packed.read_bytes()))
        return json.loads(plain.read_text(encoding="utf-8")) if plain.exists() else {}
    except (OSError, ValueError) as err:
        raise KnowledgeError(f"{directory}: requires: {err}") from err


# --- check --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Broken:
    """The computed facts that break one (importer, target) pair in an environment."""

    importer: str
    importer_version: Version
    target: str
    target_version: Version
    imports: tuple[ImportFact, ...]
    floors: tuple[FloorFact, ...]

    def need(self) -> SpecifierSet:
        """What the target must satisfy for every fact here: the lowest `defined_in` range above the installed
        version for each name (or any range, for a name removed since), and every floor."""
        parts: list[str] = []
        for fact in self.imports:
            above = [s for s in fact.defined_in if _lower(s) is not None and _lower(s) > self.target_version]
            chosen = min(above, key=_lower) if above else (fact.defined_in[-1] if fact.defined_in else None)
            if chosen is not None:
                parts.append(str(chosen))
        parts += [f">={floor.minimum}" for floor in self.floors]
        return SpecifierSet(",".join(p for p in parts if p))

    def importer_way_out(self) -> str:
        """The importer releases that do not need this: the end of the importing range, if it ends."""
        highs = []
        for fact in self.imports:
            for spec in fact.importer_versions:
                if spec.contains(self.importer_version, prereleases=True):
                    highs += [Version(s.version) for s in spec if s.operator == "<"]
        return f"{self.importer}>={max(highs)}" if highs and len(highs) == len(self.imports) else ""


def _lower(spec: SpecifierSet) -> Version | None:
    lows = [Version(s.version) for s in spec if s.operator == ">="]
    return max(lows) if lows else None


def judge(env: Environment, facts: ComputedFacts | None = None) -> list[Broken]:
    facts = facts or load_computed()
    found: dict[tuple[str, str], tuple[list[ImportFact], list[FloorFact]]] = {}
    for fact in facts.imports:
        a, b = env.version(fact.importer), env.version(fact.target)
        if a is not None and b is not None and fact.breaks(a, b):
            found.setdefault((fact.importer, fact.target), ([], []))[0].append(fact)
    for floor in facts.floors:
        a, b = env.version(floor.importer), env.version(floor.target)
        if a is not None and b is not None and floor.breaks(a, b):
            found.setdefault((floor.importer, floor.target), ([], []))[1].append(floor)
    return [Broken(a, env.version(a), b, env.version(b), tuple(i), tuple(f))  # type: ignore[arg-type]
            for (a, b), (i, f) in sorted(found.items())]


def computed_checks(env: Environment, rule_checks: list[Check]) -> list[Check]:
    """One `fail` row per broken (importer, target) pair, unless a firing hand-written rule names both."""
    by_id = {r.id: r for r in load_rules()}
    covered: list[set[str]] = []
    for check in rule_checks:
        rule = by_id.get(check.id.removeprefix("rule:"))
        if rule is not None and rule.when is not None and check.status in ("fail", "warn", "unknown"):
            covered.append({name for name, _ in rule.when.packages})
    checks = []
    for broken in judge(env):
        if any({broken.importer, broken.target} <= names for names in covered):
            continue
        checks.append(_check(broken))
    return checks


def _check(broken: Broken) -> Check:
    a = f"{broken.importer} {broken.importer_version}"
    b = f"{broken.target} {broken.target_version}"
    reasons, sources = [], []
    for fact in broken.imports:
        where = fact.site(broken.importer_version)
        lacks = ("has no module " + fact.module) if any(
            s.contains(broken.target_version, prereleases=True) for s in fact.module_missing_in) else \
            f"does not define {fact.name}"
        reasons.append(f"it runs `from {fact.module} import {fact.name}` at import time ({where.file}:{where.line} in "
                       f"{where.package} {where.release}), and {b} {lacks} (defined in {fact.target} "
                       f"{fact.describe_defined()})")
        sources.append(where.url)
    for floor in broken.floors:
        where = floor.provenance[0]
        reasons.append(f"{floor.how} ({where.file}:{where.line} in {where.package} {where.release})")
        sources.append(where.url)
    need = broken.need()
    way_out = broken.importer_way_out()
    fix = f"pip install '{broken.target}{need}'" + (f"   # or pip install '{way_out}'" if way_out else "")
    names = ", ".join(f.name for f in broken.imports) or f"{broken.target}>={broken.floors[0].minimum}"
    return Check(f"computed:{broken.importer}:{broken.target}", "fail",
                 f"{a} cannot work with {b} ({names})",
                 f"{a}: " + "; ".join(reasons)
                 + ". Computed from the releases' code by the harvester (knowledge/harvest/).",
                 fix=fix, sources=tuple(dict.fromkeys(sources)), found=f"{a}, {b}",
                 expected=f"{broken.target}{need}")


# --- explain ------------------------------------------------------------------------------------

def installed_versions() -> dict[str, str]:
    """This environment's versions of the packages the facts name (metadata only: nothing is imported)."""
    from importlib import metadata

    found = {}
    facts = load_computed()
    for name in {f.importer for f in facts.imports} | {f.target for f in facts.imports}:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def explain_import(paste: str, paste_versions: dict[str, str], installed: dict[str, str] | None = None) -> list[Match]:
    """Answers for the last "cannot import name" in `paste`: the facts on that name from that module, best first.
    Versions named in the paste (`pip list`, `pkg==x`) are judged first, else `installed` (this machine's)."""
    matches = list(CANNOT_IMPORT.finditer(paste))
    if not matches:
        return []
    found = matches[-1]
    name, module = found.group(1), found.group(2)
    facts = [f for f in load_computed().imports if f.name == name and f.module == module] or \
        [f for f in load_computed().imports if f.name == name and f.module.split(".")[0] == module.split(".")[0]]
    answers = []
    for fact in facts:
        evidence, contradicted, score = [], False, 10.0 + (1.0 if fact.module == module else 0.0)
        for package, role in ((fact.target, "target"), (fact.importer, "importer")):
            raw, how = paste_versions.get(package), "the paste shows"
            if raw is None and installed:
                raw, how = installed.get(package), "installed here:"
            try:
                version = Version(raw) if raw else None
            except InvalidVersion:
                version = None
            if version is None:
                continue
            if role == "target":
                ok = not fact.defined_at(version)
                evidence.append(f"{how} {package} {version}, which " + ("lacks" if ok else "defines") + f" {name}")
            else:
                ok = fact.imports_at(version)
                evidence.append(f"{how} {package} {version}, which " + ("imports" if ok else "does not import")
                                + f" {name} from {fact.module}")
            if how == "the paste shows":  # this machine's versions inform; they may not be the paste's machine
                score += 3.0 if ok else -20.0
                contradicted = contradicted or not ok
        where = fact.provenance[-1]
        ranges = ", ".join(_show(s) for s in fact.importer_versions)
        answers.append(Match(
            id=f"computed:{fact.importer}:{fact.module}.{fact.name}",
            title=f"{fact.importer} {ranges} imports {name} from {fact.module}, which only {fact.target} "
                  f"{fact.describe_defined()} define",
            cause=f"{fact.importer} ({ranges}) runs `from {fact.module} import {name}` at import time "
                  f"({where.file}:{where.line} in {where.package} {where.release}); the {fact.target} releases that "
                  f"define {name} are {fact.describe_defined()}, so with any other {fact.target} importing "
                  f"{fact.importer} fails. Computed from the releases' code by the harvester.",
            fix=(f"pip install '{fact.target}{fact.defined_in[-1]}'" if fact.defined_in else
                 f"pip install a {fact.importer} outside {ranges}"),
            sources=tuple(dict.fromkeys(p.url for p in fact.provenance)),
            matched=found.group(0), evidence=tuple(evidence), contradicted=contradicted, score=score))
    answers.sort(key=lambda a: a.score, reverse=True)
    return answers

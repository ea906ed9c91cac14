"""Resolve a requirements file with no package index: over qlora-doctor's bundled snapshot of PyPI metadata
(issue #14). The snapshot (knowledge/data/computed/requires.json.gz, `knowledge.computed.load_requires()`)
holds the declared requirements (Requires-Dist, Requires-Python, upload date, yanked) of every release since
2023 of the stack's packages; resolvelib (the resolver inside pip) picks versions over it for the machine.

    resolution = resolve_prepared(prepare_requirements(path, machine), machine, as_of="2025-11-16")

As pip would: markers evaluated for the machine (python_version, sys_platform, platform_machine, extras), a
release's Requires-Python must admit the machine's Python, newest release first, yanked releases only when
pinned exactly (PEP 592), `--as-of` keeps releases uploaded on or before the date, `-c` constraints limit.

A package outside the snapshot (scipy, sentencepiece, nvidia-*...) is no failure: it stays in the answer at
the exact pin asked for (`==`), else of unknown version, and its own requirements are not followed, so a
watched package nothing in the snapshot pulls is of unknown version too where an outside package may pull it
(`resolve_prepared`). So is a snapshot package asked for at releases older than the snapshot's first
(`accelerate==0.15.0`, 2022).
What the snapshot cannot see: which releases have a wheel for the platform (torch 2.0 has none for Python 3.12).

Bounded: at most `MAX_ROUNDS` resolver rounds and `TIMEOUT_S` seconds, each an error in one line.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.markers import InvalidMarker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from resolvelib import (
    AbstractProvider,
    BaseReporter,
    ResolutionImpossible,
    ResolutionTooDeep,
    Resolver,
)

from qlora_doctor.core.environment import WATCHED, canonical_name
from qlora_doctor.sources.reqfile import (
    logical_lines,
    marker_environment,
    name_from_url,
    with_build,
)
from qlora_doctor.sources.resolution import Resolution

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.sources.reqfile import Prepared

RESOLVER = "qlora-doctor's bundled snapshot"
"""`Resolution.resolver` of an answer from the snapshot."""
MAX_ROUNDS = 2000
"""resolvelib rounds (one pin or backtrack each); the stack's files take under 200."""
TIMEOUT_S = 20.0
_PER_LINE_OPTION = re.compile(r"\s+--hash[= ]\S+|\s+(?:-C|--config-settings|--global-option|--install-option)[= ]\S+")


class SnapshotTimeout(Exception):
    """The wall-time bound passed during resolution."""


@dataclass(frozen=True)
class Need:
    """One requirement as the resolver sees it: on `name` (with `extras`), from `parent` (None: the file)."""

    name: str
    extras: frozenset[str]
    specifier: SpecifierSet
    parent: str | None = None
    url: str | None = None

    @property
    def key(self) -> str:
        return _key(self.name, self.extras)

    def __str__(self) -> str:
        extras = f"[{','.join(sorted(self.extras))}]" if self.extras else ""
        return f"{self.name}{extras}{self.specifier}" + (f" @ {self.url}" if self.url else "")


@dataclass(frozen=True)
class Candidate:
    """A release of `name` chosen with `extras`; `outside`: not in the snapshot (version None: unknown)."""

    name: str
    version: Version | None
    extras: frozenset[str] = frozenset()
    outside: bool = False

    @property
    def key(self) -> str:
        return _key(self.name, self.extras)

    def __str__(self) -> str:
        return f"{self.name} {self.version if self.version is not None else '(version unknown)'}"


def _key(name: str, extras: frozenset[str]) -> str:
    return f"{name}[{','.join(sorted(extras))}]" if extras else name


@dataclass(frozen=True)
class Release:
    version: Version
    requires_dist: tuple[str, ...]
    requires_python: SpecifierSet | None
    uploaded: str
    yanked: bool


@functools.lru_cache(maxsize=2)
def snapshot_releases() -> tuple[dict[str, tuple[Release, ...]], str]:
    """The bundled snapshot: name -> releases newest first, and the newest upload date in it."""
    from qlora_doctor.knowledge.computed import load_requires

    releases: dict[str, tuple[Release, ...]] = {}
    newest = ""
    for name, per in load_requires().items():
        found = []
        for raw, info in per.items():
            try:
                version = Version(raw)
            except InvalidVersion:
                continue
            try:
                python = SpecifierSet(info.get("requires_python") or "")
            except InvalidSpecifier:  # pip ignores a Requires-Python it cannot read
                python = None
            found.append(Release(version, tuple(info.get("requires_dist") or ()), python, info.get("uploaded", ""),
                                 bool(info.get("yanked"))))
            newest = max(newest, info.get("uploaded", ""))
        releases[canonical_name(name)] = tuple(sorted(found, key=lambda r: r.version, reverse=True))
    return releases, newest


def _exact(specifier: SpecifierSet) -> Version | None:
    """The version an `==X` (not `==X.*`) or `===X` pins, else None."""
    for spec in specifier:
        if spec.operator in ("==", "===") and not spec.version.endswith(".*"):
            try:
                return Version(spec.version)
            except InvalidVersion:
                return None
    return None


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


@functools.lru_cache(maxsize=65536)
def _parsed(line: str) -> Requirement | None:
    """A Requires-Dist line, parsed once per process (the same lines recur across releases and resolutions)."""
    try:
        return Requirement(line)
    except InvalidRequirement:
        return None


def _admits_older(specifiers: Iterable[SpecifierSet], oldest: Version) -> bool:
    """Some version older than `oldest` (the snapshot's first release) satisfies every specifier: probes are
    0, each bound, and each bound with a further `.1`."""
    specifiers = list(specifiers)
    probes = {Version("0")}
    for specifier in specifiers:
        for spec in specifier:
            try:
                bound = Version(spec.version.removesuffix(".*"))
            except InvalidVersion:
                continue
            probes |= {bound, Version(".".join(map(str, (*bound.release, 1))))}
    return any(probe < oldest and all(s.contains(probe, prereleases=True) for s in specifiers) for probe in probes)


class SnapshotProvider(AbstractProvider):
    """resolvelib's provider over the snapshot: requirements are `Need`s, candidates `Candidate`s."""

    def __init__(self, releases: Mapping[str, tuple[Release, ...]], markers: dict[str, str], as_of: str | None,
                 constraints: Mapping[str, tuple[SpecifierSet, ...]], deadline: float) -> None:
        self.releases = releases
        self.markers = markers
        self.python = Version(markers["python_full_version"])
        self.as_of = as_of
        self.constraints = constraints
        self.deadline = deadline
        self.predating: set[str] = set()
        """Snapshot packages asked for at releases older than the snapshot's: treated as outside it."""

    def _tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise SnapshotTimeout

    def identify(self, requirement_or_candidate: Need | Candidate) -> str:
        return requirement_or_candidate.key

    def get_preference(self, identifier: str, resolutions, candidates, information, backtrack_causes) -> tuple:
        needs = [info.requirement for info in information[identifier]]
        cause = any(c.requirement.name == identifier.split("[")[0] for c in backtrack_causes)
        pinned = any(_exact(n.specifier) is not None for n in needs)
        direct = any(n.parent is None for n in needs)
        return (not cause, not pinned, identifier.split("[")[0] in self.releases, not direct, identifier)

    def usable(self, release: Release, specs: list[SpecifierSet]) -> bool:
        """Could pip install `release` here at all (date, Python, yanked)?"""
        if self.as_of and release.uploaded > self.as_of:
            return False
        if release.requires_python is not None and not release.requires_python.contains(self.python, prereleases=True):
            return False
        return not release.yanked or any(_exact(spec) == release.version for spec in specs)

    def find_matches(self, identifier: str, requirements, incompatibilities) -> list[Candidate]:
        self._tick()
        needs: list[Need] = list(requirements[identifier])
        name = needs[0].name if needs else identifier.split("[")[0]
        extras = frozenset().union(*(n.extras for n in needs)) if needs else frozenset()
        bad = {c.version for c in incompatibilities[identifier]}
        specs = [n.specifier for n in needs] + list(self.constraints.get(name, ()))
        releases = self.releases.get(name)
        if releases is not None and name not in self.predating:
            found = [Candidate(name, r.version, extras) for r in releases if r.version not in bad
                     and all(s.contains(r.version, prereleases=True) for s in specs) and self.usable(r, specs)]
            if found or not _admits_older(specs, releases[-1].version):
                return found
            self.predating.add(name)
        pinned = next((v for v in map(_exact, specs) if v is not None), None)
        if pinned is None:
            url = next((n.url for n in needs if n.url), None)
            pinned = _version(name_from_url(url)[1]) if url else None  # a wheel's file name gives it
        if pinned is not None and (pinned in bad or not all(s.contains(pinned, prereleases=True) for s in specs)):
            return []
        if pinned is None and None in bad:
            return []
        return [Candidate(name, pinned, extras, outside=True)]

    def is_satisfied_by(self, requirement: Need, candidate: Candidate) -> bool:
        if candidate.version is None:
            return True
        return requirement.specifier.contains(candidate.version, prereleases=True)

    def get_dependencies(self, candidate: Candidate) -> list[Need]:
        self._tick()
        if candidate.outside or candidate.version is None:
            return []
        release = next(r for r in self.releases[candidate.name] if r.version == candidate.version)
        parent = f"{candidate.name} {candidate.version}"
        needs = [Need(candidate.name, frozenset(), SpecifierSet(f"=={candidate.version}"), parent)] \
            if candidate.extras else []
        for line in release.requires_dist:
            req = _parsed(line)
            if req is None or not self._wanted(req, candidate.extras):
                continue
            name = canonical_name(req.name)
            needs.append(Need(name, frozenset(canonical_name(e) for e in req.extras) if name in self.releases
                              else frozenset(), req.specifier, parent, req.url))
        return needs

    def _wanted(self, req: Requirement, extras: frozenset[str]) -> bool:
        """The line applies to this candidate: its marker holds here, for the base (no extra) or an asked extra."""
        if req.marker is None:
            return not extras  # an extras candidate depends on its base, which carries these
        try:
            if extras:
                return not req.marker.evaluate({**self.markers, "extra": ""}) and \
                    any(req.marker.evaluate({**self.markers, "extra": e}) for e in extras)
            return req.marker.evaluate({**self.markers, "extra": ""})
        except (InvalidMarker, ValueError, TypeError):
            return False

    def narrow_requirement_selection(self, identifiers, resolutions, candidates, information, backtrack_causes):
        return identifiers

    def why_none(self, name: str, specs: list[SpecifierSet]) -> str:
        """Why no release of `name` in the snapshot satisfies `specs` here, in a few words."""
        releases = self.releases.get(name, ())
        matching = [r for r in releases if all(s.contains(r.version, prereleases=True) for s in specs)]
        if not matching:
            if len([s for s in specs if str(s)]) > 1:
                return "no release satisfies all of them"
            return (f"no such release (the snapshot has {releases[-1].version} to {releases[0].version})"
                    if releases else "no such release")
        if self.as_of and all(r.uploaded > self.as_of for r in matching):
            return f"{matching[-1].version} and later were uploaded after {self.as_of}"
        python = [r for r in matching if r.requires_python is not None
                  and not r.requires_python.contains(self.python, prereleases=True)]
        if len(python) == len(matching):
            return f"{python[0].version} requires Python {python[0].requires_python}, the machine has {self.python}"
        if all(r.yanked for r in matching):
            return f"{matching[0].version} is yanked (pin it exactly to install it)"
        return "no release satisfies all of them with the rest"


@dataclass(frozen=True)
class SnapshotAnswer:
    """What the snapshot resolver found for a set of requirements."""

    resolved: dict[str, str]
    """Packages resolved from the snapshot -> version."""
    outside: dict[str, str | None]
    """Packages outside the snapshot (or older than it) -> the exact pin asked for, or None (unknown)."""
    pulled_by: dict[str, tuple[str, ...]] = field(default_factory=dict)
    named: tuple[str, ...] = ()
    error: str | None = None
    seconds: float = 0.0
    newest: str = ""
    """The newest upload date in the snapshot (how fresh it is)."""

    def summary(self, shown: int = 12) -> str:
        order = sorted(self.outside.items(), key=lambda item: (item[0] not in self.named, item[0]))  # the file's first
        names = [f"{n}=={v}" if v else n for n, v in order]
        outside = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        return (f"resolved {len(self.resolved)} packages from qlora-doctor's bundled snapshot of PyPI metadata "
                f"(releases up to {self.newest}; {len(self.outside)} packages outside it"
                + (f": {outside}; their own requirements not followed, so a version pulled here may be newer than "
                   "pip's where one of them caps it)" if outside else ")"))


def read_needs(text: str, constraints: str = "") -> tuple[list[Need], dict[str, tuple[SpecifierSet, ...]]]:
    """Prepared requirements text (reqfile.prepare_requirements) -> the requirements and the constraints (the
    `-c FILE` lines' and `constraints`), by name. Options and nameless paths are not requirements here."""
    needs: list[Need] = []
    limits: dict[str, list[SpecifierSet]] = {}
    constraint_texts = [constraints]
    for _, line in logical_lines(text):
        if line.startswith("-"):
            found = re.match(r"^(?:-c|--constraint)[= ]?\s*(\S+)", line)
            if found and Path(found.group(1)).is_file():
                constraint_texts.append(Path(found.group(1)).read_text(encoding="utf-8"))
            continue
        req = _requirement(line)
        if req is not None:
            needs.append(Need(canonical_name(req.name), frozenset(canonical_name(e) for e in req.extras),
                              req.specifier, None, req.url))
    for constraint_text in constraint_texts:
        for _, line in logical_lines(constraint_text):
            req = None if line.startswith("-") else _requirement(line)
            if req is not None:
                limits.setdefault(canonical_name(req.name), []).append(req.specifier)
    return needs, {n: tuple(s) for n, s in limits.items()}


def _requirement(line: str) -> Requirement | None:
    try:
        return Requirement(_PER_LINE_OPTION.sub("", f" {line}").strip())
    except InvalidRequirement:
        return None


def resolve_needs(needs: list[Need], machine: Machine, as_of: str | None = None,
                  constraints: Mapping[str, tuple[SpecifierSet, ...]] | None = None,
                  timeout_s: float = TIMEOUT_S, max_rounds: int = MAX_ROUNDS) -> SnapshotAnswer:
    """Resolve `needs` over the snapshot for `machine` (as of `as_of`, YYYY-MM-DD, inclusive)."""
    started = time.monotonic()
    releases, newest = snapshot_releases()
    markers = marker_environment(machine)
    provider = SnapshotProvider(releases, markers, as_of, constraints or {}, started + timeout_s)
    named = tuple(dict.fromkeys(n.name for n in needs))
    answer = functools.partial(SnapshotAnswer, named=named, newest=newest)
    try:
        result = Resolver(provider, BaseReporter()).resolve(needs, max_rounds=max_rounds)
    except ResolutionImpossible as err:
        return answer({}, {}, error=_conflict(err.causes, provider, machine, as_of),
                      seconds=round(time.monotonic() - started, 3))
    except ResolutionTooDeep:
        return answer({}, {}, error=f"the snapshot resolver gave up after {max_rounds} rounds of backtracking",
                      seconds=round(time.monotonic() - started, 3))
    except SnapshotTimeout:
        return answer({}, {}, error=f"the snapshot resolver did not answer within {timeout_s:g} s",
                      seconds=round(time.monotonic() - started, 3))
    resolved: dict[str, str] = {}
    outside: dict[str, str | None] = {}
    pulled: dict[str, set[str]] = {}
    for candidate in result.mapping.values():
        if candidate.outside:
            outside[candidate.name] = str(candidate.version) if candidate.version is not None else None
        elif not candidate.extras:  # an extras candidate's base is in the mapping too
            resolved[candidate.name] = str(candidate.version)
    for key, criterion in result.criteria.items():
        name = key.split("[")[0]
        for info in criterion.information:
            if info.parent is not None and info.parent.name != name:
                pulled.setdefault(name, set()).add(str(info.parent))
    pulled_by = {n: tuple(sorted(who)) for n, who in pulled.items() if n not in named}
    return answer(resolved, outside, pulled_by=pulled_by, seconds=round(time.monotonic() - started, 3))


def _conflict(causes, provider: SnapshotProvider, machine: Machine, as_of: str | None) -> str:
    """resolvelib's causes in one line: per package, who asked for what, and why no release fits."""
    by_name: dict[str, list] = {}
    for info in causes:
        by_name.setdefault(info.requirement.name, []).append(info)
    parts = []
    for name, infos in by_name.items():
        asks = ", ".join(dict.fromkeys(f"{info.requirement.name}{info.requirement.specifier or ''} "
                                       f"({info.parent or 'the file'})" for info in infos))
        specs = [info.requirement.specifier for info in infos] + list(provider.constraints.get(name, ()))
        parts.append(f"{asks}: {provider.why_none(name, specs)}")
    text = (f"No solution found in qlora-doctor's bundled snapshot of PyPI metadata for Python {machine.python}"
            + (f" as of {as_of}" if as_of else "") + ": " + "; ".join(parts))
    return (text[:400] + "...") if len(text) > 400 else text


def resolve_prepared(prepared: Prepared, machine: Machine, as_of: str | None = None, constraints: str = "",
                     why: str = "", timeout_s: float = TIMEOUT_S) -> Resolution:
    """A Resolution for a prepared file from the snapshot: the resolved packages with the outside ones at their
    exact pins, torch's build tag kept, packages whose source is out of reach kept by name; the outside packages
    of unknown version in `unknown`, and with them the packages not in the closure that an unfollowed package may
    pull: every watched and snapshot package when the file names a package outside the snapshot; else (only the
    stack's own dependencies are outside: nvidia-*, fastapi, pandas...) the watched packages outside the snapshot
    (pydantic, which gradio pulls through fastapi). `why` heads the substitutions (the index not answering)."""
    needs, limits = read_needs(prepared.text, constraints)
    answer = resolve_needs([n for n in needs if n.name not in prepared.unresolved], machine, as_of, limits,
                           timeout_s=timeout_s)
    subs = prepared.substitutions + ((why,) if why else ())
    named = tuple(sorted(set(answer.named) | set(prepared.unresolved)))
    if answer.error:
        return Resolution({}, named=named, resolver=RESOLVER, seconds=answer.seconds, error=answer.error,
                          substitutions=subs, unknown=tuple(sorted(prepared.unresolved)))
    pins = {n: with_build(v, prepared.torch_builds.get(n)) for n, v in answer.resolved.items()}
    pins.update({n: with_build(v, prepared.torch_builds.get(n)) for n, v in answer.outside.items() if v})
    unknown = {n for n, v in answer.outside.items() if not v}
    for name, version in prepared.unresolved.items():
        pins.pop(name, None)
        if version:
            pins[name] = version
        else:
            unknown.add(name)
    releases = snapshot_releases()[0]
    if prepared.unresolved or any(n in answer.named for n in answer.outside):
        unknown |= {n for n in (*WATCHED, *releases) if n not in pins}  # its own unfollowed package may pull them
    elif answer.outside:  # only what the stack pulls (nvidia-*, fastapi...): it may pull a watched non-stack package
        unknown |= {n for n in WATCHED if n not in pins and n not in releases}
    pulled_by = {n: who for n, who in answer.pulled_by.items() if n in pins and n not in prepared.unresolved}
    return Resolution(pins, pulled_by=pulled_by, named=named, resolver=RESOLVER, seconds=answer.seconds,
                      substitutions=subs + (answer.summary(),), unknown=tuple(sorted(unknown)))


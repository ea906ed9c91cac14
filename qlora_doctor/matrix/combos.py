"""`matrix.yaml`: the named combinations of versions the matrix tests, loaded and validated.

Format (one entry per combination; every problem in the file is reported at once, each with its key):

    combinations:
      - name: cpu-tf5.24-peft0.21.2          # unique, [a-z0-9._-]
        python: "3.11"                        # the interpreter the env is built with (python3.11 on PATH)
        pins:                                 # exact versions, name: version
          torch: "2.13.0"
          transformers: "5.24.0"
        expect: pass                          # pass | fail
        platforms: [linux-x86_64-py3.11-cpu]  # where it applies; shell-style wildcards allowed
      - name: known-bad-...
        expect: fail
        reason: "one sentence: why it must fail"
        rule: accel-tf5-min                   # the knowledge-base rule it must trip (check id rule:<id>)
        fails_at: check                       # install | check | smoke (default check)
        match: "regex"                        # optional: text the failing step's output must contain
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.errors import InputError

STAGES = ("install", "check", "smoke")
REQUIRED_PINS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
_KEYS = {"name", "python", "pins", "expect", "reason", "rule", "fails_at", "match", "platforms", "index_urls"}
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_PLATFORM = re.compile(r"[a-z0-9*?._-]+(-[a-z0-9*?._]+){3,}|[a-z0-9*?._-]*\*[a-z0-9*?._-]*")


@dataclass(frozen=True)
class Combination:
    name: str
    python: str
    """`major.minor` of the interpreter."""
    pins: dict[str, str] = field(hash=False)
    """Canonical package name -> exact version (torch may carry a local tag, `2.11.0+cu130`)."""
    expect: Literal["pass", "fail"]
    platforms: tuple[str, ...]
    """Platform ids (`linux-x86_64-py3.11-cpu`) or wildcard patterns it applies to."""
    reason: str = ""
    rule: str = ""
    """For expect=fail: the knowledge-base rule id whose check (`rule:<id>`) must fail."""
    fails_at: str = "check"
    match: str = ""
    index_urls: tuple[str, ...] = ()
    """Extra package indexes the pins need (torch CUDA builds: https://download.pytorch.org/whl/cuXYZ)."""

    def applies_to(self, platform: str) -> bool:
        return any(fnmatch.fnmatchcase(platform, pattern) for pattern in self.platforms)

    def requirement_lines(self) -> list[str]:
        return [f"{name}=={version}" for name, version in sorted(self.pins.items())]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "python": self.python, "pins": dict(sorted(self.pins.items())),
                                "expect": self.expect, "platforms": list(self.platforms)}
        if self.expect == "fail":
            data.update(reason=self.reason, rule=self.rule, fails_at=self.fails_at)
            if self.match:
                data["match"] = self.match
        if self.index_urls:
            data["index_urls"] = list(self.index_urls)
        return data


def parse_combinations(data: Any, where: str) -> tuple[Combination, ...]:
    if not isinstance(data, dict) or not isinstance(data.get("combinations"), list) or not data["combinations"]:
        raise InputError(f"{where}: combinations: expected a non-empty list of combinations "
                         "(see `qlora_doctor/matrix/combos.py` for the format)")
    errors: list[str] = [f"{where}: unknown top-level key {key!r} (only `combinations` is allowed)"
                         for key in sorted(set(data) - {"combinations"})]
    combos: list[Combination] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["combinations"]):
        combo = _parse_one(raw, f"{where}: combinations[{i}]", errors)
        if combo is None:
            continue
        if combo.name in seen:
            errors.append(f"{where}: combinations[{i}].name: {combo.name!r} is used twice; names must be unique")
        seen.add(combo.name)
        combos.append(combo)
    if errors:
        raise InputError(errors)
    return tuple(combos)


def _parse_one(raw: Any, where: str, errors: list[str]) -> Combination | None:
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping with name, python, pins, expect, platforms")
        return None
    name = raw.get("name")
    if isinstance(name, str) and _NAME.fullmatch(name):
        where = f"{where} ({name})"
    else:
        errors.append(f"{where}.name: expected a name of lower-case letters, digits, '.', '_' or '-', got {name!r}")
    start = len(errors)
    for key in sorted(set(raw) - _KEYS):
        errors.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
    python = raw.get("python")
    # Unquoted 3.10 is the float 3.1 in YAML: only a string is trusted.
    if not isinstance(python, str) or not re.fullmatch(r"3\.\d+", python):
        errors.append(f"{where}.python: expected a quoted major.minor like \"3.11\", got {raw.get('python')!r}")
    pins: dict[str, str] = {}
    raw_pins = raw.get("pins")
    if not isinstance(raw_pins, dict):
        errors.append(f"{where}.pins: expected a mapping of package: exact version")
        raw_pins = {}
    for pkg, version in raw_pins.items():
        try:
            Version(str(version))
        except InvalidVersion:
            errors.append(f"{where}.pins.{pkg}: {version!r} is not an exact version like \"5.24.0\"")
            continue
        pins[canonical_name(str(pkg))] = str(version)
    if isinstance(raw.get("pins"), dict):
        for needed in REQUIRED_PINS:
            if needed not in pins and not any(e.startswith(f"{where}.pins.{needed}") for e in errors):
                errors.append(f"{where}.pins.{needed}: missing; every combination pins {', '.join(REQUIRED_PINS)}")
    expect = raw.get("expect")
    if expect not in ("pass", "fail"):
        errors.append(f"{where}.expect: expected pass or fail, got {expect!r}")
    platforms = raw.get("platforms")
    if not isinstance(platforms, list) or not platforms or not all(isinstance(p, str) for p in platforms):
        errors.append(f"{where}.platforms: expected a list like [linux-x86_64-py3.11-cpu]")
        platforms = []
    for p in platforms:
        if not _PLATFORM.fullmatch(p):
            errors.append(f"{where}.platforms: {p!r} is not os-arch-pyX.Y-accelerator (e.g. linux-x86_64-py3.11-cpu, "
                          "linux-x86_64-py3.12-cu130-sm90; wildcards allowed)")
    fails_at = raw.get("fails_at", "check")
    if expect == "fail":
        for key in ("reason", "rule"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                errors.append(f"{where}.{key}: required when expect is fail (why it fails, and the rule id it trips)")
        if fails_at not in STAGES:
            errors.append(f"{where}.fails_at: expected one of {', '.join(STAGES)}, got {fails_at!r}")
    else:
        for key in ("reason", "rule", "fails_at", "match"):
            if key in raw:
                errors.append(f"{where}.{key}: only for expect: fail (remove it, or set expect: fail)")
    match = raw.get("match", "")
    if match:
        try:
            re.compile(str(match))
        except re.error as err:
            errors.append(f"{where}.match: invalid regular expression ({err})")
    urls = raw.get("index_urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and u.startswith(("http", "file:")) for u in urls):
        errors.append(f"{where}.index_urls: expected a list of URLs")
        urls = []
    if len(errors) > start or not isinstance(name, str):
        return None
    return Combination(name=name, python=str(python), pins=pins, expect=expect, platforms=tuple(platforms),
                       reason=str(raw.get("reason", "")).strip(), rule=str(raw.get("rule", "")).strip(),
                       fails_at=fails_at, match=str(match), index_urls=tuple(urls))


def load_combinations(path: Path) -> tuple[Combination, ...]:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such combinations file (the matrix reads matrix.yaml in the repo root; "
                         "pass --combos FILE)")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ({err})")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})")
    return parse_combinations(data, str(path))


def select(combos: tuple[Combination, ...], names: tuple[str, ...], where: str) -> tuple[Combination, ...]:
    """The combinations named by `--only` (all when none), in the file's order; unknown names are an error."""
    if not names:
        return combos
    known = {c.name for c in combos}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError([f"--only {n}: no combination of that name in {where} (known: {', '.join(sorted(known))})"
                          for n in unknown])
    return tuple(c for c in combos if c.name in names)

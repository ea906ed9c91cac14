"""A proposed pin set (`check --requirements FILE`, pip format `name==version`) as an Environment: a torch
local tag such as `2.5.1+cu124` gives its CUDA variant, a bare torch pin the default build PyPI serves
for it (knowledge/data/cuda.toml)."""

from __future__ import annotations

from pathlib import Path
import re

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import Environment, Package, TorchBuild, build_from_local_tag, canonical_name
from qlora_doctor.core.errors import InputError


def parse_requirements(text: str, where: str, lenient: bool = False) -> dict[str, str]:
    """`name==version` lines -> {canonical name: version}. Comments, blank lines, hashes and index
    options are ignored; anything else that is not an exact pin is an error naming the line (with
    `lenient`, skipped: the exact pins of a file the resolver could not read)."""
    pins: dict[str, str] = {}
    errors: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if line.startswith("#") or not line:
            continue
        if line.startswith("-"):  # --index-url, --extra-index-url, -f, -c: options, not pins
            continue
        line = re.sub(r"\s+--hash=\S+", "", line).rstrip("\\").strip()
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            errors.append(f"{where}:{lineno}: not a requirement ({err}); expected name==version")
            continue
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator not in ("==", "==="):
            errors.append(f"{where}:{lineno}: {line!r} is not an exact pin; write name==version "
                          "(`qlora-doctor lock` writes such files)")
            continue
        version = specs[0].version
        try:
            Version(version)
        except InvalidVersion:
            errors.append(f"{where}:{lineno}: {version!r} is not a valid version")
            continue
        name = canonical_name(req.name)
        if name in pins and pins[name] != version:
            errors.append(f"{where}:{lineno}: {req.name} is pinned twice ({pins[name]} and {version})")
        pins[name] = version
    if errors and not lenient:
        raise InputError(errors)
    return pins


def named_without_pin(text: str) -> tuple[str, ...]:
    """The packages a requirements text names without an exact pin (ranges, bare names, URLs with #egg=)."""
    names = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            req = Requirement(re.sub(r"\s+--hash=\S+", "", line).rstrip("\\").strip())
        except InvalidRequirement:
            continue
        specs = list(req.specifier)
        if not (len(specs) == 1 and specs[0].operator in ("==", "===")):
            names.append(canonical_name(req.name))
    return tuple(names)


def environment_from_pins(pins: dict[str, str], source: str) -> Environment:
    from qlora_doctor.knowledge.loading import load_tables

    packages = {name: Package(name, Version(v), v) for name, v in pins.items()}
    torch = TorchBuild(None, how="torch is not pinned")
    if "torch" in packages:
        version = packages["torch"].version
        assert version is not None
        build = build_from_local_tag(version.local) if version.local else None
        if build is None:
            row = load_tables().default_cuda_for_torch(version)
            if row is None:
                build = TorchBuild(None, how=f"no record of the default PyPI build of torch {version}")
            elif row.cuda == "cpu":
                build = TorchBuild("cpu", how=f"PyPI default for torch {version}")
            else:
                build = TorchBuild("cuda", Version(row.cuda), how=f"PyPI default for torch {version} (Linux)")
        torch = build
    return Environment(packages=packages, torch=torch, source=source)


def load_requirements_file(path: Path) -> Environment:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such requirements file")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the requirements file ({err})")
    return environment_from_pins(parse_requirements(text, str(path)), str(path))

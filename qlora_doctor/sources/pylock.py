"""A PEP 751 lock file (`pylock.toml`) as a resolution: it is already one, so nothing is resolved again.
Each `[[packages]]` table gives name and version; a package whose `marker` is false on the machine is not
installed there. A malformed file is an InputError naming the file and the package's position.

    resolution = read_pylock(Path("pylock.toml"), machine)

Spec: https://packaging.python.org/en/latest/specifications/pylock-toml/ (written by `uv pip compile
--format pylock.toml`, `pip lock`, PDM).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.markers import InvalidMarker, Marker
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.errors import InputError
from qlora_doctor.sources.reqfile import marker_environment
from qlora_doctor.sources.resolution import Resolution

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_pylock(path: Path, machine: Machine) -> Resolution:

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such lock file")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the lock file ({err})")
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})")
    errors: list[str] = []
    lock_version = str(data.get("lock-version", ""))
    if not lock_version.startswith("1."):
        errors.append(f"{path}: lock-version: expected \"1.0\" (PEP 751), got {lock_version or 'nothing'!r}")
    packages = data.get("packages")
    if not isinstance(packages, list) or not packages:
        errors.append(f"{path}: no [[packages]] tables")
        packages = []
    env = marker_environment(machine)
    pins: dict[str, str] = {}
    unknown: list[str] = []
    for i, pkg in enumerate(packages, start=1):
        where = f"{path}: [[packages]] #{i}"
        name = pkg.get("name") if isinstance(pkg, dict) else None
        if not isinstance(name, str) or not name:
            errors.append(f"{where}: no name")
            continue
        where += f" ({name})"
        marker = pkg.get("marker")
        if marker:
            try:
                if not Marker(str(marker)).evaluate(env):
                    continue
            except InvalidMarker as err:
                errors.append(f"{where}: marker {marker!r} is not a PEP 508 marker ({err})")
                continue
        version = pkg.get("version")
        if version is None:  # allowed for VCS/directory packages: installed, version unknown
            unknown.append(canonical_name(name))
            continue
        try:
            Version(str(version))
        except InvalidVersion:
            errors.append(f"{where}: version {version!r} is not a valid version")
            continue
        pins[canonical_name(name)] = str(version)
    if errors:
        raise InputError(errors)
    creator = str(data.get("created-by", "unknown tool"))
    return Resolution(pins, named=tuple(sorted(pins)), resolver=f"PEP 751 lock file (created by {creator})",
                      unknown=tuple(sorted(unknown)))

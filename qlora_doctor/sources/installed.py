"""Which packages would training use, at which versions: read without importing them.

Two sources, one result type (`Environment`):
  * the installed environment: `importlib.metadata` (a package whose metadata is missing or corrupt is
    reported as broken, not crashed on); torch's build (CUDA/ROCm/CPU) from its local version tag, else
    from `torch/version.py` read as text — never `import torch`;
  * a proposed pin set (`--requirements FILE`, pip format `name==version`): a torch local tag such as
    `2.5.1+cu124` gives its CUDA variant, a bare torch pin the default build PyPI serves for it.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.environment import (WATCHED, Environment, Package, TorchBuild, build_from_local_tag,
                                           parse_torch_version_py)

# --- installed ----------------------------------------------------------------------------------

def installed_environment(with_conflicts: bool = True) -> Environment:
    packages: dict[str, Package] = {}
    dists: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:
            name = None
        if not name:
            # Metadata folder without a Name: a half-installed or corrupted package.
            folder = getattr(dist, "_path", None)
            guess = _name_from_dist_folder(folder)
            if guess:
                packages.setdefault(guess, Package(guess, None, "", f"metadata is missing or corrupt ({folder})"))
            continue
        key = canonical_name(name)
        if key in packages and packages[key].version is not None:
            continue  # first on sys.path wins, as for imports
        raw = dist.version or ""
        try:
            packages[key] = Package(key, Version(raw), raw)
        except InvalidVersion:
            packages[key] = Package(key, None, raw, f"version {raw!r} is not a valid version")
        dists[key] = dist
    torch = _installed_torch_build(dists.get("torch"), packages.get("torch"))
    conflicts = tuple(_declared_conflicts(dists, packages)) if with_conflicts else ()
    return Environment(packages=packages, torch=torch, conflicts=conflicts)


def _name_from_dist_folder(folder: Any) -> str | None:
    if folder is None:
        return None
    match = re.match(r"([A-Za-z0-9_.]+?)-\d", Path(str(folder)).name)
    return canonical_name(match.group(1)) if match else None


def _installed_torch_build(dist: metadata.Distribution | None, pkg: Package | None) -> TorchBuild:
    if pkg is None:
        return TorchBuild(None, how="torch is not installed")
    if pkg.version is not None and pkg.version.local:
        build = build_from_local_tag(pkg.version.local)
        if build is not None:
            return build
    # No local tag (PyPI wheels): torch/version.py says `cuda = '12.4'` / `hip = None`. Read it as text.
    if dist is not None:
        try:
            files = dist.files or []
            version_py = next((f for f in files if str(f).replace("\\", "/") == "torch/version.py"), None)
            text = Path(dist.locate_file(version_py)).read_text() if version_py else ""
        except Exception as err:
            return TorchBuild(None, how=f"torch/version.py unreadable ({type(err).__name__})")
        if text:
            return parse_torch_version_py(text)
    return TorchBuild(None, how="torch's build could not be read")


def _declared_conflicts(dists: dict[str, metadata.Distribution], packages: dict[str, Package]) -> list[str]:
    """Like `pip check` for the watched packages, but explained: who needs what, and what is there."""
    conflicts: list[str] = []
    marker_env = default_environment()
    for name in WATCHED:
        dist, pkg = dists.get(name), packages.get(name)
        if dist is None or pkg is None or pkg.version is None:
            continue
        try:
            requires = dist.requires or []
        except Exception:
            continue
        for line in requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({**marker_env, "extra": ""}):
                continue
            dep = packages.get(canonical_name(req.name))
            if dep is None or dep.version is None:
                if dep is None and canonical_name(req.name) in WATCHED:
                    conflicts.append(f"{name} {pkg.raw_version} needs {req.name}{req.specifier or ''}, "
                                     "which is not installed")
                continue
            if req.specifier and not req.specifier.contains(dep.version, prereleases=True):
                conflicts.append(f"{name} {pkg.raw_version} needs {req.name}{req.specifier}, "
                                 f"you have {dep.raw_version}")
    return conflicts





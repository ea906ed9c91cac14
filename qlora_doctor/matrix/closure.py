"""Which installed distributions `pip install qlora-doctor[train]` needs: the dependency closure of the tool's own
requirements with its `train` extra, walked over the metadata of what is installed.

A record made in place on a host image (the GPU machine's) sees every package of that image in its freeze: the
image's botorch or jax are not part of the tested combination, and a lock made from the record must not pin them.
"""
from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name as canonical_name

ROOT = "qlora-doctor"
ROOT_EXTRAS = ("train",)


def own_requirements() -> list[str]:
    """The tool's Requires-Dist: from its metadata when installed, else from the checkout's pyproject.toml."""
    try:
        reqs = md.requires(ROOT)
        if reqs is not None:
            return list(reqs)
    except md.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    reqs = list(project.get("dependencies", []))
    for extra, items in project.get("optional-dependencies", {}).items():
        reqs += [f"{r}; extra == '{extra}'" if ";" not in r else f"{r.split(';')[0]}; ({r.split(';', 1)[1]}) and extra == '{extra}'"
                 for r in items]
    return reqs


def _wanted(req: Requirement, extras: tuple[str, ...]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or ("",)))


def _needed(raws, extras: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """(name, extras asked of it) for each requirement string whose marker holds with `extras`."""
    needed = []
    for raw in raws:
        try:
            req = Requirement(raw)
        except InvalidRequirement:
            continue
        if _wanted(req, extras):
            needed.append((canonical_name(req.name), tuple(sorted(req.extras))))
    return needed


def closure(roots: list[str], extras: tuple[str, ...] = ROOT_EXTRAS, also: tuple[str, ...] = ()) -> list[str]:
    """Canonical names of the installed distributions reachable from `roots` (requirement strings evaluated with
    `extras` for the roots' own markers) plus `also`; names not installed are left out."""
    todo = _needed(roots, extras) + [(canonical_name(n), ()) for n in also]
    seen: dict[str, set[str]] = {}
    while todo:
        name, want = todo.pop()
        if name in seen and set(want) <= seen[name]:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.setdefault(name, set()).update(want)
        todo += _needed(dist.requires or (), want)
    return sorted(seen)


def training_closure(also: tuple[str, ...] = ()) -> list[str]:
    return closure(own_requirements(), ROOT_EXTRAS, also)

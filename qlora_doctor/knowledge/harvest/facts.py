"""From what the releases import and define to compact facts with version ranges and provenance.

A fact is written only where a harvested release of the target lacks the name (a closed module without it,
or no such module): names every harvested release defines, or that cannot be read, give no fact. Ranges are
built over the harvested releases, in order: an importer's range starts at the first release seen importing
the name (older, unharvested releases are not judged) and stays open upwards when the newest still imports
it; a target's `defined_in` is open at either end where the oldest or newest harvested release defines it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from qlora_doctor.core.fileio import write_atomic

LAST_PATCH_ONLY = ("gradio",)
"""Importers read at the last patch of each minor only (harvest/__init__.py selects them so)."""

SCHEMA = 1
REQUIRES_GZIP_ABOVE = 2_000_000
"""requires.json is shipped gzipped (requires.json.gz) when larger than this."""


def runs(ordered: list[Version], members: set[Version], open_low: bool, open_high: bool,
         whole_minors: bool = False) -> list[str]:
    """Specifiers covering the runs of `members` in `ordered`: each run up to the next non-member. With
    `whole_minors` (a package read at the last patch of each minor only, LAST_PATCH_ONLY) the next non-member
    stands for its whole minor, so a run ends where that minor starts: `<6.0`, not `<6.0.2`, since 6.0.0 and
    6.0.1 were never read (gradio -> gradio_client.cli, pin-set case 110)."""
    specs, i = [], 0
    while i < len(ordered):
        if ordered[i] not in members:
            i += 1
            continue
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] in members:
            j += 1
        low = "" if i == 0 and open_low else f">={ordered[i]}"
        nxt = ordered[j + 1] if j + 1 < len(ordered) else None
        bound = f"{nxt.major}.{nxt.minor}" if nxt is not None and whole_minors else str(nxt)
        high = f"<{bound}" if nxt is not None else ("" if open_high else f"<={ordered[j]}")
        specs.append(",".join(p for p in (low, high) if p))
        i = j + 1
    return specs


def _first_of_runs(ordered: list[Version], members: set[Version]) -> list[Version]:
    return [v for i, v in enumerate(ordered) if v in members and (i == 0 or ordered[i - 1] not in members)]


def import_facts(sites: dict, defines: dict) -> list[dict]:
    facts = []
    for importer, per_release in sorted(sites.items()):
        importer_versions = sorted(per_release)
        by_key: dict[tuple[str, str], dict[Version, object]] = {}
        for version in importer_versions:
            for site in per_release[version]:
                by_key.setdefault((site.target, site.name), {}).setdefault(version, site)
        for (module, name), where in sorted(by_key.items()):
            target = canonicalize_name(module.split(".")[0])
            answers = defines.get(target)
            if not answers:
                continue
            targets = sorted(answers)
            status = {v: answers[v].get((module, name)) for v in targets}
            if not any(s is False for s in status.values()):
                continue
            defined = {v for v, s in status.items() if s is not False}
            missing_module = {v for v in targets if answers[v].get((module, "<module>")) is False}
            fact = {
                "importer": importer,
                "importer_versions": runs(importer_versions, set(where), open_low=False, open_high=True,
                                          whole_minors=importer in LAST_PATCH_ONLY),
                "target": target,
                "module": module,
                "name": name,
                "defined_in": runs(targets, defined, open_low=True, open_high=True),
                "provenance": [{"release": str(v), "file": where[v].file, "line": where[v].line}
                               for v in _first_of_runs(importer_versions, set(where))],
            }
            if missing_module:
                fact["module_missing_in"] = runs(targets, missing_module, open_low=True, open_high=True)
            facts.append(fact)
    return facts


def floor_facts(floors: dict, requires: dict) -> list[dict]:
    facts = []
    for importer, per_release in sorted(floors.items()):
        ordered = sorted(per_release)
        groups: dict[tuple[str, str], dict[Version, object]] = {}
        for version in ordered:
            for floor in per_release[version]:
                if _declared(requires.get(importer, {}).get(str(version)), floor.target, floor.minimum):
                    continue
                groups.setdefault((floor.target, floor.minimum), {})[version] = floor
        for (target, minimum), where in sorted(groups.items(), key=lambda g: (g[0][0], Version(g[0][1]))):
            first = where[min(where)]
            facts.append({
                "importer": importer,
                "importer_versions": runs(ordered, set(where), open_low=False, open_high=True,
                                          whole_minors=importer in LAST_PATCH_ONLY),
                "target": target,
                "minimum": minimum,
                "how": first.how,
                "provenance": [{"release": str(v), "file": where[v].file, "line": where[v].line}
                               for v in _first_of_runs(ordered, set(where))],
            })
    return facts


def _declared(entry: dict | None, target: str, minimum: str) -> bool:
    """The release's unconditional Requires-Dist already demands `target>=minimum`."""
    for line in (entry or {}).get("requires_dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != target or (req.marker is not None and "extra" in str(req.marker)):
            continue
        if any(spec.operator in (">=", ">", "==", "~=") and Version(spec.version.rstrip(".*")) >= Version(minimum)
               for spec in req.specifier):
            return True
    return False


def write(out_dir: Path, result, since: str, command: str) -> dict[str, Path]:
    """imports.json (facts) and requires.json[.gz] (declared requirements) under `out_dir`; returns their paths."""
    harvested = {name: {"releases": len(per), "first": str(min(per)), "last": str(max(per))}
                 for name, per in sorted({**result.sites, **result.defines}.items()) if per}
    imports = {
        "schema": SCHEMA,
        "since": since,
        "regenerate": command,
        "harvested": harvested,
        "imports": import_facts(result.sites, result.defines),
        "floors": floor_facts(result.floors, result.requires),
    }
    requires = {name: dict(sorted(per.items(), key=lambda kv: Version(kv[0])))
                for name, per in sorted(result.requires.items())}
    paths = {"imports": out_dir / "imports.json"}
    write_atomic(paths["imports"], json.dumps(imports, indent=0, sort_keys=False) + "\n")
    text = json.dumps(requires, separators=(",", ":")) + "\n"
    if len(text) > REQUIRES_GZIP_ABOVE:  # deterministic gzip (no name, no time): the same data, the same bytes
        paths["requires"] = out_dir / "requires.json.gz"
        write_atomic(paths["requires"], gzip.compress(text.encode(), compresslevel=9, mtime=0))
        (out_dir / "requires.json").unlink(missing_ok=True)
    else:
        paths["requires"] = out_dir / "requires.json"
        write_atomic(paths["requires"], text)
        (out_dir / "requires.json.gz").unlink(missing_ok=True)
    return paths

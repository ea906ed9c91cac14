"""`check -r FILE`: the environment a requirements file (or a PEP 751 `pylock.toml`) really installs
(sources/resolve.py), as the environment the other checks judge, and one check saying how it was obtained,
what pip pulls, and what had to be substituted to resolve it here (one line each)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qlora_doctor.core.environment import WATCHED, Environment
from qlora_doctor.core.report import Check

TITLE = "What installing the file gives"


def unsatisfiable(error: str) -> bool:
    """The resolver proved no set of versions satisfies the file (versus: it could not read a source)."""
    return any(text in error for text in ("No solution found", "unsatisfiable", "ResolutionImpossible",
                                          "conflicting dependencies", "No matching distribution found"))


def lines_environment(path: Path, unknown: tuple[str, ...] = ()) -> Environment:
    """The file's own exact pins (includes read), its other named packages as installed at an unknown version,
    and so is every watched package it does not pin: with no closure, pip may pull any of them, so a rule
    that needs one present, absent or at some version can be neither cleared nor fired."""
    from qlora_doctor.sources.requirements import environment_from_pins, named_without_pin, parse_requirements
    from qlora_doctor.sources.resolve import _with_includes

    text = _with_includes(path, path.read_text(encoding="utf-8"))
    pins = parse_requirements(text, str(path), lenient=True)
    unpinned = tuple(dict.fromkeys(n for n in (*named_without_pin(text), *unknown, *WATCHED) if n not in pins))
    return dataclasses.replace(environment_from_pins(pins, str(path)), unpinned=unpinned)


def resolved_environment(path: Path, machine, resolve: bool = True, as_of: str | None = None,
                         resolver: str = "auto") -> tuple[Environment, list[Check]]:
    """(the environment to judge, the checks about how it was obtained). With `resolve`, the resolver's
    closure for the machine (`resolver="snapshot"`: from the bundled snapshot, offline); without (or with no
    resolver installed), the file's lines as written."""
    from qlora_doctor.sources.requirements import environment_from_pins, load_requirements_file
    from qlora_doctor.sources.resolve import NoResolver, is_pylock, resolve_requirements

    if not resolve and not is_pylock(Path(path)):
        return load_requirements_file(path), [Check("packages.resolved", "pass", TITLE,
                                                     "judged the lines as written (--no-resolve): packages pip "
                                                     "would pull are not judged", found="lines only")]
    try:
        resolution = resolve_requirements(path, machine, as_of=as_of, resolver=resolver)
    except NoResolver as err:
        return lines_environment(Path(path)), [Check(
            "packages.resolved", "unknown", TITLE, f"{err.messages[0]}: only the file's own lines are judged, so the "
            "packages pip would pull (triton, huggingface_hub, numpy...) are not", fix="pip install uv",
            found="not resolved")]
    subs = "".join(f"\n  substituted: {line}" for line in resolution.substitutions)
    if resolution.error:
        lines = lines_environment(Path(path), resolution.unknown)
        if unsatisfiable(resolution.error) and not resolution.offline:
            return lines, [Check("packages.resolved", "fail", TITLE,
                                 f"{path} cannot be installed on this machine (Python {machine.python}, "
                                 f"{machine.os} {machine.arch}): {resolution.error}{subs}",
                                 fix="change the conflicting pins the resolver names", found="no solution",
                                 expected="an installable set")]
        # the resolver could not read a source (no index reachable, an sdist that would not build...)
        return lines, [Check("packages.resolved", "unknown", TITLE,
                             f"could not resolve {path} ({resolution.error}); judged its exact pins only, so "
                             f"what pip would pull is not judged{subs}", fix="make the sources reachable, or pin "
                             "what matters exactly", found="not resolved", expected="an installable set")]
    env = dataclasses.replace(environment_from_pins(resolution.pins, str(path)), unpinned=resolution.unknown)
    pulled = [f"{name} {resolution.pins[name]} (required by {', '.join(who) or '?'})"
              for name, who in sorted(resolution.pulled_by.items()) if name in WATCHED]
    how = (f"{resolution.resolver}, {'cached' if resolution.cached else f'{resolution.seconds:.1f} s'}"
           + (f", as of {as_of}" if as_of else ""))
    detail = (f"resolved {len(resolution.pins)} packages for Python {machine.python} ({how}); pulled, not "
              f"named in the file: {'; '.join(pulled) if pulled else 'none of the watched packages'}{subs}")
    return env, [Check("packages.resolved", "pass", TITLE, detail, found=f"{len(resolution.pins)} packages",
                       expected="an installable set")]

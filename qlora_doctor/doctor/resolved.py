"""`check -r FILE`: the environment a requirements file really installs (sources/resolve.py), as the
environment the other checks judge, and one check saying how it was obtained and what pip pulls."""

from __future__ import annotations

from pathlib import Path

from qlora_doctor.core.environment import WATCHED, Environment
from qlora_doctor.core.report import Check

TITLE = "What installing the file gives"


def unsatisfiable(error: str) -> bool:
    """The resolver proved no set of versions satisfies the file (versus: it could not read a source)."""
    return "No solution found" in error or "unsatisfiable" in error or "ResolutionImpossible" in error


def resolved_environment(path: Path, machine, resolve: bool = True, as_of: str | None = None,
                         ) -> tuple[Environment, list[Check]]:
    """(the environment to judge, the checks about how it was obtained). With `resolve`, the resolver's
    closure for the machine; without (or with no resolver installed), the file's lines as written."""
    from qlora_doctor.sources.requirements import environment_from_pins, load_requirements_file

    if not resolve:
        return load_requirements_file(path), [Check("packages.resolved", "pass", TITLE,
                                                     "judged the lines as written (--no-resolve): packages pip "
                                                     "would pull are not judged", found="lines only")]
    from qlora_doctor.sources.resolve import find_uv, resolve_requirements

    if find_uv() is None:
        import dataclasses

        from qlora_doctor.sources.requirements import named_without_pin, parse_requirements

        text = path.read_text(encoding="utf-8")
        env = dataclasses.replace(environment_from_pins(parse_requirements(text, str(path), lenient=True), str(path)),
                                  unpinned=named_without_pin(text))
        return env, [Check("packages.resolved", "unknown", TITLE,
                           "no resolver installed, so only the file's own lines are judged: the packages pip "
                           "would pull (triton, huggingface_hub, numpy...) are not", fix="pip install uv",
                           found="not resolved")]
    resolution = resolve_requirements(path, machine, as_of=as_of)
    if resolution.error:
        from qlora_doctor.sources.requirements import parse_requirements

        import dataclasses

        from qlora_doctor.sources.requirements import named_without_pin

        text = path.read_text(encoding="utf-8")
        lines = dataclasses.replace(environment_from_pins(parse_requirements(text, str(path), lenient=True), str(path)),
                                    unpinned=named_without_pin(text))
        if unsatisfiable(resolution.error):
            return lines, [Check("packages.resolved", "fail", TITLE,
                                 f"{path} cannot be installed on this machine (Python {machine.python}, "
                                 f"{machine.os} {machine.arch}): {resolution.error}",
                                 fix="change the conflicting pins the resolver names", found="no solution",
                                 expected="an installable set")]
        # the resolver could not read a source (a git URL, an index out of reach, an sdist that would not build)
        return lines, [Check("packages.resolved", "unknown", TITLE,
                             f"could not resolve {path} ({resolution.error}); judged its exact pins only, so "
                             "what pip would pull is not judged", fix="make the sources reachable, or pin what "
                             "matters exactly", found="not resolved", expected="an installable set")]
    env = environment_from_pins(resolution.pins, str(path))
    pulled = [f"{name} {resolution.pins[name]} (required by {', '.join(who) or '?'})"
              for name, who in sorted(resolution.pulled_by.items()) if name in WATCHED]
    how = (f"{resolution.resolver}, {'cached' if resolution.cached else f'{resolution.seconds:.1f} s'}"
           + (f", as of {as_of}" if as_of else ""))
    detail = (f"resolved {len(resolution.pins)} packages for Python {machine.python} ({how}); pulled, not "
              f"named in the file: {'; '.join(pulled) if pulled else 'none of the watched packages'}")
    return env, [Check("packages.resolved", "pass", TITLE, detail, found=f"{len(resolution.pins)} packages",
                       expected="an installable set")]

"""`check -r FILE`: the environment a requirements file (or a PEP 751 `pylock.toml`) really installs
(sources/resolve.py), as the environment the other checks judge, and one check saying how it was obtained,
what pip pulls, and what had to be substituted to resolve it here (one line each)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qlora_doctor.core.environment import WATCHED, Environment
from qlora_doctor.core.report import Check

TITLE = "What installing the file gives"


def _report(path: Path):
    from qlora_doctor.sources.envreport import read_report

    if path.suffix == ".toml":  # pylock.toml
        return None
    try:
        return read_report(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None  # the resolver's reading says why, naming the file


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


def as_requirements(path: Path) -> tuple[Path, str | None]:
    """(the requirements file to read, what was read when it is not `path` itself): a pyproject.toml (optionally
    `pyproject.toml[extra,...]`) becomes its requirement lines (sources/pyproject.py)."""
    from qlora_doctor.sources.pyproject import pyproject_requirements
    from qlora_doctor.sources.resolve import cache_dir

    converted = pyproject_requirements(Path(path), cache_dir())
    return converted if converted is not None else (Path(path), None)


def resolved_environment(path: Path, machine, resolve: bool = True, as_of: str | None = None,
                         resolver: str = "auto") -> tuple[Environment, list[Check]]:
    env, checks, _ = judge_requirements(path, machine, resolve, as_of, resolver, additions=False)
    return env, checks


def judge_requirements(path: Path, machine, resolve: bool = True, as_of: str | None = None, resolver: str = "auto",
                       additions: bool = True) -> tuple[Environment, list[Check], Additions | None]:
    """`check -r FILE`: (the environment to judge, how it was obtained, what pip would add beside the file).
    The file is converted (a pyproject.toml) and read (a pasted report?) once here."""
    path, read = as_requirements(path)
    report = _report(path)
    env, checks = _resolved_environment(path, machine, resolve, as_of, resolver, report)
    if read is not None:
        checks = [dataclasses.replace(c, detail=f"{read}: {c.detail}") if c.id == "packages.resolved" else c
                  for c in checks]
    added = None
    if additions and resolve and report is None and all(c.status == "pass" for c in checks):
        added = _training_additions(path, machine, env, as_of, resolver)
    return env, checks, added


def _resolved_environment(path: Path, machine, resolve: bool, as_of: str | None, resolver: str,
                          report) -> tuple[Environment, list[Check]]:
    """(the environment to judge, the checks about how it was obtained). With `resolve`, the resolver's
    closure for the machine (`resolver="snapshot"`: from the bundled snapshot, offline); without (or with no
    resolver installed), the file's lines as written."""
    from qlora_doctor.sources.requirements import environment_from_pins, load_requirements_file
    from qlora_doctor.sources.resolve import NoResolver, is_pylock, resolve_requirements

    if report is not None:  # a pasted `pip list` / collect_env...: what was installed, judged as listed
        env = environment_from_pins(report.pins, f"pasted {report.kind}: {path}")
        if not report.complete:  # the rest of the environment is not in the report: unknown, not absent
            env = dataclasses.replace(env, unpinned=tuple(n for n in WATCHED if n not in report.pins))
        listed = ", ".join(f"{n} {v}" for n, v in report.pins.items()) or "no versions"
        return env, [Check("packages.resolved", "pass", TITLE,
                           f"read as {report.kind} output, the environment as it was installed, judged as listed "
                           f"(nothing resolved{'' if report.complete else '; packages it does not show are unknown'})"
                           f": {listed}", found=f"{report.kind}: {len(report.pins)} packages")]
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


# --- training packages the file leaves out ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Additions:
    """What pip would add beside a file that leaves out training packages (bitsandbytes, peft...), resolved with
    the file's own pins, and the environment that gives; `error` when they cannot be added."""
    names: tuple[str, ...]
    pins: dict[str, str]
    env: Environment | None
    error: str | None = None
    as_of: str | None = None


def _training_additions(path: Path, machine, env: Environment, as_of: str | None,
                        resolver: str) -> Additions | None:
    """None unless a resolved requirements file has torch but leaves out other training packages (a project that
    installs bitsandbytes from an extra, say): then the file resolved again with them added, unpinned, for the
    machine and date. Without torch the stack's base comes from elsewhere (a container) and is not guessed."""
    import tempfile

    from qlora_doctor.core.environment import TRAINING_NEEDS
    from qlora_doctor.sources.requirements import environment_from_pins
    from qlora_doctor.sources.resolve import NoResolver, is_pylock, resolve_requirements

    missing = tuple(n for n in TRAINING_NEEDS if not env.installed(n) and n not in env.unpinned)
    if not missing or "torch" in missing or is_pylock(Path(path)):
        return None
    with tempfile.TemporaryDirectory(prefix="qlora-doctor-additions-") as tmp:
        beside = Path(tmp) / "requirements.txt"
        beside.write_text(f"-r {Path(path).resolve()}\n" + "".join(f"{n}\n" for n in missing), encoding="utf-8")
        try:
            resolution = resolve_requirements(beside, machine, as_of=as_of, resolver=resolver)
        except NoResolver:
            return None
    if resolution.error:
        return Additions(missing, {}, None, resolution.error.replace(str(beside), str(path)), as_of)
    pins = {n: resolution.pins[n] for n in missing if n in resolution.pins}
    return Additions(missing, pins, environment_from_pins(resolution.pins, str(path)), None, as_of)


def judge_additions(checks: list[Check], additions: Additions, judged_with: list[Check]) -> list[Check]:
    """`checks` with packages.training saying what pip would add: a pass when the additions raise no problem
    the file's own closure does not have (`judged_with`: the checks of the environment with them), else a
    warning naming the first new problem, or why they cannot be added."""
    names = ", ".join(additions.names)
    when = f" (as of {additions.as_of})" if additions.as_of else ""
    if additions.error is not None:
        check = Check("packages.training", "warn", "Training packages",
                      f"the file leaves out {names}, and pip cannot add them beside its pins{when}: "
                      f"{additions.error}", fix="pin versions of them that agree with the file",
                      found=f"missing {names}", expected="an installable training stack")
    else:
        added = ", ".join(f"{n} {v}" for n, v in additions.pins.items())
        before = {c.id for c in checks if c.status in ("fail", "warn", "unknown")}
        new = [c for c in judged_with if c.status in ("fail", "warn") and c.id not in before
               and c.id not in ("packages.training", "matrix.tested")]
        if new:
            first = new[0]
            check = Check("packages.training", "warn", "Training packages",
                          f"the file leaves out {names}; pip would add {added} beside it{when}, and then "
                          f"{first.id} {first.status}s: {first.title}" +
                          (f" (and {len(new) - 1} more)" if len(new) > 1 else ""),
                          fix=first.fix or f"pin {names} at versions that agree with the file", sources=first.sources,
                          found=f"missing {names}", expected="an installable training stack")
        else:
            check = Check("packages.training", "pass", "Training packages",
                          f"the file leaves out {names}; pip would add {added} beside it{when}, which raises no "
                          "problem the file's own pins do not", fix="pin them in the file: " + " ".join(
                              f"{n}=={v}" for n, v in additions.pins.items()),
                          found=f"{added} (added by pip)", expected="an installable training stack")
    # A check the file alone leaves unknown for want of an added package (bnb.cuda without bitsandbytes) is
    # judged on the environment with it.
    with_them = {c.id: c for c in judged_with}
    suffix = f" (with what pip would add: {', '.join(f'{n} {v}' for n, v in additions.pins.items())})"
    out = []
    for c in checks:
        other = with_them.get(c.id)
        if c.id == "packages.training":
            out.append(check)
        elif c.status == "unknown" and other is not None and other.status == "pass":
            out.append(dataclasses.replace(other, detail=other.detail + suffix))
        else:
            out.append(c)
    return out

"""A project's `pyproject.toml` as a requirements file: `check -r pyproject.toml` judges what `pip install .` would
install, `check -r 'pyproject.toml[train]'` what `pip install '.[train]'` would. PEP 621 `[project]` dependencies
and optional dependencies (an extra naming the project itself is followed), or Poetry's
`[tool.poetry.dependencies]` (caret and tilde ranges as Poetry reads them). The requirement lines are written to a
file in the cache, which the resolver then reads like any requirements file."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_WITH_EXTRAS = re.compile(r"^(?P<file>.*pyproject\.toml)\[(?P<extras>[\w\s,.-]*)\]$")


def pyproject_requirements(given: Path, cache: Path) -> tuple[Path, str] | None:
    """(a requirements file holding the project's requirements, what was read) for a pyproject.toml, optionally
    with `[extra,...]`; None for any other file."""
    match = _WITH_EXTRAS.match(str(given))
    path = Path(match.group("file")) if match else Path(given)
    if path.name != "pyproject.toml":
        return None
    extras = [e.strip() for e in match.group("extras").split(",") if e.strip()] if match else []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None
    project = data.get("project")
    poetry = data.get("tool", {}).get("poetry", {}) if isinstance(data.get("tool"), dict) else {}
    if isinstance(project, dict) and ("dependencies" in project or "optional-dependencies" in project):
        lines, what = _pep621(project, extras, path)
    elif isinstance(poetry, dict) and isinstance(poetry.get("dependencies"), dict):
        lines, what = _poetry(poetry, extras, path)
    else:
        raise InputError(f"{path}: no [project] dependencies or [tool.poetry.dependencies] to judge")
    text = f"# {what}\n" + "".join(f"{line}\n" for line in lines)
    key = hashlib.sha256(f"{path.resolve()}\n{text}".encode()).hexdigest()[:16]
    out = cache / "pyproject" / key / "requirements.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out, what


def _pep621(project: dict[str, Any], extras: list[str], path: Path) -> tuple[list[str], str]:
    name = canonical_name(str(project.get("name", "")))
    optional = project.get("optional-dependencies") or {}
    lines = [str(d) for d in project.get("dependencies") or []]
    wanted, seen = list(extras), set()
    while wanted:  # an extra may name the project itself: `all = ["proj[train,ui]"]`
        extra = wanted.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise InputError(f"{path}: no extra {extra!r} in [project.optional-dependencies] (it has: "
                             f"{', '.join(sorted(optional)) or 'none'})")
        for dep in optional[extra]:
            own = re.match(rf"^\s*{re.escape(name)}\s*\[([^\]]*)\]", str(dep), re.I) if name else None
            if own:
                wanted += [e.strip() for e in own.group(1).split(",") if e.strip()]
            else:
                lines.append(str(dep))
    what = f"[project] dependencies of {path}" + (f" with extras {', '.join(extras)}" if extras else "")
    return lines, what


def _poetry(poetry: dict[str, Any], extras: list[str], path: Path) -> tuple[list[str], str]:
    lines, optional = [], {}
    for name, spec in poetry["dependencies"].items():
        if name.lower() == "python":
            continue
        if isinstance(spec, dict):
            if spec.get("optional"):
                optional[canonical_name(name)] = spec
                continue
            version = spec.get("version", "*")
        else:
            version = str(spec)
        lines.append(name + _poetry_specifier(version))
    poetry_extras = poetry.get("extras") or {}
    for extra in extras:
        if extra not in poetry_extras:
            raise InputError(f"{path}: no extra {extra!r} in [tool.poetry.extras] (it has: "
                             f"{', '.join(sorted(poetry_extras)) or 'none'})")
        for name in poetry_extras[extra]:
            spec = optional.get(canonical_name(name), {})
            lines.append(name + _poetry_specifier(str(spec.get("version", "*"))))
    what = f"[tool.poetry.dependencies] of {path}" + (f" with extras {', '.join(extras)}" if extras else "")
    return lines, what


def _poetry_specifier(version: str) -> str:
    """Poetry's `^1.2.3` (>=1.2.3,<2.0.0), `~1.2` (>=1.2,<1.3), `1.2.3` (==1.2.3), `*`, or PEP 440 as it is."""
    version = version.strip()
    if version in ("", "*"):
        return ""
    parts = [p.strip() for p in version.split(",")]
    out = []
    for part in parts:
        caret = re.fullmatch(r"\^(\d+)(?:\.(\d+))?(?:\.(\d+))?", part)
        tilde = re.fullmatch(r"~(\d+)(?:\.(\d+))?(?:\.(\d+))?", part)
        if caret:
            nums = [int(n) if n is not None else None for n in caret.groups()]
            given = [n for n in nums if n is not None]
            first = next((i for i, n in enumerate(given) if n != 0), len(given) - 1)
            upper = given[: first + 1]
            upper[-1] += 1
            out.append(f">={'.'.join(map(str, given))},<{'.'.join(map(str, upper))}")
        elif tilde:
            given = [int(n) for n in tilde.groups() if n is not None]
            upper = given[:2] if len(given) >= 2 else given[:1]
            upper[-1] += 1
            out.append(f">={'.'.join(map(str, given))},<{'.'.join(map(str, upper))}")
        elif re.fullmatch(r"\d+(\.\d+)*", part):
            out.append(f"=={part}")
        else:
            out.append(part)
    return ",".join(out)

"""What installing a requirements file would really put on a machine: the whole closure, from a real
resolver, so `check -r` judges the packages pip pulls and not only the lines the file pins (issue #14).

    resolution = resolve_requirements(Path("requirements.txt"), machine, as_of="2025-04-15")
    env = environment_from_pins(resolution.pins, "requirements.txt")      # then judged like any environment

The resolver is uv (`uv pip compile` for the machine's Python version and platform, `--exclude-newer` for
`--as-of`), which reads everything pip's format allows (ranges, markers, `-r`/`-c` includes, hashes,
index options). Answers are cached by (file content, Python, platform, date) under the tool's cache, so
a repeated `check -r` answers at once; a resolution the resolver refuses is a Resolution with `error`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.errors import InputError
from qlora_doctor.core.subprocs import run_bounded

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine

TIMEOUT_S = 180.0
PLATFORMS = {("linux", "x86_64"): "x86_64-manylinux_2_28", ("linux", "aarch64"): "aarch64-manylinux_2_28",
             ("windows", "x86_64"): "x86_64-pc-windows-msvc", ("darwin", "arm64"): "aarch64-apple-darwin",
             ("darwin", "x86_64"): "x86_64-apple-darwin"}
"""(machine os, arch) -> uv's --python-platform."""


@dataclass(frozen=True)
class Resolution:
    pins: dict[str, str]
    """Every package of the closure -> its version (canonical names)."""
    pulled_by: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """A package the file does not name -> who required it (`torch 2.6.0`)."""
    named: tuple[str, ...] = ()
    """The packages the file itself asks for."""
    resolver: str = ""
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None
    """The resolver's reason in one line when the file cannot install on the machine."""

    def to_json(self) -> dict:
        return {"resolver": self.resolver, "seconds": self.seconds, "cached": self.cached, "error": self.error,
                "pins": self.pins, "pulled_by": {k: list(v) for k, v in self.pulled_by.items()},
                "named": list(self.named)}

    @classmethod
    def from_json(cls, data: dict, cached: bool = True) -> Resolution:
        return cls(pins=dict(data["pins"]), pulled_by={k: tuple(v) for k, v in data.get("pulled_by", {}).items()},
                   named=tuple(data.get("named", ())), resolver=data.get("resolver", ""),
                   seconds=data.get("seconds", 0.0), cached=cached, error=data.get("error"))


def find_uv() -> str | None:
    """uv from PATH, else beside this Python (a venv's bin/)."""
    found = shutil.which("uv")
    if found:
        return found
    beside = Path(sys.executable).with_name("uv")
    return str(beside) if beside.is_file() else None


def cache_dir() -> Path:
    from qlora_doctor.core.fileio import cache_root

    return cache_root() / "resolutions"


def cache_key(text: str, python: str, platform: str, as_of: str | None) -> str:
    return hashlib.sha256(json.dumps([text, python, platform, as_of or ""]).encode()).hexdigest()[:24]


def resolve_requirements(path: Path, machine: Machine, as_of: str | None = None,
                         timeout_s: float = TIMEOUT_S, uv: str | None = None) -> Resolution:
    """The closure installing `path` gives on `machine` (as of `as_of`, YYYY-MM-DD). InputError when the file
    cannot be read or no resolver is installed; a Resolution with `error` when the resolver refuses."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the requirements file ({err})")
    if as_of is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", as_of):
        raise InputError(f"--as-of {as_of!r}: expected a date like 2025-04-15")
    python = ".".join(machine.python.split(".")[:2])
    platform = PLATFORMS.get((machine.os, machine.arch), "x86_64-manylinux_2_28")
    key = cache_key(_with_includes(Path(path), text), python, platform, as_of)
    cached = cache_dir() / f"{key}.json"
    if cached.is_file():
        try:
            return Resolution.from_json(json.loads(cached.read_text(encoding="utf-8")))
        except (ValueError, KeyError):
            pass
    uv = uv or find_uv()
    if uv is None:
        raise InputError(f"{path}: resolving it needs uv (`pip install uv`); or judge the lines as written with "
                         "--no-resolve")
    argv = [uv, "pip", "compile", str(Path(path).resolve()), "--python-version", python, "--python-platform", platform,
            "--no-header", "--quiet"]
    if as_of:
        argv += ["--exclude-newer", f"{as_of}T23:59:59Z"]
    started = time.perf_counter()
    done = run_bounded(argv, timeout_s, cwd=Path(path).resolve().parent)
    seconds = round(time.perf_counter() - started, 2)
    version = run_bounded([uv, "--version"], 10).stdout.strip()
    if done.returncode is None:
        resolution = Resolution({}, resolver=version, seconds=seconds,
                                error=f"the resolver did not answer within {timeout_s:g} s")
        return resolution  # not cached: the next try may be luckier
    if done.returncode != 0:
        resolution = Resolution({}, resolver=version, seconds=seconds, error=_reason(done.stderr))
    else:
        pins, pulled = parse_compiled(done.stdout)
        named = tuple(sorted(n for n, who in pulled.items() if any(w.startswith("-r ") for w in who)))
        pulled_by = {n: tuple(w for w in who if not w.startswith("-r ")) for n, who in pulled.items()
                     if n not in named}
        resolution = Resolution(pins, pulled_by=pulled_by, named=named, resolver=version, seconds=seconds)
    cached.parent.mkdir(parents=True, exist_ok=True)
    from qlora_doctor.core.fileio import write_atomic

    write_atomic(cached, json.dumps(resolution.to_json(), indent=1))
    return resolution


def _with_includes(path: Path, text: str, depth: int = 0) -> str:
    """The file's text with the text of its `-r`/`-c` includes (for the cache key)."""
    if depth > 5:
        return text
    parts = [text]
    for match in re.finditer(r"^\s*-[rc]\s+(\S+)|^\s*--(?:requirement|constraint)[= ](\S+)", text, re.MULTILINE):
        include = path.parent / (match.group(1) or match.group(2))
        try:
            parts.append(_with_includes(include, include.read_text(encoding="utf-8"), depth + 1))
        except (OSError, UnicodeDecodeError):
            parts.append(f"<missing {include}>")
    return "\n".join(parts)


def parse_compiled(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """`uv pip compile` output -> ({name: version}, {name: [who required it]}); `# via -r file` names the file."""
    pins: dict[str, str] = {}
    via: dict[str, list[str]] = {}
    current: str | None = None
    in_via = False
    for line in text.splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if pin:
            current = canonical_name(pin.group(1))
            pins[current] = pin.group(2)
            via.setdefault(current, [])
            in_via = False
            continue
        comment = line.strip()
        if current is None or not comment.startswith("#"):
            continue
        body = comment.lstrip("#").strip()
        if body.startswith("via"):
            rest = body[3:].strip()
            in_via = True
            if rest:
                via[current].append(rest)
        elif in_via and body:
            via[current].append(body)
    who: dict[str, list[str]] = {}
    for name, sources in via.items():
        who[name] = [s if s.startswith("-r ") else f"{canonical_name(s)} {pins.get(canonical_name(s), '?')}"
                     for s in sources]
    return pins, who


def _reason(stderr: str) -> str:
    """The resolver's refusal in one line (uv explains conflicts over several)."""
    lines = [re.sub(r"^[\s×╰─▶│]+", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and not line.startswith("hint:")]
    text = " ".join(lines)
    return (text[:400] + "...") if len(text) > 400 else text or "the resolver failed without a message"

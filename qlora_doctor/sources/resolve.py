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
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.errors import InputError
from qlora_doctor.core.subprocs import run_bounded
from qlora_doctor.sources.reqfile import Prepared, host_reachable, index_hosts, prepare_requirements, with_build
from qlora_doctor.sources.resolution import Resolution, reason as _reason

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine

TIMEOUT_S = 180.0
PLATFORMS = {("linux", "x86_64"): "x86_64-manylinux_2_28", ("linux", "aarch64"): "aarch64-manylinux_2_28",
             ("windows", "x86_64"): "x86_64-pc-windows-msvc", ("darwin", "arm64"): "aarch64-apple-darwin",
             ("darwin", "x86_64"): "x86_64-apple-darwin"}
"""(machine os, arch) -> uv's --python-platform; on Linux the glibc part is the machine's own (`uv_platform`)."""
MANYLINUX_MINORS = (17, 28, *range(31, 41))
"""glibc 2.N for which uv (0.13, `uv pip compile --help`, --python-platform) has a `<arch>-manylinux_2_N` target."""
LINUX_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def uv_platform(machine: Machine) -> str:
    """uv's --python-platform for `machine`. On Linux, the newest manylinux target its glibc can load
    (`glibc 2.35` -> `x86_64-manylinux_2_35`), so wheels built for a newer glibc than 2.28 (vllm 0.15.1 ships only
    manylinux_2_31) resolve where they install (below glibc 2.17 uv's oldest, manylinux_2_17); musl ->
    `<arch>-unknown-linux-musl`; no libc known -> manylinux_2_28."""
    arch = LINUX_ARCHES.get(machine.arch.lower()) if machine.os == "linux" else None
    if arch is None:
        return PLATFORMS.get((machine.os, machine.arch), "x86_64-manylinux_2_28")
    libc = (machine.libc or "").lower()
    if "musl" in libc:
        return f"{arch}-unknown-linux-musl"
    found = re.search(r"glibc\D*2\.(\d+)", libc)
    if not found:
        return f"{arch}-manylinux_2_28"
    usable = [minor for minor in MANYLINUX_MINORS if minor <= int(found.group(1))]
    return f"{arch}-manylinux_2_{usable[-1] if usable else MANYLINUX_MINORS[0]}"


class NoResolver(InputError):
    """Neither uv nor pip can be run here."""


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


RESOLVE_LOGIC = 2
"""Bumped when what is asked of the resolver changes (2: torch decided first where pip would), so answers cached
by an older qlora-doctor are not reused."""


def cache_key(text: str, python: str, platform: str, as_of: str | None) -> str:
    return hashlib.sha256(json.dumps([text, python, platform, as_of or "", RESOLVE_LOGIC]).encode()).hexdigest()[:24]


def resolve_requirements(path: Path, machine: Machine, as_of: str | None = None,
                         timeout_s: float = TIMEOUT_S, uv: str | None = None,
                         reachable: Callable[[str, int], bool] = host_reachable,
                         constraints: str = "", resolver: str = "auto") -> Resolution:
    """The closure installing `path` gives on `machine` (as of `as_of`, YYYY-MM-DD). A `pylock.toml` (PEP 751)
    is already resolved and is read as it is. InputError when the file is malformed (every bad line named)
    or no resolver is installed; a Resolution with `error` when the resolver refuses or cannot be reached.
    `constraints` (pip constraints text) limits the resolver (the knowledge base's, for `lock`). With no index
    reachable (and nothing in uv's cache), or `resolver="snapshot"`, the bundled snapshot answers (snapshot.py)."""
    if as_of is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", as_of):
        raise InputError(f"--as-of {as_of!r}: expected a date like 2025-04-15")
    if is_pylock(Path(path)):
        from qlora_doctor.sources.pylock import read_pylock

        return read_pylock(Path(path), machine)
    prepared = prepare_requirements(Path(path), machine, reachable)
    python = ".".join(machine.python.split(".")[:2])
    platform = uv_platform(machine)
    index_up = all(reachable(host, 443) for host in index_hosts(prepared))
    if resolver == "snapshot":  # asked for: offline and reproducible, whatever answers from here
        from qlora_doctor.sources.snapshot import resolve_prepared

        return resolve_prepared(prepared, machine, as_of, constraints, why="--resolver snapshot: resolved offline")
    key = cache_key(_with_includes(Path(path), prepared.text) + constraints, python, platform, as_of)
    cached = cache_dir() / f"{key}.json"
    if cached.is_file():
        try:
            return finish(Resolution.from_json(json.loads(cached.read_text(encoding="utf-8"))), prepared, index_up)
        except (ValueError, KeyError):
            pass
    uv = uv or find_uv()
    if uv is None:
        from qlora_doctor.sources.pipreport import pip_available, resolve_with_pip

        if not pip_available():
            raise NoResolver(f"{path}: no resolver installed (neither uv nor pip can run here)")
        resolution = resolve_with_pip(prepared, machine, as_of, timeout_s if index_up else min(timeout_s, 20.0),
                                      cwd=Path(path).resolve().parent, constraints=constraints)
    else:
        resolution = _resolve_with_uv(uv, prepared, python, platform, as_of, timeout_s, index_up,
                                      Path(path).resolve().parent, constraints)
    if resolution.error and not index_up:  # issue #14: the bundled snapshot of PyPI metadata instead
        from qlora_doctor.sources.snapshot import resolve_prepared

        return resolve_prepared(prepared, machine, as_of, constraints,
                                why=f"no package index answers from here ({', '.join(index_hosts(prepared))})")
    if resolution.error and (not index_up or "did not answer within" in resolution.error):
        return finish(resolution, prepared, index_up)  # not cached: with the index back the answer may differ
    cached.parent.mkdir(parents=True, exist_ok=True)
    from qlora_doctor.core.fileio import write_atomic

    write_atomic(cached, json.dumps(resolution.to_json(), indent=1))  # the resolver's answer, before `finish`
    return finish(resolution, prepared, index_up)


def is_pylock(path: Path) -> bool:
    """PEP 751 names: `pylock.toml` or `pylock.<name>.toml`."""
    return bool(re.fullmatch(r"pylock(\.[^.]+)?\.toml", path.name))


def _resolve_with_uv(uv: str, prepared: Prepared, python: str, platform: str, as_of: str | None, timeout_s: float,
                     index_up: bool, cwd: Path, constraints: str) -> Resolution:
    import os
    import tempfile

    version = run_bounded([uv, "--version"], 10).stdout.strip() or "uv"
    env = {**os.environ, "UV_HTTP_TIMEOUT": str(int(min(max(timeout_s / 3, 5), 30)))}
    with tempfile.TemporaryDirectory(prefix="qlora-doctor-resolve-") as tmp:
        source = Path(tmp) / "requirements.in"
        source.write_text(prepared.text, encoding="utf-8")
        argv = [uv, "pip", "compile", str(source), "--python-version", python, "--python-platform", platform,
                "--no-header", "--quiet"]
        if as_of:
            argv += ["--exclude-newer", f"{as_of}T23:59:59Z"]
        if not index_up:
            argv += ["--offline"]  # the index does not answer: uv's own cache, or a fast refusal
        if constraints:
            (Path(tmp) / "constraints.txt").write_text(constraints, encoding="utf-8")
            argv += ["--constraint", str(Path(tmp) / "constraints.txt")]
        started = time.perf_counter()
        overrides: dict[str, tuple[str, str]] = {}
        unbuilt: dict[str, str] = {}
        for _ in range(4):  # each retry lifts one obstacle the resolver named; never more than a few
            left = timeout_s - (time.perf_counter() - started)
            done = run_bounded(argv + _retry_options(Path(tmp), overrides, unbuilt), max(left, 1.0), env=env, cwd=cwd)
            if done.returncode in (0, None):
                break
            more_overrides = {n: o for n, o in _local_build_overrides(done.stderr).items() if n not in overrides}
            more_unbuilt = {n: v for n, v in _unbuilt_sdists(done.stderr).items() if n not in unbuilt}
            if not more_overrides and not more_unbuilt:
                break
            overrides.update(more_overrides)
            unbuilt.update(more_unbuilt)
        torch_first: tuple[str, str] | None = None
        if done.returncode == 0:
            better = _torch_first_text(done.stdout, prepared.text, python, as_of)
            if better is not None:  # pip would have decided torch earlier than uv did: ask uv again, torch first
                again_source = Path(tmp) / "requirements-torch-first.in"
                again_source.write_text(better, encoding="utf-8")
                left = timeout_s - (time.perf_counter() - started)
                again = run_bounded([str(again_source) if a == str(source) else a for a in argv]
                                    + _retry_options(Path(tmp), overrides, unbuilt), max(left, 1.0), env=env, cwd=cwd)
                if again.returncode == 0 and _same_named(done.stdout, again.stdout):
                    torch_first = (parse_compiled(done.stdout)[0]["torch"], parse_compiled(again.stdout)[0]["torch"])
                    done = again
        seconds = round(time.perf_counter() - started, 2)
    subs = tuple(f"the closure asks for {n}=={v}+{tag} (PyTorch's index only): resolved {n} {v} from PyPI, {tag} kept as "
                 "the build" for n, (v, tag) in overrides.items())
    subs += tuple(f"{n}=={v} has no wheel for this platform and building its source failed here (to read "
                  "its requirements): resolved as requiring nothing, its own requirements not judged"
                  for n, v in unbuilt.items())
    builds = {n: tag for n, (_, tag) in overrides.items()}
    if done.returncode is None:
        return Resolution({}, resolver=version, seconds=seconds, substitutions=subs,
                          error=f"the resolver did not answer within {timeout_s:g} s")
    if done.returncode != 0:
        return Resolution({}, resolver=version, seconds=seconds, error=_reason(done.stderr), substitutions=subs)
    pins, pulled = parse_compiled(done.stdout)
    named = tuple(sorted(n for n, who in pulled.items() if any(w.startswith("-r ") for w in who)
                         and not (torch_first and n == "torch")))  # torch was only put first, the file does not name it
    if torch_first and torch_first[0] != torch_first[1]:
        subs += (f"torch {torch_first[1]}, not uv's first answer {torch_first[0]}: pip decides torch (which its "
                 "dependents require with a version) before packages required without one, so a leaf like "
                 "nvidia-nccl-cu12 takes the version torch pins instead of holding torch back; resolved again with "
                 "torch decided first, every package the file names unchanged",)
    pulled_by = {n: tuple(w for w in who if not w.startswith("-r ")) for n, who in pulled.items() if n not in named}
    pins = {n: with_build(v, builds.get(n)) for n, v in pins.items()}
    return Resolution(pins, pulled_by=pulled_by, named=named, resolver=version, seconds=seconds, substitutions=subs)


def newest_torch(python: str, as_of: str | None) -> Version | None:
    """The newest final torch release (bundled snapshot) uploaded by `as_of` that declares support for `python`."""
    from qlora_doctor.sources.snapshot import snapshot_releases

    try:
        wanted = Version(python)
    except InvalidVersion:
        return None
    for release in snapshot_releases()[0].get("torch", ()):  # newest first
        if release.yanked or release.version.is_prerelease or release.version.local:
            continue
        if as_of and release.uploaded[:10] > as_of:
            continue
        if release.requires_python is not None and not release.requires_python.contains(wanted):
            continue
        return release.version
    return None


def _torch_first_text(compiled: str, text: str, python: str, as_of: str | None) -> str | None:
    """The file with torch put first, when uv's closure pulls a torch older than the newest one for this Python and
    date (None otherwise: torch is not pulled, the file names it, or uv already has the newest).

    pip and uv pick the same newest-first versions but decide packages in different orders: pip decides a package
    that some requirer states a version for (`torch>=1.10.0` from accelerate) before one only ever required bare
    (xgboost's `nvidia-nccl-cu12`), uv in the order it meets them. So uv can take the newest nvidia-nccl-cu12 first
    and then step torch down until one accepts it (torch 2.0.1, built on CUDA 11 libraries), where pip takes the
    newest torch and gives the leaf the version torch pins (case 01 of tests/data/pinsets: autotrain-advanced, where
    pip's torch 2.6 brought triton 3.2). Naming torch first makes uv decide it first, as pip does."""
    pins, pulled = parse_compiled(compiled)
    if "torch" not in pins or any(w.startswith("-r ") for w in pulled.get("torch", ())):
        return None
    newest = newest_torch(python, as_of)
    try:
        if newest is None or Version(pins["torch"]).release >= newest.release:
            return None
    except InvalidVersion:
        return None
    return "torch\n" + text


def _same_named(first: str, second: str) -> bool:
    """Every package the file names resolves to the same version in both answers (only pulled packages moved)."""
    pins, pulled = parse_compiled(first)
    again = parse_compiled(second)[0]
    return all(again.get(n) == v for n, v in pins.items() if any(w.startswith("-r ") for w in pulled.get(n, ())))


def _retry_options(tmp: Path, overrides: dict[str, tuple[str, str]], unbuilt: dict[str, str]) -> list[str]:
    """uv options lifting what a previous try stumbled on: an override of a PyTorch-only local build, and
    static metadata (no requirements) for an sdist that cannot build here."""
    options: list[str] = []
    if overrides:
        (tmp / "overrides.txt").write_text("".join(f"{n}=={v}\n" for n, (v, _) in overrides.items()))
        options += ["--overrides", str(tmp / "overrides.txt")]
    if unbuilt:
        (tmp / "uv.toml").write_text("".join(f'[[dependency-metadata]]\nname = "{n}"\nversion = "{v}"\n'
                                             "requires-dist = []\n\n" for n, v in unbuilt.items()))
        options += ["--config-file", str(tmp / "uv.toml")]
    return options


def _unbuilt_sdists(stderr: str) -> dict[str, str]:
    """uv's "Failed to build `av==11.0.0`" -> {"av": "11.0.0"}: an exact pin whose sdist needs a build to be read."""
    return {canonical_name(n): v for n, v in re.findall(r"Failed to (?:download and )?build `([A-Za-z0-9._-]+)==([^`\s]+)`",
                                                         stderr)}


def _local_build_overrides(stderr: str) -> dict[str, tuple[str, str]]:
    """uv's "there is no version of torch==2.1.0+cpu" -> {"torch": ("2.1.0", "cpu")} for the torch family."""
    found = re.findall(r"no version of (torch|torchvision|torchaudio)==([0-9][0-9a-z.]*)\+([a-z0-9.]+)", stderr)
    return {name: (public, tag) for name, public, tag in found}


def finish(resolution: Resolution, prepared: Prepared, index_up: bool) -> Resolution:
    """The resolver's answer with what preparing the file decided: torch's build tag back on the torch family,
    the packages kept unresolved (a wheel URL's version pinned; the rest of unknown version), every
    substitution in the report."""
    import dataclasses

    subs = prepared.substitutions + resolution.substitutions
    if not index_up:
        subs += ("no package index answers from here (" + ", ".join(index_hosts(prepared)) + "): only what uv "
                 "had cached could be resolved",)
    if resolution.error:
        return dataclasses.replace(resolution, substitutions=subs, offline=not index_up,
                                   unknown=tuple(sorted(set(resolution.unknown) | set(prepared.unresolved))))
    pins = {n: with_build(v, prepared.torch_builds.get(n)) for n, v in resolution.pins.items()}
    unknown = []
    for name, version in prepared.unresolved.items():
        pins.pop(name, None)  # PyPI's release that another package pulled is not what the URL installs
        if version:
            pins[name] = version
        else:
            unknown.append(name)
    pulled_by = {n: who for n, who in resolution.pulled_by.items() if n in pins and n not in prepared.unresolved}
    return dataclasses.replace(resolution, pins=pins, pulled_by=pulled_by, substitutions=subs,
                               unknown=tuple(sorted(unknown)), offline=not index_up,
                               named=tuple(sorted(set(resolution.named) | set(prepared.unresolved))))


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

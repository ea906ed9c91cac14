"""A requirements file read the way pip reads it, made ready for the resolver (issue #14): `-r` includes
inlined, continuation lines joined, every line checked (a malformed one is an InputError naming file and
line), and what cannot be reached from here substituted, each substitution said in one line:

- an index or find-links URL whose host does not answer is dropped, so PyPI answers instead; a PyTorch
  index (`https://download.pytorch.org/whl/cu121`) leaves its variant (`cu121`) as torch's build;
- `torch==2.1.0+cu121`: local builds exist only on PyTorch's index, and its cuXXX wheels differ from
  PyPI's only in the CUDA libraries they depend on, so PyPI's 2.1.0 is resolved and `cu121` kept as the
  build the CUDA/driver/GPU checks judge;
- a git or URL requirement whose host does not answer is kept as a named package of unknown version (a
  wheel's file name gives its version), not resolved.

    prepared = prepare_requirements(Path("requirements.txt"), machine)
    prepared.text            # what the resolver reads
    prepared.substitutions   # one line each, for the report

Reachability is probed once per host (a TCP connect, `PROBE_TIMEOUT_S`); `UV_OFFLINE` or
`QLORA_DOCTOR_OFFLINE` set to 1 makes every remote host unreachable (the override, and the test seam).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from packaging.markers import InvalidMarker, Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.errors import InputError

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine

PROBE_TIMEOUT_S = 3.0
PYPI_HOSTS = ("pypi.org", "files.pythonhosted.org")
PYTORCH_INDEX = re.compile(r"https?://download\.pytorch\.org/whl/(?:(?:nightly|test)/)?(cpu|cu\d+|rocm[\d.]+|xpu)\b")
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
"""The packages PyTorch's index builds per CUDA variant (`2.5.1+cu124`): PyPI serves the same release."""
OFFLINE_ENV = ("UV_OFFLINE", "QLORA_DOCTOR_OFFLINE")

_PASS_THROUGH = {"--pre", "--no-index", "--prefer-binary", "--trusted-host", "--no-binary", "--only-binary",
                 "--use-feature", "--require-hashes"}
"""pip options that change no package name: handed to the resolver as written."""
_BUILD_OPTION = r"(?:-C|--config-settings|--global-option|--install-option)[= ](?:\"[^\"]*\"|'[^']*'|\S+)"
_PER_LINE = re.compile(rf"\s+(--hash[= ]\S+|{_BUILD_OPTION})")
"""Per-requirement options: none names a package."""
_BUILD_OPTIONS = re.compile(rf"\s+({_BUILD_OPTION})")
"""Per-requirement build options (`-C cmake.args=...`): they change how a package builds, not which version
resolves, and uv does not read them in a requirements file; dropped from the resolver's line (hashes stay)."""
_LOCAL_CUDA = re.compile(r"^(?:cu\d+|cpu|rocm[\d.]+|xpu)$")
"""A local version tag naming a CUDA/CPU/ROCm build (`0.0.25.post1+cu118`): PyTorch's index carries such builds
of more packages than torch (xformers, torch-scatter...); PyPI serves the public release."""


@dataclass(frozen=True)
class Prepared:
    text: str
    """The requirements the resolver reads."""
    substitutions: tuple[str, ...] = ()
    """What was changed to make the file resolvable here, one line each."""
    unresolved: dict[str, str | None] = field(default_factory=dict)
    """Packages kept but not resolved (their source is out of reach) -> the version their file name gives, or None."""
    torch_builds: dict[str, str] = field(default_factory=dict)
    """torch/torchvision/torchaudio -> the local build tag the file asked for (`cu121`)."""
    index_variant: str | None = None
    """The variant of the PyTorch index the file names (`cu121`, `cpu`), when it names one."""
    primary_index: str | None = None
    """The `--index-url` kept (reachable), or None for PyPI."""


def offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes") for name in OFFLINE_ENV)


_REACHABLE: dict[tuple[str, int], bool] = {}


def host_reachable(host: str, port: int = 443, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to host:port opens within the timeout (DNS included; a daemon thread bounds it)."""
    if offline():
        return False
    key = (host, port)
    if key not in _REACHABLE:
        answer: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection((host, port), timeout=timeout_s).close()
                answer.append(True)
            except OSError:
                answer.append(False)

        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        worker.join(timeout_s + 0.5)
        _REACHABLE[key] = bool(answer and answer[0])
    return _REACHABLE[key]


def url_reachable(url: str, reachable: Callable[[str, int], bool] = host_reachable) -> bool:
    parsed = urlparse(url[4:] if url.startswith("git+") else url)
    if parsed.scheme in ("", "file"):
        return True
    if not parsed.hostname:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443 if parsed.scheme in ("https", "ssh") else 22)
    return reachable(parsed.hostname, port)


def marker_environment(machine: Machine) -> dict[str, str]:
    """PEP 508 marker values for the machine (what pip would see running there)."""
    python = machine.python if machine.python.count(".") >= 2 else f"{machine.python}.0"
    system = {"linux": "Linux", "windows": "Windows", "darwin": "Darwin"}.get(machine.os, "Linux")
    arch = {"windows": {"x86_64": "AMD64", "arm64": "ARM64"}}.get(machine.os, {}).get(machine.arch, machine.arch)
    return {"python_version": ".".join(python.split(".")[:2]), "python_full_version": python,
            "sys_platform": {"Linux": "linux", "Windows": "win32", "Darwin": "darwin"}[system],
            "platform_system": system, "platform_machine": arch, "os_name": "nt" if system == "Windows" else "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "platform_release": "", "platform_version": "", "implementation_version": python, "extra": ""}


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with `\\` continuations joined and comments (` #...`, `#...`) removed, as pip does."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = lineno
        line = re.sub(r"(^|\s+)#.*$", "", raw)
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        if joined:
            out.append((start, joined))
    if pending and " ".join(pending).strip():
        out.append((start, " ".join(part.strip() for part in pending).strip()))
    return out


def name_from_url(url: str) -> tuple[str | None, str | None]:
    """(name, version) a URL requirement installs, from `#egg=`, a wheel's or sdist's file name, or a repo's name."""
    egg = re.search(r"[#&]egg=([A-Za-z0-9][A-Za-z0-9._-]*)", url)
    if egg:
        return canonical_name(egg.group(1)), None
    tail = urlparse(url).path.rstrip("/").rsplit("/", 1)[-1]
    if tail.endswith(".whl"):
        try:
            name, version, _, _ = parse_wheel_filename(tail)
            return canonical_name(str(name)), str(version)
        except (InvalidWheelFilename, InvalidVersion):
            return None, None
    sdist = re.match(r"^(.+?)-(\d[^-]*)\.(tar\.gz|zip|tar\.bz2)$", tail)
    if sdist:
        return canonical_name(sdist.group(1)), sdist.group(2)
    if url.startswith("git+") or tail.endswith(".git"):
        repo = re.sub(r"\.git$", "", tail.split("@", 1)[0])
        return (canonical_name(repo), None) if repo else (None, None)
    return None, None


class _Reader:
    def __init__(self, machine: Machine, reachable: Callable[[str, int], bool]) -> None:
        self.machine = machine
        self.markers = marker_environment(machine)
        self.reachable = reachable
        self.lines: list[str] = []
        self.subs: list[str] = []
        self.errors: list[str] = []
        self.unresolved: dict[str, str | None] = {}
        self.torch_builds: dict[str, str] = {}
        self.local_torch_resolved = False
        """A torch-family `+cuXXX` pin was resolved as PyPI's release (its CUDA library pins are then released)."""
        self.index_variant: str | None = None
        self.primary: str | None = None
        self.pytorch_index_kept = False
        self.seen: set[Path] = set()

    def read(self, path: Path, depth: int = 0) -> None:
        path = path.resolve()
        if path in self.seen or depth > 10:
            return
        self.seen.add(path)
        text = path.read_text(encoding="utf-8")
        for lineno, line in logical_lines(text):
            where = f"{path.name}:{lineno}"
            if line.startswith("-"):
                self.option(path, where, line, depth)
            else:
                self.requirement(path, where, line)

    def option(self, path: Path, where: str, line: str, depth: int) -> None:
        try:
            words = shlex.split(line)
        except ValueError as err:
            self.errors.append(f"{where}: cannot split {line!r} ({err})")
            return
        flag, _, value = words[0].partition("=")
        if not value and len(words) > 1:
            value = words[1]
        if flag.startswith("-") and not flag.startswith("--") and len(flag) > 2:  # -rfile, -ihttps://...
            flag, value = flag[:2], flag[2:]
        if flag in ("-r", "--requirement", "-c", "--constraint"):
            include = (path.parent / value) if value else None
            if include is None or not include.is_file():
                self.errors.append(f"{where}: {flag} {value or '(nothing)'}: no such file")
            elif flag in ("-r", "--requirement"):
                self.read(include)
            else:
                self.lines.append(f"-c {include.resolve()}")
        elif flag in ("-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
            if not value:
                self.errors.append(f"{where}: {flag} needs a URL")
                return
            variant = PYTORCH_INDEX.match(value)
            if variant:
                self.index_variant = variant.group(1)
            if url_reachable(value, self.reachable) or not re.match(r"https?://", value):
                if flag in ("-i", "--index-url"):
                    self.primary = value
                self.lines.append(f"{flag} {value}")
                self.pytorch_index_kept = self.pytorch_index_kept or bool(variant)
            elif variant:
                self.subs.append(f"{where}: {value} does not answer from here: PyPI resolves torch, torchvision and "
                                 f"torchaudio instead (same releases; {variant.group(1)} kept as torch's build)")
            else:
                self.subs.append(f"{where}: {value} does not answer from here: resolved against PyPI instead")
        elif flag in ("-e", "--editable"):
            if not value:
                self.errors.append(f"{where}: {flag} needs a path or URL")
            else:
                self.requirement(path, where, value, editable=True)
        elif flag in _PASS_THROUGH:
            self.lines.append(line)
        else:
            self.errors.append(f"{where}: unknown pip option {flag!r} (expected -r, -c, -e, --index-url, "
                               "--extra-index-url, --find-links or a requirement)")

    def requirement(self, path: Path, where: str, line: str, editable: bool = False) -> None:
        bare = _PER_LINE.sub("", f" {line}").strip()
        if re.match(r"^(git\+|hg\+|svn\+|bzr\+|https?://|file:)", bare) or bare.startswith((".", "/", "~")):
            url, _, marker = bare.partition(" ;")
            url, marker = url.strip(), marker.strip()
            if ";" in url and not marker:
                url, _, marker = url.partition(";")
            if marker:
                try:
                    if not Marker(marker).evaluate(self.markers):
                        return
                except InvalidMarker as err:
                    self.errors.append(f"{where}: bad environment marker {marker!r} ({err})")
                    return
            name, version = name_from_url(url)
            self.url_requirement(path, where, name, version, url.strip())
            return
        try:
            req = Requirement(bare)
        except InvalidRequirement as err:
            self.errors.append(f"{where}: not a requirement: {bare!r} ({str(err).splitlines()[0]})")
            return
        if req.marker is not None and not req.marker.evaluate(self.markers):
            return  # pip skips it on this machine; so does the resolver
        name = canonical_name(req.name)
        if req.url:
            _, version = name_from_url(req.url)
            self.url_requirement(path, where, name, version, req.url)
            return
        local = next((s for s in req.specifier if s.operator in ("==", "===") and "+" in s.version), None)
        if local is not None and not self.pytorch_index_kept:
            public, tag = local.version.split("+", 1)
            if name in TORCH_FAMILY:
                self.torch_builds[name] = tag
                self.local_torch_resolved = True
                self.subs.append(f"{where}: {req.name}{local}: PyPI serves {public} (local builds live on "
                                 f"download.pytorch.org); resolved {public} and kept {tag} as the build")
            elif _LOCAL_CUDA.match(tag):
                self.subs.append(f"{where}: {req.name}{local}: PyPI serves {public} (the {tag} build lives on "
                                 f"download.pytorch.org); resolved {public}")
            if name in TORCH_FAMILY or _LOCAL_CUDA.match(tag):
                self.lines.append(str(req).replace(str(local), f"=={public}"))
                return
        self.lines.append(_BUILD_OPTIONS.sub("", f" {line}").strip() if not editable else bare)

    def url_requirement(self, path: Path, where: str, name: str | None, version: str | None, url: str) -> None:
        local = not re.match(r"^[a-z+]+://", url) or url.startswith("file:")
        if local:
            target = Path(url[5:].lstrip("/") if url.startswith("file:") else url).expanduser()
            target = target if target.is_absolute() else path.parent / target
            if target.exists():
                self.lines.append(f"{name} @ {target.resolve().as_uri()}" if name else str(target.resolve()))
                return
            self.subs.append(f"{where}: local path {url} is not here: "
                             + (f"{name} kept, version unknown" if name else "not judged"))
        elif url_reachable(url, self.reachable):
            self.lines.append(f"{name} @ {url}" if name else url)
            return
        elif name is None:
            self.subs.append(f"{where}: {url} does not answer from here and names no package: not judged")
            return
        else:
            self.subs.append(f"{where}: {urlparse(url[4:] if url.startswith('git+') else url).hostname} does not answer "
                             f"from here: {name} kept as {'version ' + version if version else 'a package of unknown version'},"
                             " its requirements not resolved")
        if name:
            self.unresolved[name] = version


_CUDA_LIBRARY_PIN = re.compile(r"^(nvidia-[A-Za-z0-9_.-]+)\s*===?\s*[^\s;]+")
"""An exact pin of one of the CUDA libraries a torch build depends on (`nvidia-cublas-cu12==12.9.1.4`)."""


def _release_cuda_library_pins(reader: _Reader) -> None:
    """A lock written for torch's `+cuXXX` build pins that build's CUDA libraries exactly; PyPI's torch of the same
    release, resolved in its place, needs its own (pin-set case 112: torch 2.9.0+cu129 beside nvidia-cufile-cu12
    1.14.1.1, where PyPI's 2.9.0 requires 1.13.1.3). Those pins are left to the resolver, said in one line."""
    released = []
    for i, line in enumerate(reader.lines):
        match = _CUDA_LIBRARY_PIN.match(line)
        if match:
            reader.lines[i] = match.group(1) + line[match.end():]
            released.append(match.group(1))
    if released:
        reader.subs.append(f"{len(released)} exact pins of CUDA libraries ({', '.join(released[:3])}"
                           f"{', ...' if len(released) > 3 else ''}) belong to torch's local build: left to the "
                           "resolver, which picks what PyPI's torch of that release needs")


def prepare_requirements(path: Path, machine: Machine,
                         reachable: Callable[[str, int], bool] = host_reachable) -> Prepared:
    """The file ready for the resolver on `machine`; InputError listing every malformed line (file:line)."""
    reader = _Reader(machine, reachable)
    try:
        reader.read(Path(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such requirements file")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the requirements file ({err})")
    if reader.errors:
        raise InputError(reader.errors)
    if reader.index_variant and not reader.pytorch_index_kept:
        for name in TORCH_FAMILY:
            reader.torch_builds.setdefault(name, reader.index_variant)
    if reader.local_torch_resolved:
        _release_cuda_library_pins(reader)
    return Prepared("\n".join(reader.lines) + "\n", tuple(reader.subs), reader.unresolved, reader.torch_builds,
                    reader.index_variant, reader.primary)


def index_hosts(prepared: Prepared) -> tuple[str, ...]:
    """The hosts the resolver must reach for package metadata: the kept primary index, else PyPI."""
    if prepared.primary_index:
        host = urlparse(prepared.primary_index).hostname
        return (host,) if host else ()
    return PYPI_HOSTS[:1]


def with_build(version: str, tag: str | None) -> str:
    """`2.1.0` + `cu121` -> `2.1.0+cu121` (a version that already carries a build keeps it)."""
    if not tag or "+" in version:
        return version
    try:
        return str(Version(f"{version}+{tag}"))
    except InvalidVersion:
        return version

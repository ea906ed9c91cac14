"""pip's own resolver, for where uv is not installed: `pip install --dry-run --ignore-installed --report -`
installs nothing and prints, as JSON (https://pip.pypa.io/en/stable/reference/installation-report/),
every distribution it would install with its metadata. For another Python or platform than the one pip
runs under, pip needs `--python-version`/`--platform` and then accepts wheels only.

    resolution = resolve_with_pip(prepared, machine, as_of="2025-04-15", timeout_s=180, cwd=Path("."))
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.requirements import InvalidRequirement, Requirement

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.subprocs import run_bounded
from qlora_doctor.sources.resolution import Resolution, reason as _reason

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.sources.reqfile import Prepared

PIP_PLATFORMS = {("windows", "x86_64"): "win_amd64", ("darwin", "arm64"): "macosx_14_0_arm64",
                 ("darwin", "x86_64"): "macosx_10_15_x86_64"}
"""(machine os, arch) -> pip's --platform tag, where one tag is enough (Linux: `pip_platforms`)."""
LEGACY_MANYLINUX = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}
"""glibc 2.N -> the pre-PEP 600 name of that manylinux (PEP 513/571/599), which older wheels carry alone."""


def pip_platforms(machine: Machine) -> list[str]:
    """pip's --platform tags for the machine, each given once. pip takes a --platform tag literally: unlike on
    the machine itself it does not add the older manylinux tags a glibc also loads, so `manylinux_2_28_x86_64`
    alone refuses pandas 2.2.3 (manylinux_2_17 wheels) and bitsandbytes 0.45.0 (manylinux_2_24). On Linux: every
    manylinux_2_N from the machine's glibc (2.28 when unknown, as for uv) down to the oldest for the arch, the
    legacy names, and linux_<arch>, which pip also accepts on the machine itself."""
    import re

    if machine.os != "linux":
        return [PIP_PLATFORMS.get((machine.os, machine.arch), "manylinux_2_28_x86_64")]
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.arch.lower(), machine.arch.lower())
    found = re.search(r"glibc\D*2\.(\d+)", (machine.libc or "").lower())
    newest = int(found.group(1)) if found else 28
    oldest = 5 if arch in ("x86_64", "i686") else 17
    tags = []
    for minor in range(newest, oldest - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX and (arch in ("x86_64", "i686") or minor == 17):
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    return tags + [f"linux_{arch}"]


def pip_available() -> bool:
    return run_bounded([sys.executable, "-m", "pip", "--version"], 30).returncode == 0


def same_target(machine: Machine) -> bool:
    """pip runs under the machine's own Python and platform (no --platform/--python-version needed)."""
    here = ".".join(map(str, sys.version_info[:2]))
    os_name = {"linux": "linux", "win32": "windows", "darwin": "darwin"}.get(sys.platform, sys.platform)
    return (".".join(machine.python.split(".")[:2]) == here and machine.os == os_name
            and machine.arch.lower() in (host_platform.machine().lower(), {"amd64": "x86_64"}.get(
                host_platform.machine().lower(), "")))


def pip_argv(requirements: Path, machine: Machine, as_of: str | None, constraints: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
            "--disable-pip-version-check", "-r", str(requirements)]
    if not same_target(machine):
        argv += ["--python-version", ".".join(machine.python.split(".")[:2]), "--only-binary=:all:"]
        for tag in pip_platforms(machine):
            argv += ["--platform", tag]
    if as_of:
        argv += ["--uploaded-prior-to", f"{as_of}T23:59:59Z"]
    if constraints is not None:
        argv += ["-c", str(constraints)]
    return argv


def parse_report(text: str) -> tuple[dict[str, str], dict[str, list[str]], tuple[str, ...]]:
    """pip's installation report -> ({name: version}, {name: [who requires it]}, the requested names)."""
    report = json.loads(text)
    pins: dict[str, str] = {}
    requires: dict[str, list[Requirement]] = {}
    requested: list[str] = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name = canonical_name(meta["name"])
        pins[name] = meta["version"]
        if item.get("requested"):
            requested.append(name)
        reqs = []
        for line in meta.get("requires_dist", []) or []:
            try:
                reqs.append(Requirement(line))
            except InvalidRequirement:
                continue
        requires[name] = reqs
    who: dict[str, list[str]] = {name: [] for name in pins}
    for parent, reqs in requires.items():
        for req in reqs:
            child = canonical_name(req.name)
            if child in who and req.marker is None:  # an extra's requirement is not known to be in play
                who[child].append(f"{parent} {pins[parent]}")
    return pins, who, tuple(sorted(requested))


def resolve_with_pip(prepared: Prepared, machine: Machine, as_of: str | None, timeout_s: float, cwd: Path,
                     constraints: str = "") -> Resolution:

    version = run_bounded([sys.executable, "-m", "pip", "--version"], 30).stdout.split(" from ")[0].strip()
    with tempfile.TemporaryDirectory(prefix="qlora-doctor-pip-") as tmp:
        source = Path(tmp) / "requirements.txt"
        source.write_text(prepared.text, encoding="utf-8")
        extra = None
        if constraints:
            extra = Path(tmp) / "constraints.txt"
            extra.write_text(constraints, encoding="utf-8")
        env = {**os.environ, "PIP_DEFAULT_TIMEOUT": str(int(min(max(timeout_s / 6, 5), 30))), "PIP_RETRIES": "1"}
        started = time.perf_counter()
        done = run_bounded(pip_argv(source, machine, as_of, extra), timeout_s, env=env, cwd=cwd)
        seconds = round(time.perf_counter() - started, 2)
    if done.returncode is None:
        return Resolution({}, resolver=version, seconds=seconds, error=f"the resolver did not answer within {timeout_s:g} s")
    if done.returncode != 0:
        return Resolution({}, resolver=version, seconds=seconds, error=_reason(done.stderr))
    try:
        pins, who, requested = parse_report(done.stdout)
    except (ValueError, KeyError) as err:
        return Resolution({}, resolver=version, seconds=seconds, error=f"pip's report could not be read ({err})")
    pulled_by = {n: tuple(w) for n, w in who.items() if n not in requested}
    return Resolution(pins, pulled_by=pulled_by, named=requested, resolver=version, seconds=seconds)

"""`qlora-doctor lock`: a pip requirements file of exact pins for this machine, from a tested record.

Selection: among the matrix records that work (install, check and smoke passed), those that fit the
machine (same OS and arch, the Python asked for, a torch build the driver can run under NVIDIA's
minimum-driver table and whose kernels cover the GPU, or a CPU build on a machine without an NVIDIA
GPU) and agree with `--keep`/`--constraints`; the newest of them (by torch, transformers, peft,
bitsandbytes, accelerate, datasets versions, then date). When none fits, the error names the closest
record and every reason it does not fit.

`--untested` asks pip's resolver instead (`pip install --dry-run --report`), under the knowledge base's
constraints, then vets the result with the doctor; its header says untested. Lockfile writing, drift
checks and `--repair` live here too: they all speak the same format (`parse_lockfile`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from qlora_doctor import __version__
from qlora_doctor.knowledge.loading import Tables, choose_torch_build, torch_variant_for
from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.machine import Machine
from qlora_doctor.core.environment import TRAINING_NEEDS, WATCHED, Environment
from qlora_doctor.sources.requirements import parse_requirements
from qlora_doctor.core.errors import CheckFailed, InputError
from qlora_doctor.core.fileio import write_atomic
from qlora_doctor.matrix.records import PlatformParts, Record, parse_platform

NEWEST_ORDER = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
NOT_LOCKED = ("pip", "setuptools", "wheel", "qlora-doctor")
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"


@dataclass(frozen=True)
class Fit:
    record: Record
    reasons: tuple[str, ...]
    """Why the record does not fit (empty: it fits)."""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lockfile:
    pins: dict[str, str] = field(hash=False)
    index_urls: tuple[str, ...]
    header: tuple[str, ...]
    """Comment lines, without the leading `# `."""

    def render(self) -> str:
        lines = [f"# {h}" if h else "#" for h in self.header]
        lines += [f"--extra-index-url {url}" for url in self.index_urls]
        lines += [f"{name}=={version}" for name, version in sorted(self.pins.items())]
        return "\n".join(lines) + "\n"


# --- fitting records to a machine ---------------------------------------------------------------

def fit_record(record: Record, machine: Machine, python: str, tables: Tables,
               keep: dict[str, str] | None = None, constraints: tuple[Requirement, ...] = ()) -> Fit:
    reasons: list[str] = []
    notes: list[str] = []
    try:
        p = parse_platform(record.platform)
    except ValueError as err:
        return Fit(record, (str(err),))
    if not record.works or record.expect != "pass":
        reasons.append("its record did not pass" if record.expect == "pass" else "a known-bad combination")
    if p.os != machine.os or p.arch != machine.arch:
        reasons.append(f"made for {p.os} {p.arch}, this machine is {machine.os} {machine.arch}")
    if p.python != python:
        reasons.append(f"tested on Python {p.python}, wanted {python}")
    gpus = machine.nvidia_gpus if machine.gpu_vendor == "nvidia" else ()
    if p.cuda is None:
        if gpus:
            reasons.append("a CPU build of torch: it would not use the NVIDIA GPU")
    elif not gpus:
        reasons.append(f"a CUDA {p.cuda} build of torch, but this machine has no NVIDIA GPU")
    else:
        row = tables.driver_for_cuda(p.cuda)
        if machine.driver_version is None:
            reasons.append("the NVIDIA driver version is unknown (pass --machine FILE with driver_version)")
        elif row is None:
            reasons.append(f"no driver table row for CUDA {p.cuda}")
        else:
            minimum = row.minor_compat_driver or row.toolkit_driver
            if machine.driver < minimum:
                reasons.append(f"driver {machine.driver_version} is too old for CUDA {p.cuda} "
                               f"(needs >= {minimum})")
        torch = record.version("torch")
        archs = tables.archs_for_torch(torch, p.cuda) if torch is not None else None
        for gpu in gpus:
            if gpu.compute_capability is None or gpu.compute_capability == p.sm:
                continue
            from qlora_doctor.knowledge.loading import arch_supported

            if archs is not None and arch_supported(gpu.compute_capability, archs.archs):
                notes.append(f"tested on sm{(p.sm or '?').replace('.', '')}; torch {torch} also ships kernels "
                             f"for {gpu.name} (cc {gpu.compute_capability})")
            else:
                reasons.append(f"tested on sm{(p.sm or '?').replace('.', '')}, and torch {torch} has no kernels "
                               f"recorded for {gpu.name} (cc {gpu.compute_capability})")
    for name, version in (keep or {}).items():
        have = record.freeze.get(name)
        if have is None or Version(have) != Version(version) and Version(Version(have).public) != Version(version):
            reasons.append(f"has {name} {have or 'not installed'}, --keep wants {version}")
    for req in constraints:
        have = record.version(canonical_name(req.name))
        if have is not None and not req.specifier.contains(have, prereleases=True):
            reasons.append(f"has {req.name} {have}, the constraints want {req.name}{req.specifier}")
    return Fit(record, tuple(reasons), tuple(notes))


def _newest_key(record: Record) -> tuple:
    return tuple(record.version(n) or Version("0") for n in NEWEST_ORDER) + (record.date,)


def _build_suits(record: Record, machine: Machine) -> bool:
    """Whether the record's torch build is the kind this machine wants: a machine without an NVIDIA GPU gets a
    record that ran torch's CPU build (no 3 GB of CUDA libraries it cannot use) before a newer one that ran a
    CUDA build on a CPU; a GPU machine the other way round."""
    torch = record.version("torch")
    cpu_build = torch is not None and torch.local == "cpu"
    has_gpu = bool(machine.nvidia_gpus) if machine.gpu_vendor == "nvidia" else False
    return cpu_build != has_gpu


def choose_record(records: tuple[Record, ...], machine: Machine, python: str, tables: Tables,
                  keep: dict[str, str] | None = None, constraints: tuple[Requirement, ...] = ()) -> Fit:
    """The newest fitting record; CheckFailed naming the closest and why when none fits."""
    if not records:
        raise CheckFailed("no matrix records found: run `qlora-doctor matrix run` (or pass --results DIR), "
                          "or use `qlora-doctor lock --untested`")
    fits = [fit_record(r, machine, python, tables, keep, constraints) for r in records]
    good = [f for f in fits if not f.reasons]
    if good:
        return max(good, key=lambda f: (_build_suits(f.record, machine), _newest_key(f.record)))
    candidates = [f for f in fits if f.record.expect == "pass"] or fits
    closest = min(candidates, key=lambda f: (len(f.reasons), _Desc(_newest_key(f.record))))
    raise CheckFailed(f"no tested combination fits this machine (Python {python}, "
                      f"{_machine_words(machine)}). Closest: {closest.record.name} on {closest.record.platform} "
                      f"({Path(closest.record.path).name}), which does not fit because: {'; '.join(closest.reasons)}. "
                      "Use `qlora-doctor lock --untested` for a resolver-made set vetted by the doctor, or record "
                      "a combination for this platform with `qlora-doctor matrix run`")


def _machine_words(machine: Machine) -> str:
    gpus = machine.nvidia_gpus if machine.gpu_vendor == "nvidia" else ()
    if not gpus:
        return f"{machine.os} {machine.arch}, no NVIDIA GPU"
    names = ", ".join(f"{g.name} (cc {g.compute_capability or '?'})" for g in gpus)
    return f"{machine.os} {machine.arch}, driver {machine.driver_version or 'unknown'}, {names}"


# --- lockfile contents --------------------------------------------------------------------------

def lockable_pins(freeze: dict[str, str]) -> dict[str, str]:
    pins = {}
    for name, version in freeze.items():
        name = canonical_name(name)
        if name in NOT_LOCKED:
            continue
        try:
            Version(version)
        except InvalidVersion:
            continue  # a distro-patched version pip could not install anyway
        pins[name] = version
    return pins


def torch_index_urls(pins: dict[str, str]) -> tuple[str, ...]:
    torch = pins.get("torch")
    if not torch:
        return ()
    local = Version(torch).local
    return (TORCH_INDEX.format(variant=local),) if local and (local == "cpu" or local.startswith(("cu", "rocm"))) else ()


def header_lines(machine: Machine, python: str, platform: str, source: str, status: str, command: str,
                 output: str | None, today: str | None = None) -> tuple[str, ...]:
    gpus = machine.nvidia_gpus if machine.gpu_vendor == "nvidia" else ()
    gpu_words = ", ".join(f"{g.name} (cc {g.compute_capability or '?'})" for g in gpus) or "none"
    accel = platform.rsplit("-py", 1)[-1].split("-", 1)[-1] if "-py" in platform else "?"
    return (
        f"qlora-doctor {__version__} lockfile, made {today or dt.date.today().isoformat()}",
        f"status: {status}",
        f"platform: {platform} (Python {python}, {machine.os} {machine.arch}, CUDA variant: {accel})",
        f"made for: driver {machine.driver_version or 'none'}, GPU {gpu_words}",
        f"source: {source}",
        f"regenerate: {command}",
        f"install: pip install -r {output or 'THIS_FILE'}",
    )


def lockfile_from_record(fit: Fit, machine: Machine, python: str, command: str, output: str | None,
                         today: str | None = None) -> Lockfile:
    record = fit.record
    pins = lockable_pins(record.locked_freeze)
    source = (f"matrix record {record_source(record)} (combination {record.name}, passed install, check and "
              f"smoke on {record.date[:10]})")
    header = header_lines(machine, python, record.platform, source, "tested", command, output, today)
    header += tuple(f"note: {n}" for n in fit.notes)
    return Lockfile(pins, torch_index_urls(pins), header)


def record_source(record: Record) -> str:
    path = Path(record.path)
    return f"matrix-results/{path.name}" if path.name else record.name


def command_line(argv: list[str]) -> str:
    return "qlora-doctor " + " ".join(shlex.quote(a) for a in argv)


# --- parsing and writing ------------------------------------------------------------------------

def parse_lockfile(text: str, where: str) -> Lockfile:
    pins = parse_requirements(text, where)
    urls, header = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("--extra-index-url", "--index-url")):
            urls.append(stripped.split(None, 1)[1] if " " in stripped else stripped.split("=", 1)[-1])
        elif stripped.startswith("#"):
            header.append(stripped[1:].strip())
    return Lockfile(pins, tuple(urls), tuple(header))


def write_lockfile(lock: Lockfile, path: Path, force: bool) -> bool:
    """Write atomically. Returns False when the file already holds the same pins and indexes (kept as is).
    Refuses to replace a file with different pins unless `force`."""
    path = Path(path)
    if path.exists():
        try:
            old = parse_lockfile(path.read_text(encoding="utf-8"), str(path))
        except InputError:
            old = None
        if old is not None and old.pins == lock.pins and old.index_urls == lock.index_urls:
            return False
        if not force:
            raise InputError(f"{path}: exists with different pins; pass --force to replace it, "
                             "or -o another file")
    write_atomic(path, lock.render())
    return True


# --- drift, repair, from-env --------------------------------------------------------------------

@dataclass(frozen=True)
class Drift:
    name: str
    locked: str | None
    installed: str | None

    @property
    def kind(self) -> str:
        if self.installed is None:
            return "missing"
        return "extra" if self.locked is None else "different"

    def describe(self) -> str:
        if self.kind == "missing":
            return f"{self.name}: locked {self.locked}, not installed"
        if self.kind == "extra":
            return f"{self.name}: installed {self.installed}, not in the lockfile"
        return f"{self.name}: locked {self.locked}, installed {self.installed}"


def drift(lock: Lockfile, installed: dict[str, str]) -> list[Drift]:
    """Every difference; `extra` ones are reported but do not count as drift (see `has_drift`)."""
    out = []
    installed = lockable_pins(installed)
    for name, version in sorted(lock.pins.items()):
        have = installed.get(name)
        if have is None or Version(have) != Version(version):
            out.append(Drift(name, version, have))
    for name in sorted(set(installed) - set(lock.pins)):
        out.append(Drift(name, None, installed[name]))
    return out


def has_drift(diffs: list[Drift]) -> bool:
    return any(d.kind != "extra" for d in diffs)


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:
            continue
        if name:
            seen.setdefault(canonical_name(name), dist.version)
    return seen


@dataclass(frozen=True)
class Repair:
    fit: Fit
    changes: tuple[tuple[str, str | None, str], ...]
    """(package, installed version or None, tested version)."""
    problems: tuple[str, ...] = ()
    """Rules the environment would still break after the changes (packages outside the record, e.g. gradio)."""
    source: str = ""
    """What the target set is, when it is not the record's own freeze (a GPU machine without a GPU record)."""

    @property
    def command(self) -> str:
        pins = [f"{name}=={new}" for name, _, new in self.changes]
        urls = torch_index_urls({n: v for n, _, v in self.changes})
        return " ".join(["pip install", *(f"--extra-index-url {u}" for u in urls), *(shlex.quote(p) for p in pins)])


def repair_changes(target: dict[str, str], installed: dict[str, str]) -> tuple[tuple[str, str | None, str], ...]:
    """What must change to turn the installed env into the target pins (a record's lockable freeze):
    installed packages at another version, and watched packages missing. Packages the target has but
    nothing here uses are left out."""
    changes = []
    for name, version in sorted(target.items()):
        have = installed.get(name)
        if have is None and name not in WATCHED and name not in TRAINING_NEEDS:
            continue
        if have is None or Version(have) != Version(version):
            changes.append((name, have, version))
    return tuple(changes)


def _repair_towards(fit: Fit, target: dict[str, str], installed: dict[str, str], machine: Machine,
                    source: str = "") -> Repair:
    changes = repair_changes(target, installed)
    after = {**lockable_pins(installed), **{name: new for name, _, new in changes}}
    # The knowledge base judges the environment the repair leaves, installed packages outside the
    # record included: a record whose versions a rule forbids beside them (huggingface_hub 1.x under an
    # installed gradio 4) loses to one that breaks nothing, even if it changes more.
    problems = tuple(vet_pins(after, machine, "the environment after the repair")) if changes else ()
    return Repair(fit, changes, problems, source)


def choose_repair(records: tuple[Record, ...], machine: Machine, python: str, tables: Tables,
                  installed: dict[str, str]) -> Repair:
    fits = [fit_record(r, machine, python, tables) for r in records]
    good = [f for f in fits if not f.reasons]
    if not good:
        if not machine.nvidia_gpus:
            choose_record(records, machine, python, tables)  # raises, naming the closest
        # A GPU machine with no GPU record: towards what `lock` writes for it, the Python level of a CPU
        # record and the torch build its driver and GPU need.
        plan = gpu_plan_from_cpu_record(records, machine, python, tables)
        return _repair_towards(Fit(plan.record, ()), plan.pins, installed, machine, plan.source)
    repairs = [_repair_towards(fit, lockable_pins(fit.record.locked_freeze), installed, machine) for fit in good]
    return min(repairs, key=lambda r: (bool(r.problems), len(r.changes), _Desc(_newest_key(r.fit.record))))


class _Desc:
    """Reverses the order of a sort key, so that min() prefers the newest on ties."""

    def __init__(self, key: tuple) -> None:
        self.key = key

    def __lt__(self, other: "_Desc") -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key


def parse_keep(values: tuple[str, ...]) -> dict[str, str]:
    keep, errors = {}, []
    for value in values:
        try:
            req = Requirement(value)
            spec = list(req.specifier)
            if len(spec) != 1 or spec[0].operator != "==":
                raise InvalidRequirement("not name==version")
            keep[canonical_name(req.name)] = spec[0].version
        except InvalidRequirement:
            errors.append(f"--keep {value}: expected name==version, e.g. --keep transformers==5.17.0")
    if errors:
        raise InputError(errors)
    return keep


def load_constraints(path: Path) -> tuple[Requirement, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read the constraints file ({err})")
    reqs, errors = [], []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement as err:
            errors.append(f"{path}:{lineno}: not a requirement ({err}); expected e.g. transformers>=5,<6")
    if errors:
        raise InputError(errors)
    return tuple(reqs)


# --- untested: ask pip's resolver, then vet with the doctor -------------------------------------

def resolve_untested(machine: Machine, python: str, keep: dict[str, str], constraint_lines: list[str],
                     tables: Tables, timeout_s: float = 600) -> dict[str, str]:
    """pip's own resolver (`pip install --dry-run --ignore-installed --report -`), not ours."""
    reqs = [f"{n}=={keep[n]}" if n in keep else n for n in TRAINING_NEEDS]
    reqs += [f"{n}=={v}" for n, v in keep.items() if n not in TRAINING_NEEDS]
    with tempfile.TemporaryDirectory(prefix="qlora-lock-") as tmp:
        cfile = Path(tmp) / "constraints.txt"
        cfile.write_text("\n".join(constraint_lines) + "\n")
        argv = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
                "-c", str(cfile)]
        here = ".".join(str(x) for x in sys.version_info[:2])
        if python != here:
            argv += ["--python-version", python, "--only-binary", ":all:"]
        # Resolve against the default index only: the versions are the same on PyTorch's CUDA indexes, and
        # asking those (unreachable behind many firewalls) can stall pip for minutes. The CUDA variant is
        # added to torch's pin afterwards, and the lockfile names its index.
        argv += ["--timeout", "20", "--retries", "1", *reqs]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PIP_PROGRESS_BAR": "off"})
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"pip did not finish resolving {' '.join(reqs)} within {timeout_s:.0f} s; "
                              "pin more packages with --keep, or use a tested combination (`qlora-doctor lock`)")
    if proc.returncode != 0:
        raise CheckFailed(f"pip could not resolve {' '.join(reqs)} under the knowledge base's constraints:\n"
                          + proc.stderr.strip()[-1500:])
    report = json.loads(proc.stdout[proc.stdout.find("{"):])
    pins = {canonical_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report.get("install", [])}
    variant = torch_variant_for(machine, tables)
    if "torch" in pins and "+" not in pins["torch"]:
        default = tables.default_cuda_for_torch(Version(pins["torch"]))
        if default is None or "cu" + default.cuda.replace(".", "") != variant:
            # PyPI's torch drags in the CUDA wheels of its default build; the variant's index brings its own.
            pins = {n: v for n, v in pins.items() if not n.startswith("nvidia-")}
        pins["torch"] = f"{pins['torch']}+{variant}"
    return pins


def vet_pins(pins: dict[str, str], machine: Machine, source: str) -> list[str]:
    """Failing doctor checks for a pin set (empty: it breaks no known rule)."""
    from qlora_doctor.doctor.diagnose import environment_checks
    from qlora_doctor.sources.requirements import environment_from_pins

    env: Environment = environment_from_pins(pins, source)
    return [f"{c.id}: {c.detail} (fix: {c.fix})" for c in environment_checks(machine, env) if c.status == "fail"]


def describe_fit(fit: Fit) -> dict[str, Any]:
    return {"combination": fit.record.name, "platform": fit.record.platform, "record": record_source(fit.record),
            "date": fit.record.date, "notes": list(fit.notes)}


def lockfile_from_env(machine: Machine, python: str, command: str, target: str | None) -> Lockfile:
    """`lock --from-env`: freeze the installed environment, only when `qlora-doctor check` passes on it."""
    from qlora_doctor.doctor.diagnose import diagnose
    from qlora_doctor.doctor.tested import env_platform
    from qlora_doctor.sources.installed import installed_environment

    report = diagnose(machine)
    if report.status == "fail":
        raise CheckFailed(["the current environment fails `qlora-doctor check`; not freezing it:"]
                          + [f"{c.id}: {c.detail}" for c in report.failed])
    pins = lockable_pins(installed_versions())
    platform = env_platform(machine, installed_environment(with_conflicts=False))
    status = "tested" if report.tested.get("status") == "tested" else "untested (check passed; no matrix record)"
    return Lockfile(pins, torch_index_urls(pins), header_lines(
        machine, python, platform, "the current environment, frozen after `qlora-doctor check` passed", status,
        command, target))


def lockfile_untested(machine: Machine, python: str, keep: dict[str, str], constraints: tuple[Requirement, ...],
                      tables: Tables, command: str, target: str | None) -> Lockfile:
    """`lock --untested`: pip's resolution under the knowledge base's constraints, vetted by the doctor."""
    from qlora_doctor.knowledge.loading import load_rules
    from qlora_doctor.matrix.records import platform_id
    from qlora_doctor.pins.constraints import combination_constraints, constraints_for

    rules = load_rules()
    lines, _ = constraints_for(machine, rules)
    lines += combination_constraints(machine, rules, keep)  # keep gradio==4.44.0 -> huggingface-hub<1.0.0
    for _ in range(3):
        pins = resolve_untested(machine, python, keep, [line.requirement for line in lines]
                                + [str(c) for c in constraints], tables)
        # a combination rule the answer still breaks becomes one more constraint: pip backtracks around it
        fired = tuple(p.split(":", 1)[0].removeprefix("rule:") for p in vet_pins(pins, machine, "pip's resolution"))
        more = [line for line in combination_constraints(machine, rules, keep, fired=fired) if line not in lines]
        if not more:
            break
        lines += more
    problems = vet_pins(pins, machine, "pip's resolution")
    if problems:
        raise CheckFailed(["pip's resolution breaks known rules; not writing it:", *problems])
    variant = torch_variant_for(machine, tables)
    gpus = machine.nvidia_gpus
    accel = variant if variant == "cpu" or not gpus else f"{variant}-sm{(gpus[0].compute_capability or '').replace('.', '')}"
    return Lockfile(pins, torch_index_urls(pins) or (TORCH_INDEX.format(variant=variant),),
                    header_lines(machine, python, platform_id(machine.os, machine.arch, python, accel),
                                 "pip's resolver (pip install --dry-run --report) under "
                                 "`qlora-doctor constraints`; vetted by the doctor: no rule fails",
                                 "UNTESTED (no matrix record; breaks no known rule)", command, target))


# --- a GPU machine without a GPU record: Python level from a CPU record, torch build from the tables ----

TORCH_ONLY_LOCAL = re.compile(r"^(nvidia-|cuda-|triton$|pytorch-triton)")
"""Packages a CUDA build of torch brings itself (from its own index): not taken from a CPU record."""


@dataclass(frozen=True)
class GpuPlan:
    """A GPU machine's pins when no GPU record fits it: a CPU record's Python level, the torch build the
    tables choose for the driver and GPU."""
    record: Record
    pins: dict[str, str] = field(hash=False)
    variant: str
    platform: str
    source: str


def gpu_plan_from_cpu_record(records: tuple[Record, ...], machine: Machine, python: str,
                             tables: Tables) -> GpuPlan:
    """The Python-level packages of the newest passing CPU record for this Python whose pins, with the torch
    build chosen for the driver and GPU (choose_torch_build), break no rule."""
    cpu = [r for r in records if r.works and r.expect == "pass" and _is_cpu_record(r, machine, python)]
    if not cpu:
        platforms = {p for r in records if r.works and r.expect == "pass" for p in [_platform(r)] if p}
        if not any(p.os == machine.os and p.arch == machine.arch for p in platforms):
            tested = sorted({f"{p.os} {p.arch}" for p in platforms})
            raise CheckFailed(f"no passing record for {machine.os} {machine.arch} (the tested ones: "
                              f"{', '.join(tested)}); run `qlora-doctor matrix run` on such a machine for one, or "
                              "use `qlora-doctor lock --untested`")
        pythons = sorted({p.python for p in platforms if p.os == machine.os and p.arch == machine.arch},
                         key=lambda v: tuple(int(x) for x in v.split(".")))
        raise CheckFailed(f"no passing CPU record for Python {python} to take the Python-level packages from "
                          f"(tested: Python {', '.join(pythons)}); describe the machine with one of those, run "
                          "`qlora-doctor matrix run` for one, or use `qlora-doctor lock --untested`")
    plan = _first_gpu_plan(cpu, records, machine, python, tables)
    if plan is not None:
        return plan
    import dataclasses

    newest_driver = _first_gpu_plan(cpu, records, dataclasses.replace(machine, driver_version="999.99"), python, tables)
    if newest_driver is not None and machine.driver_version is None:  # nothing says which driver runs there
        raise CheckFailed(f"the machine description names no NVIDIA driver version, and the torch build depends on "
                          f"it: add `driver_version` (the `Driver Version:` of nvidia-smi's header; with a recent "
                          f"driver this machine would get torch {newest_driver.pins['torch']}), or use "
                          "`qlora-doctor lock --untested`")
    if newest_driver is not None:  # the driver is what stands in the way
        raise CheckFailed(f"no torch build the tables know runs on {_machine_words(machine)} with the tested "
                          f"Python-level packages; upgrade the NVIDIA driver (a newer one would get "
                          f"torch {newest_driver.pins['torch']}), or use `qlora-doctor lock --untested`")
    gpus = ", ".join(f"{g.name} (cc {g.compute_capability})" for g in machine.nvidia_gpus)
    raise CheckFailed(f"no tested set of packages has a torch build with kernels for {gpus} that breaks no rule, "
                      "whatever the driver: the GPU is older than the tested torch releases support; use a newer "
                      "GPU, or `qlora-doctor lock --untested --constraints FILE` naming an older torch")


def _first_gpu_plan(cpu: list[Record], records: tuple[Record, ...], machine: Machine, python: str,
                    tables: Tables) -> GpuPlan | None:
    known = sorted({str(Version(v).base_version) for r in records for v in [r.freeze.get("torch")] if v},
                   key=Version, reverse=True)
    for record in sorted(cpu, key=_newest_key, reverse=True):
        own = Version(record.freeze["torch"]).base_version
        choice = choose_torch_build(machine, [own] + [v for v in known if v != own], tables)
        if choice is None:
            continue
        pins = {n: v for n, v in lockable_pins(record.locked_freeze).items() if not TORCH_ONLY_LOCAL.match(n)}
        pins["torch"] = f"{choice.version}+{choice.variant}"
        if vet_pins(pins, machine, "this lock"):
            continue
        gpus = machine.nvidia_gpus
        sm = (gpus[0].compute_capability or "").replace(".", "")
        platform = f"{machine.os}-{machine.arch}-py{python}-{choice.variant}-sm{sm}"
        same_torch = choice.version == own
        source = (f"Python level tested on CPU by matrix record {record_source(record)} ({record.name}, "
                  f"{record.date[:10]}); torch {choice.version}+{choice.variant} chosen for this machine: "
                  f"{choice.why}" + ("" if same_torch else f" (the record tested torch {own} on CPU; "
                                                            f"{own} has no build for this driver and GPU)"))
        return GpuPlan(record, pins, choice.variant, platform, source)
    return None


def lockfile_for_gpu_from_cpu_record(records: tuple[Record, ...], machine: Machine, python: str, tables: Tables,
                                     command: str, output: str | None) -> Lockfile:
    """No GPU record fits: gpu_plan_from_cpu_record's pins on the chosen variant's PyTorch index. The header
    says which part is tested where."""
    plan = gpu_plan_from_cpu_record(records, machine, python, tables)
    status = ("PARTLY TESTED: the Python-level packages by a CPU record, the torch build by the knowledge "
              "base's tables (no GPU record for this platform); its CUDA libraries come from the "
              f"{plan.variant} index at install")
    header = header_lines(machine, python, plan.platform, plan.source, status, command, output)
    return Lockfile(plan.pins, (TORCH_INDEX.format(variant=plan.variant),), header)


def _platform(record: Record) -> PlatformParts | None:
    try:
        return parse_platform(record.platform)
    except ValueError:
        return None


def _is_cpu_record(record: Record, machine: Machine, python: str) -> bool:
    p = _platform(record)
    if p is None:
        return False
    return p.cuda is None and p.os == machine.os and p.arch == machine.arch and p.python == python \
        and "torch" in record.freeze

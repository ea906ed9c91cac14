"""`qlora-doctor matrix run`: build each combination's environment, run check and smoke in it, record.

Per combination: an isolated environment (a venv created with `python -m venv` and filled by pip, or
by uv when asked), cached under a folder keyed by the Python version, the pins and the indexes, so a
second run reuses it; qlora-doctor itself is built once as a wheel and installed into it; then
`qlora-doctor check --json` and `qlora-doctor smoke --json` run inside it, each in a subprocess with a
timeout. The first failing step skips the rest. Install failures ("does not resolve") are results too.

`--in-place` records the environment this interpreter runs in against a combination, without building
anything (the GPU machine: preinstalled packages plus carried wheels, no internet): the installed
versions must equal the pins, then check and smoke run as above.

The installer is uv when it is there (`--installer auto`, the default), else pip. uv does not read pip's
configuration, and on the CI and development machines torch's CPU build comes from a local folder only pip's
config names: the find-links and indexes pip is configured with are passed to uv, with pip's rule of taking the
best match across all of them (uv's `--index-strategy unsafe-best-match`).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from packaging.version import InvalidVersion, Version

from qlora_doctor import __version__
from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.machine import Machine
from qlora_doctor.core.environment import build_from_local_tag
from qlora_doctor.matrix.combos import Combination
from qlora_doctor.core.errors import InputError
from qlora_doctor.core.subprocs import Completed, run_bounded
from qlora_doctor.core.shipped import checkout_root
from qlora_doctor.matrix.records import (Record, StepResult, accelerator_id, platform_id, record_filename,
                                         write_record)

CACHE_ENV = "QLORA_DOCTOR_CACHE"
ENV_MARKER = ".qlora-doctor-env.json"
EXCERPT_CHARS = 2000
Progress = Callable[[str], None]
FREEZE_SCRIPT = ("import json, importlib.metadata as m\n"
                 "seen = {}\n"
                 "for d in m.distributions():\n"
                 "    n = d.metadata['Name']\n"
                 "    if n: seen.setdefault(n, d.version)\n"
                 "print(json.dumps(seen))\n")


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qlora-doctor" / "matrix-envs"


@dataclass(frozen=True)
class RunOptions:
    results_dir: Path
    cache_dir: Path = field(default_factory=default_cache_dir)
    installer: str = "pip"
    """pip (venv + pip) or uv (uv venv + uv pip); `resolve_installer("auto")` picks."""
    repo: Path | None = field(default_factory=checkout_root)
    """The checkout whose wheel each environment gets (None when running from an installed wheel)."""
    install_timeout_s: float = 1800
    check_timeout_s: float = 300
    smoke_timeout_s: float = 600


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True)
class RunSummary:
    records: tuple[Record, ...]
    paths: tuple[Path, ...]
    skipped: tuple[Skipped, ...]

    @property
    def ok(self) -> bool:
        return all(r.verdict == "pass" for r in self.records)


# --- platform -----------------------------------------------------------------------------------

def planned_platform(machine: Machine, combo: Combination) -> str:
    """The platform id the combination would be recorded under on this machine (before building it)."""
    torch_pin = combo.pins.get("torch", "")
    backend, cuda = "cpu", None
    try:
        version = Version(torch_pin)
    except InvalidVersion:
        version = None
    if version is not None and version.local:
        build = build_from_local_tag(version.local)
        if build is not None:
            backend, cuda = build.backend, str(build.cuda) if build.cuda else None
    elif version is not None and machine.gpu_vendor == "nvidia":
        from qlora_doctor.knowledge.loading import load_tables

        row = load_tables().default_cuda_for_torch(version)
        if row is not None and row.cuda != "cpu":
            backend, cuda = "cuda", row.cuda
    gpus = machine.nvidia_gpus
    accel = accelerator_id(machine.gpu_vendor, backend, cuda, gpus[0].compute_capability if gpus else None)
    return platform_id(machine.os, machine.arch, combo.python, accel)


# --- verdict ------------------------------------------------------------------------------------

def verdict_for(combo: dict[str, Any], steps: tuple[StepResult, ...],
                failed_checks: tuple[str, ...]) -> tuple[str, str]:
    """(pass|fail, why): whether the outcome is the one matrix.yaml documents."""
    failed = next((s for s in steps if s.status == "fail"), None)
    if combo.get("expect", "pass") == "pass":
        if failed is None:
            return "pass", "works: install, check and smoke passed"
        return "fail", f"expected to work, but {failed.name} failed: {failed.detail}"
    stage, rule, match = combo.get("fails_at", "check"), combo.get("rule", ""), combo.get("match", "")
    if failed is None:
        return "fail", f"expected to fail at {stage} ({rule}), but everything passed: the documented failure is gone"
    if failed.name != stage:
        return "fail", f"expected to fail at {stage} ({rule}), but it failed at {failed.name}: {failed.detail}"
    if stage == "check" and f"rule:{rule}" not in failed_checks:
        return "fail", (f"check failed, but not by rule {rule} (failed: {', '.join(failed_checks) or 'none'}); "
                        "the rule id may have changed in the knowledge base")
    if match and not re.search(match, failed.detail + "\n" + failed.excerpt):
        return "fail", f"{stage} failed, but its output does not contain /{match}/: {failed.detail}"
    how = f"rule {rule} fired" if stage == "check" else f"{stage} failed ({failed.detail})"
    return "pass", f"fails as documented: {how}"


# --- subprocesses -------------------------------------------------------------------------------

def run_command(argv: list[str], timeout_s: float, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Completed:
    return run_bounded(argv, timeout_s, env=env, cwd=cwd)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The end of the output, preferring pip's ERROR lines when there are any."""
    text = text.strip()
    errors = [line for line in text.splitlines() if line.startswith("ERROR") or "ResolutionImpossible" in line]
    if errors:
        head = "\n".join(errors)[:limit // 2]
        return head + "\n...\n" + text[-(limit - len(head)):]
    return text if len(text) <= limit else "..." + text[-limit:]


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "QLORA_DOCTOR_MACHINE")}
    env.update(PYTHONUNBUFFERED="1", PIP_PROGRESS_BAR="off", **(extra or {}))
    return env


# --- building environments ----------------------------------------------------------------------

def resolve_installer(choice: str) -> str:
    """`auto`: uv when it can be run (on PATH or beside this Python), else pip."""
    if choice != "auto":
        return choice
    from qlora_doctor.sources.resolve import find_uv

    return "uv" if find_uv() else "pip"


PIP_SOURCE_KEYS = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url"}


def pip_sources_as_uv_args(config_list: str) -> list[str]:
    """`pip config list` output -> the same find-links and indexes as uv arguments. Local folders and file://
    indexes that do not exist are left out (pip warns and goes on; uv would stop)."""
    args: list[str] = []
    for line in config_list.splitlines():
        key, sep, raw = line.partition("=")
        name = key.rsplit(".", 1)[-1].strip()
        if not sep or name not in PIP_SOURCE_KEYS:
            continue
        for value in raw.strip().strip("'\"").split():
            local = value[len("file://"):] if value.startswith("file://") else (None if "://" in value else value)
            if local is not None and not Path(local).exists():
                continue
            pair = [PIP_SOURCE_KEYS[name], value]
            if not any(args[i:i + 2] == pair for i in range(0, len(args), 2)):
                args += pair
    if args:
        args += ["--index-strategy", "unsafe-best-match"]
    return args


@functools.lru_cache(maxsize=1)
def _pip_sources_for_uv() -> tuple[str, ...]:
    done = run_command([sys.executable, "-m", "pip", "config", "list"], 60, env=_clean_env())
    return tuple(pip_sources_as_uv_args(done.stdout)) if done.returncode == 0 else ()


def pip_sources_for_uv() -> list[str]:
    """pip's configuration, asked once per run (a `pip config list` subprocess), not once per install step."""
    return list(_pip_sources_for_uv())


def env_key(combo: Combination, installer: str) -> str:
    payload = json.dumps({"python": combo.python, "pins": sorted(combo.pins.items()),
                          "index_urls": list(combo.index_urls), "installer": installer,
                          "tools": "train-extra-besides-the-stack"}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tool_wheel(repo: Path, out_dir: Path) -> Path:
    """The checkout's wheel. setuptools builds in the checkout's own build/ folder, so two `matrix run`s
    started together collided there (a traceback, no record): they take turns under a file lock."""
    import fcntl

    lock_path = repo / "build" / ".qlora-doctor-wheel.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = run_command([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out_dir),
                            str(repo)], timeout_s=600, env=_clean_env())
    wheels = sorted(out_dir.glob("qlora_doctor-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"building the qlora-doctor wheel from {repo} failed:\n{excerpt(done.output)}")
    return wheels[-1]


def train_tools(wheel: Path, combo: Combination) -> list[str]:
    """The tool's [train] extra minus the packages the combination pins (the stack under test, whose
    versions may lie outside the extra's range on purpose, as known-bad rows do): gguf, matplotlib,
    safetensors, sentencepiece... so a record's freeze is what `pip install qlora-doctor[train]` gives."""
    import zipfile

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8").splitlines()
    pinned = {canonical_name(n) for n in combo.pins}
    tools = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or "train" not in str(req.marker) or canonical_name(req.name) in pinned:
            continue
        if canonical_name(req.name) in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
            continue  # the stack comes from the pins (a combination that leaves one out gets pip's choice)
        req.marker = None
        tools.append(str(req))
    return tools


def _uv() -> str:
    from qlora_doctor.sources.resolve import find_uv

    return find_uv() or "uv"


def _python_candidates(version: str) -> Iterator[str]:
    """Interpreters that may be Python `version`, lazily: on PATH, then pyenv's installs (whose shims refuse
    versions that are not selected), then the one uv knows (`uv python find`, which downloads nothing)."""
    yield from (exe for name in (f"python{version}", "python3", "python") if (exe := shutil.which(name)))
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    yield from (str(exe) for exe in sorted((root / "versions").glob(f"{version}.*/bin/python{version}"), reverse=True))
    uv = _uv()
    if shutil.which(uv) or Path(uv).is_file():
        done = run_command([uv, "python", "find", "--no-python-downloads", version], timeout_s=30)
        if done.returncode == 0 and done.stdout.strip():
            yield done.stdout.strip().splitlines()[-1]


def _find_python(version: str) -> str | None:
    for exe in _python_candidates(version):
        done = run_command([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], timeout_s=30)
        if done.returncode == 0 and done.stdout.strip() == version:
            return exe
    return None


def missing_python(version: str) -> str:
    return (f"no Python {version} interpreter on this machine (looked on PATH, in pyenv's versions and with "
            f"`uv python find`): install one (`uv python install {version}`, `pyenv install {version}`, or "
            "actions/setup-python in CI)")


def _reusable_env(combo: Combination, opts: RunOptions) -> bool:
    env_dir = Path(opts.cache_dir) / f"env-{env_key(combo, opts.installer)}"
    return (env_dir / ENV_MARKER).is_file() and (env_dir / "bin" / "python").exists()


def _install(combo: Combination, opts: RunOptions, wheel: Path, progress: Progress) -> tuple[StepResult, Path | None]:
    start = time.perf_counter()
    env_dir = Path(opts.cache_dir) / f"env-{env_key(combo, opts.installer)}"
    python = env_dir / "bin" / "python"
    index_args = [a for url in combo.index_urls for a in ("--extra-index-url", url)]
    reused = (env_dir / ENV_MARKER).is_file() and python.exists()
    if not reused:
        interpreter = _find_python(combo.python)
        if interpreter is None:  # run_matrix skips such combinations first; this guards a race only
            return StepResult("install", "fail", 0.0, missing_python(combo.python)), None
        if env_dir.exists():
            shutil.rmtree(env_dir)  # a half-built env from an interrupted run
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        (env_dir.parent / f"{env_dir.name}.pins.txt").write_text("\n".join(combo.requirement_lines()) + "\n")
        pins_file = env_dir.parent / f"{env_dir.name}.pins.txt"
        if opts.installer == "uv":
            uv = _uv()
            steps = [[uv, "venv", "--python", interpreter, str(env_dir)],
                     [uv, "pip", "install", "--python", str(python), "-r", str(pins_file), str(wheel),
                      *train_tools(wheel, combo), *index_args, *pip_sources_for_uv()]]
        else:
            steps = [[interpreter, "-m", "venv", str(env_dir)],
                     [str(python), "-m", "pip", "install", "--progress-bar", "off", "-r", str(pins_file), str(wheel),
                      *train_tools(wheel, combo), *index_args]]
        progress(f"{combo.name}: building env {env_dir.name} ({opts.installer})")
        for argv in steps:
            done = run_command(argv, opts.install_timeout_s, env=_clean_env())
            if done.returncode != 0:
                what = "timed out" if done.returncode is None else "does not resolve / install"
                return StepResult("install", "fail", round(time.perf_counter() - start, 2),
                                  f"{' '.join(argv[:3])}... {what} (exit {done.returncode})",
                                  excerpt(done.output)), None
    else:
        progress(f"{combo.name}: reusing cached env {env_dir.name}")
        # An env cached before the [train] extra grew (gguf, matplotlib...) gets what it lacks; satisfied
        # requirements are left as they are, so the stack under test does not move.
        tools = train_tools(wheel, combo)
        if tools:
            add = ([str(python), "-m", "pip", "install", "--progress-bar", "off", *tools, *index_args]
                   if opts.installer == "pip" else
                   [_uv(), "pip", "install", "--python", str(python), *tools, *index_args, *pip_sources_for_uv()])
            done = run_command(add, opts.install_timeout_s, env=_clean_env())
            if done.returncode != 0:
                return StepResult("install", "fail", round(time.perf_counter() - start, 2),
                                  "adding the [train] extra's tools to the cached env failed",
                                  excerpt(done.output)), None
    # The tool itself is always reinstalled: its code changes more often than the pins.
    reinstall = ([str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", "--quiet", str(wheel)]
                 if opts.installer == "pip" else
                 [_uv(), "pip", "install", "--python", str(python), "--no-deps", "--reinstall", str(wheel)])
    done = run_command(reinstall, 600, env=_clean_env())
    if done.returncode != 0:
        return StepResult("install", "fail", round(time.perf_counter() - start, 2),
                          "installing qlora-doctor into the env failed", excerpt(done.output)), None
    if not reused:
        (env_dir / ENV_MARKER).write_text(json.dumps(combo.to_json(), indent=2))
    detail = ("reused " if reused else "built ") + str(env_dir)
    return StepResult("install", "pass", round(time.perf_counter() - start, 2), detail), python


def read_freeze(python: str, env: dict[str, str], cwd: Path | None) -> dict[str, str]:
    done = run_command([python, "-c", FREEZE_SCRIPT], 120, env=env, cwd=cwd)
    if done.returncode != 0:
        return {}
    try:
        raw = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {}
    return {canonical_name(k): str(v) for k, v in raw.items() if canonical_name(k) != "qlora-doctor"}


# --- check and smoke inside an environment ------------------------------------------------------

def _check_step(python: str, env: dict[str, str], cwd: Path, timeout_s: float) -> tuple[StepResult, tuple[str, ...], dict]:
    done = run_command([python, "-m", "qlora_doctor.cli", "check", "--json"], timeout_s, env=env, cwd=cwd)
    try:
        report = json.loads(done.stdout[done.stdout.find("{"):]) if "{" in done.stdout else None
    except json.JSONDecodeError:
        report = None
    if done.returncode is None or not isinstance(report, dict):
        how = "hung (killed)" if done.returncode is None else f"exited {done.returncode} without a report"
        return StepResult("check", "fail", done.duration_s, f"check {how}", excerpt(done.output)), (), {}
    failed = tuple(c["id"] for c in report.get("checks", []) if c.get("status") == "fail")
    status = report.get("status", "fail")
    if done.returncode == 0 and not failed:
        warned = [c["id"] for c in report.get("checks", []) if c.get("status") in ("warn", "unknown")]
        return StepResult("check", "pass", done.duration_s,
                          f"check {status}" + (f" (warnings: {', '.join(warned)})" if warned else "")), failed, report
    lines = [f"{c['id']}: {c.get('detail', '')}  fix: {c.get('fix', '')}" for c in report.get("checks", [])
             if c.get("status") == "fail"]
    return (StepResult("check", "fail", done.duration_s, f"check failed: {', '.join(failed)}",
                       excerpt("\n".join(lines))), failed, report)


def _smoke_step(python: str, env: dict[str, str], cwd: Path, timeout_s: float) -> tuple[StepResult, dict]:
    from qlora_doctor.smoke.judge import judge_smoke, parse_smoke_output

    done = run_command([python, "-m", "qlora_doctor.cli", "smoke", "--json"], timeout_s, env=env, cwd=cwd)
    data = parse_smoke_output(done.stdout) or {}

    check = judge_smoke(done, timeout_s)
    failed = next((s for s in data.get("steps", []) if s.get("status") == "fail"), None)
    summary = {"device": data.get("device"), "losses": data.get("losses", []), "facts": data.get("facts", {}),
               "failed_step": failed["name"] if failed else None,
               "steps": {s["name"]: s["status"] for s in data.get("steps", [])}}
    if check.status == "pass":
        return StepResult("smoke", "pass", done.duration_s, check.detail), summary
    detail = f"{failed['name']}: {failed['detail']}" if failed else check.detail.splitlines()[0]
    return StepResult("smoke", "fail", done.duration_s, detail,
                      excerpt(failed.get("error", "") if failed else done.output)), summary


def _finish(combo: Combination, platform: str, machine: Machine, freeze: dict[str, str],
            steps: list[StepResult], failed_checks: tuple[str, ...], smoke: dict, mode: str,
            started: float, closure: tuple[str, ...] = ()) -> Record:
    names = [s.name for s in steps]
    for stage in ("install", "check", "smoke"):
        if stage not in names:
            failed = next(s.name for s in steps if s.status == "fail")
            steps.append(StepResult(stage, "skip", 0.0, f"skipped: {failed} failed"))
    steps_t = tuple(steps)
    combo_json = combo.to_json()
    verdict, why = verdict_for(combo_json, steps_t, failed_checks)
    machine_json = machine.to_json()
    machine_json.pop("notes", None)
    return Record(combination=combo_json, platform=platform, machine=machine_json, freeze=freeze, steps=steps_t,
                  works=all(s.status == "pass" for s in steps_t), verdict=verdict, verdict_detail=why,
                  date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), tool_version=__version__,
                  mode=mode, duration_s=round(time.perf_counter() - started, 2), failed_checks=failed_checks,
                  smoke=smoke, closure=closure)


def run_combination(combo: Combination, machine: Machine, opts: RunOptions, wheel: Path,
                    progress: Progress) -> Record:
    started = time.perf_counter()
    platform = planned_platform(machine, combo)
    steps: list[StepResult] = []
    install, python = _install(combo, opts, wheel, progress)
    steps.append(install)
    freeze: dict[str, str] = {}
    failed_checks: tuple[str, ...] = ()
    smoke: dict = {}
    if python is not None:
        env = _clean_env()
        cwd = python.parent.parent  # not the repo: `-m qlora_doctor` must import the env's copy
        freeze = read_freeze(str(python), env, cwd)
        progress(f"{combo.name}: check")
        check, failed_checks, _ = _check_step(str(python), env, cwd, opts.check_timeout_s)
        steps.append(check)
        if check.status == "pass":
            progress(f"{combo.name}: smoke")
            step, smoke = _smoke_step(str(python), env, cwd, opts.smoke_timeout_s)
            steps.append(step)
    return _finish(combo, platform, machine, freeze, steps, failed_checks, smoke, "venv", started)


def pin_mismatches(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Pins the installed versions do not satisfy; a pin without a local tag accepts any local build."""
    problems = []
    for name, pin in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name} not installed (pin {pin})")
            continue
        want, got = Version(pin), Version(have)
        if (want != got) if want.local else (Version(want.public) != Version(got.public)):
            problems.append(f"{name} {have} (pin {pin})")
    return problems


def run_in_place(combo: Combination, machine: Machine, opts: RunOptions, progress: Progress) -> Record:
    from qlora_doctor.matrix.closure import training_closure
    from qlora_doctor.sources.installed import installed_environment

    started = time.perf_counter()
    env = installed_environment(with_conflicts=False)
    torch = env.torch
    gpus = machine.nvidia_gpus
    accel = accelerator_id(machine.gpu_vendor, torch.backend, str(torch.cuda) if torch.cuda else None,
                           gpus[0].compute_capability if gpus else None)
    platform = platform_id(machine.os, machine.arch, machine.python, accel)
    run_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_env.pop("QLORA_DOCTOR_MACHINE", None)
    freeze = read_freeze(sys.executable, run_env, Path(tempfile.gettempdir()))
    problems = pin_mismatches(combo.pins, freeze)
    if ".".join(machine.python.split(".")[:2]) != combo.python:
        problems.insert(0, f"Python {machine.python} (combination wants {combo.python})")
    steps: list[StepResult] = []
    failed_checks: tuple[str, ...] = ()
    smoke: dict = {}
    if problems:
        steps.append(StepResult("install", "fail", 0.0, "the current environment is not this combination",
                                "; ".join(problems)))
    else:
        steps.append(StepResult("install", "pass", 0.0, f"in place: {sys.executable}"))
        cwd = Path(tempfile.gettempdir())
        progress(f"{combo.name}: check (in place)")
        check, failed_checks, _ = _check_step(sys.executable, run_env, cwd, opts.check_timeout_s)
        steps.append(check)
        if check.status == "pass":
            progress(f"{combo.name}: smoke (in place)")
            step, smoke = _smoke_step(sys.executable, run_env, cwd, opts.smoke_timeout_s)
            steps.append(step)
    closure = tuple(n for n in training_closure(also=tuple(combo.pins)) if n in freeze)
    return _finish(combo, platform, machine, freeze, steps, failed_checks, smoke, "in-place", started, closure)


def _crash_record(combo: Combination, machine: Machine, err: BaseException, started: float) -> Record:
    step = StepResult("install", "fail", 0.0, f"the runner broke: {type(err).__name__}: {err}"[:300])
    return _finish(combo, planned_platform(machine, combo), machine, {}, [step], (), {}, "venv", started)


def already_recorded(combo: Combination, platform: str, results_dir: Path) -> bool:
    """A record of this combination, as matrix.yaml describes it now, exists for this platform (`--resume`)."""
    path = Path(results_dir) / record_filename(combo.name, platform)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("combination") == combo.to_json()


def run_matrix(combos: tuple[Combination, ...], machine: Machine, opts: RunOptions, jobs: int = 1,
               in_place: bool = False, progress: Progress = lambda _: None, resume: bool = False) -> RunSummary:
    runnable: list[Combination] = []
    skipped: list[Skipped] = []
    pythons: dict[str, bool] = {}
    for combo in combos:
        platform = planned_platform(machine, combo)
        if resume and not in_place and already_recorded(combo, platform, opts.results_dir):
            skipped.append(Skipped(combo.name, f"already recorded for {platform} (--resume)"))
            continue
        if in_place or combo.applies_to(platform):
            if not in_place and not _reusable_env(combo, opts) and combo.python not in pythons:
                pythons[combo.python] = _find_python(combo.python) is not None
            if not in_place and not pythons.get(combo.python, True):
                # The host lacks the interpreter: nothing about the combination is learnt, so no record is
                # written (an earlier record of it stays as it was).
                skipped.append(Skipped(combo.name, missing_python(combo.python)))
                continue
            runnable.append(combo)
        else:
            skipped.append(Skipped(combo.name, f"on this machine it would be {platform}, which is not in its "
                                               f"platforms ({', '.join(combo.platforms)})"))
    records: list[Record] = []
    paths: list[Path] = []
    total = len(runnable)
    with tempfile.TemporaryDirectory(prefix="qlora-doctor-wheel-") as tmp:
        wheel = None
        if runnable and not in_place:
            if opts.repo is None:
                raise InputError("matrix run installs this qlora-doctor into each environment and builds it from a "
                                 "checkout: run it from a clone of the repository (or record the current "
                                 "environment with --in-place --only NAME)")
            progress("building the qlora-doctor wheel")
            wheel = build_tool_wheel(opts.repo, Path(tmp))

        def one(combo: Combination) -> Record:
            started = time.perf_counter()
            try:
                if in_place:
                    return run_in_place(combo, machine, opts, progress)
                assert wheel is not None
                return run_combination(combo, machine, opts, wheel, progress)
            except Exception as err:  # one broken combination never stops the others
                return _crash_record(combo, machine, err, started)

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(one, c): c for c in runnable}
            for done, future in enumerate(as_completed(futures), start=1):
                record = future.result()
                paths.append(write_record(record, opts.results_dir))
                records.append(record)
                progress(f"[{done}/{total}] {record.name} on {record.platform}: "
                         f"{'ok' if record.verdict == 'pass' else 'NOT AS DOCUMENTED'} - {record.verdict_detail} "
                         f"({record.duration_s:.0f} s)")
    return RunSummary(tuple(records), tuple(paths), tuple(skipped))

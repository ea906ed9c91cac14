"""What machine are we on: OS, arch, Python, libc, NVIDIA driver, GPUs.

Probe order (first that answers wins, each later one fills what the earlier could not read):
  1. `--machine FILE`, or the file named by QLORA_DOCTOR_MACHINE: a described machine, no probing.
     This is also the test seam.
  2. NVML through `pynvml` (package nvidia-ml-py): driver, CUDA driver API version, each GPU's name,
     memory and compute capability.
  3. `/proc/driver/nvidia/version`: the kernel module's driver version (Linux).
  4. `nvidia-smi --query-gpu=...`: names, memory, compute capability (newer drivers) and driver.
  5. AMD (`/sys/class/kfd`, `rocm-smi`) and Apple silicon are reported as such; otherwise no GPU.

Parsing is kept apart from running: `parse_*` functions are pure and tested on captured output.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qlora_doctor.errors import InputError

MACHINE_ENV = "QLORA_DOCTOR_MACHINE"
# Time bounds: a wedged driver must not wedge `check`. NVML runs in a helper thread that is abandoned
# after NVML_TIMEOUT_S; all nvidia-smi calls together get NVIDIA_SMI_TIMEOUT_S (a healthy one answers
# in well under a second). So the whole probe ends within about 8 s, whatever the driver does.
NVML_TIMEOUT_S = 3.0
NVIDIA_SMI_TIMEOUT_S = 5.0
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
_OSES = ("linux", "windows", "darwin")
_VENDORS = ("nvidia", "amd", "apple", "none")


@dataclass(frozen=True)
class Gpu:
    name: str
    """Product name as the driver reports it, e.g. `NVIDIA A100-SXM4-80GB`."""
    compute_capability: str | None = None
    """`major.minor`, e.g. `8.0`; None when the probe could not read it."""
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    vendor: str = "nvidia"


@dataclass(frozen=True)
class Machine:
    os: str
    """linux, windows or darwin."""
    arch: str
    """x86_64, aarch64 or arm64 (as `platform.machine()` says, lower-cased)."""
    python: str
    """The Python version training would run on, e.g. `3.11.7`."""
    libc: str | None = None
    """e.g. `glibc 2.36`; None off Linux or when unknown."""
    driver_version: str | None = None
    """NVIDIA driver version, e.g. `550.54.15`; None without an NVIDIA driver or when unknown."""
    cuda_driver_version: str | None = None
    """Highest CUDA runtime the driver supports, e.g. `12.4` (NVML/nvidia-smi); None when unknown."""
    gpus: tuple[Gpu, ...] = ()
    gpu_vendor: str = "none"
    """nvidia, amd, apple or none."""
    source: str = "probe"
    """Where the facts came from: `probe`, or the machine file's path."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """What the probes could not read, and why."""

    @property
    def nvidia_gpus(self) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.vendor == "nvidia")

    def to_json(self) -> dict[str, Any]:
        """The `--machine` file format (plus the optional fields the probe filled)."""
        data = asdict(self)
        data["gpus"] = [{k: v for k, v in asdict(g).items() if v is not None} for g in self.gpus]
        data["notes"] = list(self.notes)
        return data


# --- pure parsers -------------------------------------------------------------------------------

def parse_proc_driver_version(text: str) -> str | None:
    """Driver version from `/proc/driver/nvidia/version`, e.g.
    `NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024`."""
    match = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


NVIDIA_SMI_FIELDS = ("name", "memory.total", "memory.free", "compute_cap", "driver_version")
# Drivers before ~510 don't know `compute_cap` and refuse the whole query; ask again without it.
NVIDIA_SMI_FIELDS_OLD = ("name", "memory.total", "memory.free", "driver_version")


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = NVIDIA_SMI_FIELDS) -> tuple[list[Gpu], str | None]:
    """GPUs and driver version from `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits`.

    A field the driver cannot fill reads `[N/A]` or `[Field Not Supported]` and becomes None.
    Raises ValueError on output that is not this CSV (garbage must not become a GPU)."""
    gpus: list[Gpu] = []
    driver: str | None = None
    for line in text.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(fields):
            raise ValueError(f"unexpected nvidia-smi line: {line[:120]!r}")
        row = dict(zip(fields, parts))
        drv = row.get("driver_version", "")
        if not row["name"] or not re.fullmatch(r"\d+(\.\d+){1,2}", drv):
            raise ValueError(f"unexpected nvidia-smi line: {line[:120]!r}")
        cc = row.get("compute_cap", "")
        gpus.append(Gpu(name=row["name"], compute_capability=cc if _is_cc(cc) else None,
                        memory_total_mib=_int_or_none(row["memory.total"]),
                        memory_free_mib=_int_or_none(row["memory.free"])))
        driver = drv
    return gpus, driver


def parse_nvidia_smi_header(text: str) -> tuple[str | None, str | None]:
    """Driver and CUDA version from plain `nvidia-smi` output:
    `| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |`."""
    driver = re.search(r"Driver Version:\s*(\d+\.\d+(?:\.\d+)?)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+\.\d+)", text)
    return (driver.group(1) if driver else None, cuda.group(1) if cuda else None)


def _is_cc(text: str) -> bool:
    return bool(re.fullmatch(r"\d+\.\d+", text))


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except (ValueError, OverflowError):  # `inf`, `1e400`: garbage, not memory
        return None


# --- machine files ------------------------------------------------------------------------------

def machine_from_dict(data: Any, where: str) -> Machine:
    """Validate a machine description (the `--machine` JSON format); every problem at once."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object like "
                         '{"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": null, "gpus": []}')
    known = {"os", "arch", "python", "libc", "driver_version", "cuda_driver_version", "gpus",
             "gpu_vendor", "source", "notes"}
    for key in data:
        if key not in known:
            errors.append(f"{where}: unknown key {key!r} (expected one of {', '.join(sorted(known))})")

    def text(key: str, required: bool, pattern: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
        value = data.get(key)
        if value is None or value == "":
            if required:
                errors.append(f"{where}: {key}: missing (e.g. {_EXAMPLES[key]})")
            return None
        if not isinstance(value, str):
            errors.append(f"{where}: {key}: expected a string like {_EXAMPLES[key]}, got {json.dumps(value)[:60]}")
            return None
        if choices and value.lower() not in choices:
            errors.append(f"{where}: {key}: {value!r} is not one of {', '.join(choices)}")
            return None
        if pattern and not re.fullmatch(pattern, value):
            errors.append(f"{where}: {key}: {value[:60]!r} is not a version like {_EXAMPLES[key]}")
            return None
        return value.lower() if choices else value

    os_name = text("os", True, choices=_OSES)
    arch = text("arch", True)
    python = text("python", True, pattern=r"\d+\.\d+(\.\d+)?")
    libc = text("libc", False)
    driver = text("driver_version", False, pattern=r"\d+\.\d+(\.\d+)?")
    cuda_driver = text("cuda_driver_version", False, pattern=r"\d+\.\d+")
    gpus: list[Gpu] = []
    raw_gpus = data.get("gpus", [])
    if not isinstance(raw_gpus, list):
        errors.append(f"{where}: gpus: expected a list of GPUs (or [] for none)")
        raw_gpus = []
    for i, raw in enumerate(raw_gpus):
        key = f"gpus[{i}]"
        if not isinstance(raw, dict):
            errors.append(f"{where}: {key}: expected an object like "
                          '{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_total_mib": 81920}')
            continue
        gpu_keys = ("name", "compute_capability", "memory_total_mib", "memory_free_mib", "vendor")
        for k in sorted(set(raw) - set(gpu_keys)):
            errors.append(f"{where}: {key}: unknown key {k!r} (expected one of {', '.join(gpu_keys)})")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            errors.append(f"{where}: {key}.name: missing (e.g. \"NVIDIA A100-SXM4-80GB\")")
            name = "unknown GPU"
        cc = raw.get("compute_capability")
        if cc is not None and (not isinstance(cc, str) or not _is_cc(cc)):
            errors.append(f"{where}: {key}.compute_capability: expected a string like \"8.0\", got {json.dumps(cc)[:40]}")
            cc = None
        mems: dict[str, int | None] = {}
        for mem_key in ("memory_total_mib", "memory_free_mib"):
            value = raw.get(mem_key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31):
                errors.append(f"{where}: {key}.{mem_key}: expected a positive whole number of MiB, "
                              f"got {json.dumps(value)[:40]}")
                value = None
            mems[mem_key] = value
        vendor = raw.get("vendor", "nvidia")
        if vendor not in _VENDORS[:3]:
            errors.append(f"{where}: {key}.vendor: {vendor!r} is not one of nvidia, amd, apple")
            vendor = "nvidia"
        gpus.append(Gpu(name=name, compute_capability=cc, vendor=vendor, **mems))
    vendor = data.get("gpu_vendor")
    if vendor is None:
        vendor = gpus[0].vendor if gpus else ("apple" if os_name == "darwin" and arch == "arm64" else "none")
    elif vendor not in _VENDORS:
        errors.append(f"{where}: gpu_vendor: {vendor!r} is not one of {', '.join(_VENDORS)}")
        vendor = "none"
    if errors:
        raise InputError(errors)
    return Machine(os=os_name or "linux", arch=(arch or "x86_64").lower(), python=python or "3.11",
                   libc=libc, driver_version=driver, cuda_driver_version=cuda_driver, gpus=tuple(gpus),
                   gpu_vendor=vendor, source=where)


_EXAMPLES = {"os": '"linux"', "arch": '"x86_64"', "python": '"3.11.7"', "libc": '"glibc 2.36"',
             "driver_version": '"550.54.15"', "cuda_driver_version": '"12.4"'}


def load_machine_file(path: Path | str) -> Machine:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such machine file (write one with `qlora-doctor check --save-machine {path}`)")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the machine file: {err}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); "
                         "see `qlora-doctor check --save-machine FILE` for the format")
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a machine file; "
                         "see `qlora-doctor check --save-machine FILE` for the format") from None
    return machine_from_dict(data, str(path))


def save_machine_file(machine: Machine, path: Path | str) -> None:
    from qlora_doctor.fileio import write_atomic

    data = machine.to_json()
    data.pop("source", None)
    data.pop("notes", None)
    write_atomic(Path(path), json.dumps(data, indent=2) + "\n")


# --- probes -------------------------------------------------------------------------------------

def probe_machine() -> Machine:
    """This machine, in the documented order (module docstring). Never raises for a missing GPU."""
    override = os.environ.get(MACHINE_ENV)
    if override:
        return load_machine_file(override)
    notes: list[str] = []
    base = dict(os=_os_name(), arch=platform.machine().lower() or "unknown",
                python=platform.python_version(), libc=_libc())
    gpus, driver, cuda_driver = _probe_nvml_bounded(notes)
    if driver is None:
        driver = _probe_proc_driver(notes)
    if not gpus or any(g.compute_capability is None for g in gpus):
        smi_gpus, smi_driver, smi_cuda = _probe_nvidia_smi(notes, want_gpus=not gpus or any(
            g.compute_capability is None for g in gpus))
        if not gpus:
            gpus = smi_gpus
        elif smi_gpus and len(smi_gpus) == len(gpus):
            gpus = [g if g.compute_capability else replace(g, compute_capability=s.compute_capability)
                    for g, s in zip(gpus, smi_gpus)]
        driver = driver or smi_driver
        cuda_driver = cuda_driver or smi_cuda
    if gpus and any(g.compute_capability is None for g in gpus):
        gpus = [g if g.compute_capability else replace(g, compute_capability=_cc_from_name(g.name))
                for g in gpus]
    vendor = "nvidia" if gpus or driver else "none"
    if vendor == "none":
        if base["os"] == "darwin" and base["arch"] == "arm64":
            vendor = "apple"
            gpus = [Gpu(name="Apple silicon GPU (MPS)", vendor="apple")]
        elif Path("/sys/class/kfd").exists() or shutil.which("rocm-smi"):
            vendor = "amd"
            gpus = [Gpu(name="AMD GPU (ROCm)", vendor="amd")]
    return Machine(**base, driver_version=driver, cuda_driver_version=cuda_driver, gpus=tuple(gpus),
                   gpu_vendor=vendor, notes=tuple(notes))


def _os_name() -> str:
    return {"win32": "windows", "cygwin": "windows", "darwin": "darwin"}.get(sys.platform, "linux")


def _libc() -> str | None:
    name, version = platform.libc_ver()
    return f"{name} {version}" if name else None


def _probe_nvml_bounded(notes: list[str]) -> tuple[list[Gpu], str | None, str | None]:
    """`_probe_nvml` in a daemon thread: NVML is a C library, and a hung driver call cannot be
    interrupted, only left behind."""
    import threading

    result: list[tuple[list[Gpu], str | None, str | None]] = []
    thread_notes: list[str] = []
    thread = threading.Thread(target=lambda: result.append(_probe_nvml(thread_notes)), name="qlora-doctor-nvml",
                              daemon=True)
    thread.start()
    thread.join(NVML_TIMEOUT_S)
    if thread.is_alive() or not result:
        notes.append(f"NVML: no answer within {NVML_TIMEOUT_S:g} s (a hung driver?); asked nvidia-smi instead")
        return [], None, None
    notes.extend(thread_notes)
    return result[0]


def _probe_nvml(notes: list[str]) -> tuple[list[Gpu], str | None, str | None]:
    try:
        import pynvml  # nvidia-ml-py
    except Exception as err:  # a broken install is reported, not crashed on
        notes.append(f"NVML: pynvml not importable ({type(err).__name__}: {err})")
        return [], None, None
    try:
        pynvml.nvmlInit()
    except Exception as err:
        notes.append(f"NVML: no NVIDIA driver library ({_short(err)})")
        return [], None, None
    gpus: list[Gpu] = []
    driver = cuda = None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception as err:
            notes.append(f"NVML: CUDA driver version unreadable ({_short(err)})")
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = _text(pynvml.nvmlDeviceGetName(handle))
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                    cc: str | None = f"{major}.{minor}"
                except Exception:
                    cc = None
                gpus.append(Gpu(name=name, compute_capability=cc, memory_total_mib=mem.total // 2**20,
                                memory_free_mib=mem.free // 2**20))
            except Exception as err:  # a GPU that vanished between probes: keep the others
                notes.append(f"NVML: GPU {i} unreadable ({_short(err)})")
    except Exception as err:
        notes.append(f"NVML: query failed ({_short(err)})")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus, driver, cuda


def _probe_proc_driver(notes: list[str]) -> str | None:
    try:
        text = PROC_DRIVER_VERSION.read_text(errors="replace")
    except OSError:
        return None
    driver = parse_proc_driver_version(text)
    if driver is None:
        notes.append(f"{PROC_DRIVER_VERSION}: no driver version in it")
    return driver


def _probe_nvidia_smi(notes: list[str], want_gpus: bool) -> tuple[list[Gpu], str | None, str | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return [], None, None
    gpus: list[Gpu] = []
    driver = cuda = None
    deadline = time.monotonic() + NVIDIA_SMI_TIMEOUT_S
    if want_gpus:
        for fields in (NVIDIA_SMI_FIELDS, NVIDIA_SMI_FIELDS_OLD):
            out = _run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"], notes, deadline)
            if out is None:
                continue
            try:
                gpus, driver = parse_nvidia_smi_csv(out, fields)
                break
            except ValueError as err:
                notes.append(f"nvidia-smi: {err}")
                break
    header = _run([exe], notes, deadline)
    if header is not None:
        header_driver, cuda = parse_nvidia_smi_header(header)
        driver = driver or header_driver
    return gpus, driver, cuda


def _run(argv: list[str], notes: list[str], deadline: float) -> str | None:
    """stdout of `argv`, or None (with a note) when it fails or the time until `deadline` runs out."""
    name = Path(argv[0]).name
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        notes.append(f"{name}: not asked for {' '.join(argv[1:2]) or 'its header'}, "
                     f"its {NVIDIA_SMI_TIMEOUT_S:g} s were used up")
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=remaining, errors="replace")
    except subprocess.TimeoutExpired:
        notes.append(f"{name}: no answer within {NVIDIA_SMI_TIMEOUT_S:g} s")
        return None
    except OSError as err:
        notes.append(f"{Path(argv[0]).name}: {err}")
        return None
    if proc.returncode != 0:
        notes.append(f"{Path(argv[0]).name} exited {proc.returncode}: {proc.stderr.strip()[:200]}")
        return None
    return proc.stdout


def _cc_from_name(name: str) -> str | None:
    from qlora_doctor.doctor.knowledge import load_tables

    return load_tables().compute_capability_for(name)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]

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
from dataclasses import replace
from pathlib import Path
from typing import Any
from packaging.version import Version

from qlora_doctor.core.errors import InputError
from qlora_doctor.core.machine import (Gpu, Machine, _is_cc, assumed_note, load_machine_file,  # noqa: F401
                                       machine_from_dict, machine_from_text, read_machine_text, save_machine_file)

MACHINE_ENV = "QLORA_DOCTOR_MACHINE"
# Time bounds: a wedged driver must not wedge `check`. NVML runs in a helper thread that is abandoned
# after NVML_TIMEOUT_S; all nvidia-smi calls together get NVIDIA_SMI_TIMEOUT_S (a healthy one answers
# in well under a second). So the whole probe ends within about 8 s, whatever the driver does.
NVML_TIMEOUT_S = 3.0
NVIDIA_SMI_TIMEOUT_S = 5.0
PROC_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


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


def _int_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except (ValueError, OverflowError):  # `inf`, `1e400`: garbage, not memory
        return None


# --- machine files ------------------------------------------------------------------------------

# --- probes -------------------------------------------------------------------------------------

def probe_machine() -> Machine:
    """This machine, in the documented order (module docstring). Never raises for a missing GPU."""
    override = os.environ.get(MACHINE_ENV)
    if override:
        return load_described_machine(override)
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
                   gpu_vendor=vendor, host_memory_mib=_host_memory_mib(), notes=tuple(notes))


def _host_memory_mib(meminfo: str = "/proc/meminfo") -> int | None:
    """MemTotal in MiB (Linux); None elsewhere or when unreadable."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


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


def parse_nvidia_smi_table(text: str) -> dict[str, Any] | None:
    """A machine description from plain `nvidia-smi` output (what people paste from Colab or a cloud box): the
    header's driver and CUDA versions, each GPU's name and memory total, read by envreport.nvidia_smi_facts (the
    table of any driver, Windows' TCC/WDDM column, a table cut mid-way or only its header, `-q`, `-L` with MIG
    slices, `--query-gpu` CSV). None when it is not that."""
    from qlora_doctor.sources.envreport import host_memory_mib, nvidia_smi_facts

    facts = nvidia_smi_facts(text) if "NVIDIA-SMI" in text else None
    memory = host_memory_mib(text) if facts is not None else None  # `free -h` or /proc/meminfo pasted beside it
    return {**facts, "host_memory_mib": memory} if memory else facts


def load_described_machine(path: Path | str) -> Machine:
    """A `--machine` file (JSON, YAML, or plain `nvidia-smi` output), with what it leaves out that the tables
    know filled in, each with a note: a GPU's compute capability and memory from its name (\"NVIDIA L4\"),
    and a lower bound for the driver from the CUDA version nvidia-smi prints."""
    given = str(path)
    if given.lstrip().startswith("{"):  # `--machine '{"gpus": ["Tesla T4"], "driver_version": "550.54.15"}'`
        try:
            data = json.loads(given)
        except json.JSONDecodeError as err:
            raise InputError(f"--machine: the inline description is not valid JSON ({err.msg} at column "
                             f"{err.colno}); or give a file, or a preset ({', '.join(preset_names())})") from None
        return fill_from_tables(machine_from_dict(_instance_described(data, "--machine"), "--machine"))
    path = Path(path)
    if not path.exists() and (preset := find_preset(given)) is not None:
        machine = load_machine_file(preset)
        note = f"preset {preset.stem}: a typical {_machine_words(machine)} (qlora-doctor's description)"
        return fill_from_tables(replace(machine, source=f"preset {preset.stem}", notes=machine.notes + (note,)))
    if not path.exists():
        raise InputError(f"{path}: no such machine file; give a file (`qlora-doctor check --save-machine FILE` writes "
                         f"this machine's), inline JSON, or a preset: {', '.join(preset_names())}")
    from qlora_doctor.sources.envreport import machine_facts

    text = read_machine_text(path)  # once: JSON, YAML, nvidia-smi output or an environment report
    smi = parse_nvidia_smi_table(text) if "NVIDIA-SMI" in text[:4000] else None
    keys = _yaml_mapping(text) if smi is None and path.suffix.lower() in (".yaml", ".yml") else None
    parsed = _json_value(text) if smi is None and keys is None else _NOT_JSON
    structured = text.lstrip().startswith("{") or parsed is not _NOT_JSON or keys is not None
    report = machine_facts(text) if smi is None and not structured else None
    if smi is not None:
        machine = machine_from_dict(smi, str(path))
        machine = replace(machine, notes=machine.notes + ("read as the output of `nvidia-smi`",))
    elif report is not None:
        machine = machine_from_dict(report, str(path))
        words = any(str(n).startswith("read from words") for n in report.get("notes", []))
        machine = replace(machine, notes=machine.notes + (
            "read as a description in words: check the facts above" if words else
            "read as an environment report (torch's collect_env or `transformers env`)",))
    elif keys is not None or parsed is not _NOT_JSON:
        data = keys if keys is not None else parsed
        machine = machine_from_dict(_instance_described(data, str(path)), str(path))
    else:  # JSON that does not parse: machine_from_text says where
        machine = machine_from_text(text, path)
    return fill_from_tables(machine)


_INSTANCE_KEYS = ("instance_type", "current_instance_type", "ec2_instance_type", "instance", "machine_type", "vm_size")
"""Keys a hand-written description names its cloud instance type by (AWS/SageMaker, GCP, Azure)."""


def _instance_described(data: Any, where: str) -> Any:
    """A description that names a cloud instance type for its GPUs (`instance_type: ml.g5.2xlarge`,
    `machine_type: a2-highgpu-1g`) with those GPUs, from the provider's table (knowledge/data/cloud_instances.toml),
    and a note; GPUs named beside it are kept. An instance type the table lacks is refused, naming the key and what
    to write instead. Anything else comes back as it was."""
    if not isinstance(data, dict):
        return data
    plain = {re.sub(r"[\s-]+", "_", k.strip().lower()): k for k in data if isinstance(k, str)}
    key = next((plain[k] for k in _INSTANCE_KEYS if k in plain), None)
    if key is None:
        return data
    from qlora_doctor.knowledge.loading import load_cloud_instances

    given = data[key]
    rest = {k: v for k, v in data.items() if k != key}
    if any(k in plain for k in ("gpus", "gpu", "gpu_name", "gpu_names")):
        return rest
    name = str(given).strip().lower().removeprefix("ml.")
    table = load_cloud_instances()
    if name not in table:
        raise InputError(f"{where}: {key}: {given!r} is not a GPU instance type qlora-doctor's table knows; name its "
                         "GPUs instead (e.g. gpus: [\"NVIDIA A10G\"]), or the instance type as its provider spells it "
                         "(g5.2xlarge, a2-highgpu-1g, Standard_NC24ads_A100_v4)")
    gpu, count, source = table[name]
    notes = [*(rest.pop("notes", None) or []), f"read {key} {given}: {count} x {gpu} ({source})"]
    return {**rest, "gpus": [gpu] * count, "notes": notes}


_NOT_JSON = object()


def _json_value(text: str) -> Any:
    """What a machine file's JSON holds (an object; a list, which machine_from_dict refuses as no description), or
    _NOT_JSON: a text that does not start as JSON, or starts with `[` and is a log (`[2025-01-01 12:00:00] [info]
    ...`, read as a paste), or starts with `{` and does not parse (machine_from_text says where)."""
    if not text.lstrip().startswith(("{", "[")):
        return _NOT_JSON
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _NOT_JSON


def _yaml_mapping(text: str) -> dict | None:
    """A .yaml file's mapping (a machine description in keys); None for a paste saved under that name."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


PRESETS = Path(__file__).resolve().parent.parent / "knowledge" / "data" / "machines"
"""Descriptions of the machines people have (`--machine t4-550`), shipped in the wheel."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def find_preset(name: str) -> Path | None:
    """A preset by its name (`t4-550`, `t4-550.json`) or by its GPU alone (`t4`, `A100`, `rtx-4090`, `RTX 4090`)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower().removesuffix(".json"))
    if not key or "/" in name:
        return None
    for stem in preset_names():
        if key in (re.sub(r"[^a-z0-9]", "", stem), re.sub(r"[^a-z0-9]", "", stem.split("-")[0])):
            return PRESETS / f"{stem}.json"
    return None


def _machine_words(machine: Machine) -> str:
    gpus = machine.nvidia_gpus
    if not gpus:
        return "machine without a GPU"
    return f"{gpus[0].name} with driver {machine.driver_version}"


def fill_from_tables(machine: Machine) -> Machine:
    from qlora_doctor.knowledge.loading import load_tables

    tables = load_tables()
    gpus, notes = [], list(machine.notes)
    for gpu in machine.gpus:
        model = tables.gpu_model_for(gpu.name) if gpu.vendor == "nvidia" else None
        if model is not None and not gpu.compute_capability:
            note = f"{gpu.name}: compute capability {model.compute_capability} from the GPU table (the file gives none)"
            if note not in notes:
                notes.append(note)
            gpu = replace(gpu, compute_capability=model.compute_capability)
        if gpu.vendor == "nvidia" and gpu.memory_total_mib is None:
            gpu, note = _memory_from_name(gpu, model, tables)
            if note not in notes:
                notes.append(note)
        gpus.append(gpu)
    arch = machine.arch
    assumed_arch = next((n for n in notes if n.startswith(assumed_note("arch", ""))), None)
    hosts = {m.host_arch: (gpu.name, m) for gpu in machine.nvidia_gpus
             for m in [tables.gpu_model_for(gpu.name)] if m is not None and m.host_arch}
    if assumed_arch and len(hosts) == 1:  # a GPU that only comes on one CPU architecture (Grace, Jetson)
        arch, (name, model) = next(iter(hosts.items()))
        notes[notes.index(assumed_arch)] = (f"arch not given: {arch}, the only host {name} comes with "
                                            f"({model.sources[-1]})")
    driver = machine.driver_version
    if driver is None and machine.cuda_driver_version and machine.nvidia_gpus:
        row = tables.driver_for_cuda(Version(machine.cuda_driver_version))
        if row is not None:
            driver = str(row.toolkit_driver)
            notes.append(f"driver_version not given: judged as {driver}, the oldest driver that reports CUDA "
                         f"{machine.cuda_driver_version}; give the real one (nvidia-smi's \"Driver Version\")")
    if (gpus == list(machine.gpus) and driver == machine.driver_version and notes == list(machine.notes)
            and arch == machine.arch):
        return machine
    return replace(machine, gpus=tuple(gpus), driver_version=driver, notes=tuple(notes), arch=arch)


USABLE_SHARE = 15 / 16
"""Of the memory a card is sold with, what nvidia-smi reports as its total on the cards that lose most (a
16 GB T4 shows 15,360 MiB, a 24 GB L4 23,034 MiB: ECC and the driver keep the rest); a guessed size errs low."""


def _memory_from_name(gpu: Gpu, model: Any, tables: Any) -> tuple[Gpu, str]:
    sold: tuple[int, ...] = model.memory_gib if model else ()
    stated = re.search(r"(\d{1,3})\s*GB\b", gpu.name, flags=re.I)
    stated_gb = int(stated.group(1)) if stated else None
    seen = tables.memory_for(gpu.name, stated_gb)
    if seen is not None and stated_gb is None and len(sold) > 1 and len(seen.match) <= len(model.match):
        seen = None  # a product sold in several sizes (V100: 16 or 32 GB), its name stating none
    if seen is not None:
        return (replace(gpu, memory_total_mib=seen.memory_mib),
                f"{gpu.name}: memory taken as {seen.memory_mib} MiB, what nvidia-smi shows for {seen.seen} "
                f"({seen.sources[0]}); give memory_total_mib for this machine's own")
    gb = stated_gb or (sold[0] if len(sold) == 1 else None)
    if gb is None:
        sizes = " or ".join(str(x) for x in sold)
        return gpu, (f"{gpu.name}: memory unknown" + (f" (sold with {sizes} GB)" if sold else "") +
                     ": give memory_total_mib (nvidia-smi's total) to plan memory")
    mib = int(gb * 1024 * USABLE_SHARE)
    return (replace(gpu, memory_total_mib=mib),
            f"{gpu.name}: memory taken as {mib} MiB ({gb} GB as sold, less the 1/16 that ECC and the driver keep "
            "on many cards); give memory_total_mib (nvidia-smi's total) for an exact plan")


def _cc_from_name(name: str) -> str | None:
    from qlora_doctor.knowledge.loading import load_tables

    return load_tables().compute_capability_for(name)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]

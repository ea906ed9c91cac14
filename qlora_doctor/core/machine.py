"""The machine judged: OS, arch, Python, libc, NVIDIA driver, GPUs, as plain values, and the `--machine`
file format that describes one (validated, every problem at once). Probing a real machine is
qlora_doctor/sources/machine.py."""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import InputError


_OSES = ("linux", "windows", "darwin")


_VENDORS = ("nvidia", "amd", "apple", "none")


UNREAD = "_unread"
"""Key a parser of pasted text (sources/envreport.py) sets, to a sentence saying what the text was read as and
what it lacks, when it holds no GPU facts at all: `machine_from_dict` refuses it, naming the file."""


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
    host_memory_mib: int | None = None
    """The host's total memory (/proc/meminfo MemTotal); None when unknown. Decides `offload_checkpoints: auto`
    (memory/plan.py resolve_offload)."""
    source: str = "probe"
    """Where the facts came from: `probe`, or the machine file's path."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """What the probes could not read, and why."""

    @property
    def driver(self) -> "Version | None":
        """The driver version to compare with minimums. A branch alone (`535`, as people say it) is judged as
        that branch's newest release: every minimum the tables hold inside a branch is one of its early
        releases."""
        from packaging.version import Version

        if self.driver_version is None:
            return None
        return Version(self.driver_version + (".999" if self.driver_version.isdigit() else ""))

    @property
    def nvidia_gpus(self) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.vendor == "nvidia")

    def to_json(self) -> dict[str, Any]:
        """The `--machine` file format (plus the optional fields the probe filled)."""
        data = asdict(self)
        data["gpus"] = [{k: v for k, v in asdict(g).items() if v is not None} for g in self.gpus]
        data["notes"] = list(self.notes)
        return data


def _is_cc(text: str) -> bool:
    return bool(re.fullmatch(r"\d+\.\d+", text))


def assumed_note(key: str, value: str) -> str:
    """The note a description without `key` gets when `value` is assumed for it."""
    return f"{key} not given: assumed {value}"


def machine_from_dict(data: Any, where: str) -> Machine:
    """Validate a machine description (the `--machine` JSON format); every problem at once."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object like "
                         '{"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": null, "gpus": []}')
    if data.get(UNREAD):  # an environment report or nvidia-smi paste that was read but holds no GPU facts
        raise InputError(f"{where}: {data[UNREAD]}; expected {EXPECTED_FORMATS}, with its GPU lines")
    data = _task_resources(data, where)
    data, assumed = _read_aliases(data, where, errors)
    known = {"os", "arch", "python", "libc", "driver_version", "cuda_driver_version", "gpus",
             "gpu_vendor", "host_memory_mib", "source", "notes"}
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

    # A description of a common GPU box often names only the GPU and the driver: the rest defaults to what
    # nearly every such machine is (Linux on x86_64) and this interpreter's Python, each said in a note.
    for key, default in (("os", "linux"), ("arch", "x86_64"), ("python", platform.python_version())):
        if data.get(key) in (None, ""):
            data = {**data, key: default}
            assumed.append(assumed_note(key, default) + (" (this interpreter's)" if key == "python" else ""))
    os_name = text("os", True, choices=_OSES)
    arch = text("arch", True)
    python = text("python", True, pattern=r"\d+\.\d+(\.\d+)?")
    libc = text("libc", False)
    driver = text("driver_version", False, pattern=r"\d+(\.\d+){0,2}")
    if driver is not None and driver.isdigit():
        assumed.append(f"driver_version {driver} names a driver branch only: judged as its newest release; "
                       "give the full version (nvidia-smi's \"Driver Version\") for an exact answer")
    cuda_driver = text("cuda_driver_version", False, pattern=r"\d+\.\d+")
    gpus: list[Gpu] = []
    raw_gpus = data.get("gpus", [])
    if not isinstance(raw_gpus, list):
        errors.append(f"{where}: gpus: expected a list of GPUs (or [] for none)")
        raw_gpus = []
    for i, raw in enumerate(raw_gpus):
        key = f"gpus[{i}]"
        if isinstance(raw, str) and raw.strip():
            raw = {"name": raw.strip()}  # "gpus": ["Tesla T4"]: a name alone; the tables know the rest
        if not isinstance(raw, dict):
            errors.append(f"{where}: {key}: expected a GPU name like \"Tesla T4\" or an object like "
                          '{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_total_mib": 81920}')
            continue
        raw = _gpu_aliases(raw)
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
    host_memory = data.get("host_memory_mib")
    if host_memory is not None and (isinstance(host_memory, bool) or not isinstance(host_memory, int)
                                    or not 0 < host_memory < 2**40):
        errors.append(f"{where}: host_memory_mib: expected a positive whole number of MiB (e.g. 131072 for 128 GiB), "
                      f"got {json.dumps(host_memory)[:40]}")
        host_memory = None
    if errors:
        raise InputError(errors)
    given_notes = data.get("notes")
    if isinstance(given_notes, list):  # what a parser of pasted text said of its reading, kept with the machine
        assumed = [n for n in given_notes if isinstance(n, str)] + assumed
    return Machine(os=os_name or "linux", arch=(arch or "x86_64").lower(), python=python or "3.11",
                   libc=libc, driver_version=driver, cuda_driver_version=cuda_driver, gpus=tuple(gpus),
                   gpu_vendor=vendor, host_memory_mib=host_memory, source=where, notes=tuple(assumed))


_ALIASES = {"driver": "driver_version", "nvidia_driver": "driver_version", "nvidia_driver_version": "driver_version",
            "cuda": "cuda_driver_version", "cuda_version": "cuda_driver_version", "python_version": "python",
            "gpu": "gpus", "gpu_name": "gpus", "gpu_names": "gpus", "platform": "os", "system": "os",
            "machine": "arch"}
"""Names people give these facts in hand-written descriptions, read as the documented key (with a note)."""

_COUNT_KEYS = ("gpu_count", "num_gpus", "n_gpus", "count")  # `count: 2` beside `gpu: "RTX 4090"` (a guessed key)
_MEMORY_GB_KEYS = ("gpu_memory_gb", "vram_gb", "memory_gb", "vram")


def _read_aliases(data: dict, where: str, errors: list[str]) -> tuple[dict, list[str]]:
    """The description with aliases renamed, numbers given as versions turned into text, a GPU count and a
    memory size spread over the GPUs; a note for each reading."""
    notes: list[str] = []
    out = {}
    for key, value in data.items():  # `Driver Version`, `GPU`, `cuda-version`: the documented spelling
        plain = re.sub(r"[\s-]+", "_", key.strip().lower()) if isinstance(key, str) else key
        out[plain if plain not in out else key] = value
    os_given = out.get("os")
    if isinstance(os_given, str) and os_given.strip().lower() not in _OSES:
        named = os_from_words(os_given)
        if named:
            out["os"] = named
            notes.append(f"read os {os_given!r} as {named}")
    for alias in _HOST_MEMORY_GB_KEYS:
        if alias in out and "host_memory_mib" not in out:
            mib = _size_mib(out.pop(alias), "GB")
            if mib is None:
                errors.append(f"{where}: {alias}: expected the host's memory in GB, e.g. 64")
            else:
                out["host_memory_mib"] = mib
                notes.append(f"read {alias!r} as host_memory_mib {mib}")
    for alias, key in _ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            if key in out:
                errors.append(f"{where}: {alias!r} and {key!r} both given; keep {key!r}")
                continue
            out[key] = value
            notes.append(f"read {alias!r} as {key!r}")
    for key in ("driver_version", "cuda_driver_version"):
        value = out.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = str(value)
    if isinstance(out.get("python"), (int, float)) and not isinstance(out.get("python"), bool):
        errors.append(f"{where}: python: write the version as a string, e.g. \"3.10\" (the number 3.10 reads as 3.1)")
        out.pop("python")
    if isinstance(out.get("gpus"), (str, dict)):
        out["gpus"] = [out["gpus"]]
    if isinstance(out.get("gpus"), list):
        out["gpus"] = _counted_names(out["gpus"], where, errors, notes)
    count_key = next((k for k in _COUNT_KEYS if k in out), None)
    count = out.pop(count_key) if count_key else None
    if isinstance(out.get("gpus"), int) and not isinstance(out.get("gpus"), bool):
        count, out["gpus"] = out["gpus"], []  # "gpus": 2 is a count
        count_key = "gpus"
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 64:
            errors.append(f"{where}: {count_key}: expected a whole number of GPUs, got {json.dumps(count)[:40]}")
        elif isinstance(out.get("gpus"), list) and len(out["gpus"]) == 1 and count != 1:
            out["gpus"] = out["gpus"] * count
            notes.append(f"{count_key} {count}: {count} of the GPU named")
        elif isinstance(out.get("gpus"), list) and len(out["gpus"]) not in (0, count):
            errors.append(f"{where}: {count_key}: {count}, but gpus lists {len(out['gpus'])}")
        elif not out.get("gpus") and count:
            errors.append(f"{where}: {count_key}: {count}, but no GPU is named: add \"gpus\": [\"Tesla T4\"]")
    memory_key = next((k for k in _MEMORY_GB_KEYS if k in out), None)
    if memory_key:
        given = out.pop(memory_key)
        mib = _size_mib(given, "GB")
        if mib is None:
            errors.append(f"{where}: {memory_key}: expected the GPU memory in GB, e.g. 24, got {json.dumps(given)[:40]}")
        elif isinstance(out.get("gpus"), list):
            out["gpus"] = [_with_memory(g, mib) for g in out["gpus"]]
            notes.append(f"{memory_key} {given}: {mib} MiB per GPU")
    if isinstance(out.get("gpus"), list):  # `{"name": "H100", "count": 8}`: eight of it
        spread = []
        for gpu in out["gpus"]:
            n = next((gpu[k] for k in ("count", "number", "quantity") if isinstance(gpu, dict) and k in gpu), None)
            if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 64:
                gpu = {k: v for k, v in gpu.items() if k not in ("count", "number", "quantity")}
                spread += [gpu] * n
                notes.append(f"count {n}: {n} of {gpu.get('name') or gpu.get('model') or 'the GPU'}")
            else:
                spread.append(gpu)
        out["gpus"] = spread
    return out, notes


_AMD_NAME = re.compile(r"(?:AMD[ \t]+)?(?:Instinct.*|MI\d{2,3}[A-Z]?|Radeon.*)", re.I)
"""An AMD GPU's name (`MI300X`, `AMD Instinct MI250X`, `Radeon RX 7900 XTX`): ROCm, not CUDA."""
_ONE_MACHINE = "name the machine the job ran on (e.g. {\"gpus\": [\"NVIDIA L4\"]})"

_COUNTED_NAME = re.compile(r"(?:(\d{1,2})[ \t]*[x×*][ \t]*(?P<a>[A-Za-z][^\n]*?)|(?P<b>[A-Za-z][^\n]*?)[ \t]*[x×*][ \t]*(\d{1,2}))",
                           re.I)
_GPU_KEYS = {"name", "compute_capability", "memory_total_mib", "memory_free_mib", "vendor", "cc", "compute_cap", "sm",
             "model", "gpu", "count", "number", "quantity", "memory", "memory_gb", "vram", "vram_gb", "memory_mib"}


def _counted_names(gpus: list, where: str, errors: list[str], notes: list[str]) -> list:
    """Hand-written GPU entries that carry their count: a name with a count glued on (`2x A100-80G`, `t4x2`,
    `H100 * 8`) as that many of the name; a mapping of one name to a count (`{H100: 8}`) likewise; a mapping of
    several names to counts (`{L4: 1, A10G: 1}`, a cloud spec's alternatives) names no one machine: refused,
    naming them. Each reading said in a note."""
    out: list = []
    for gpu in gpus:
        if isinstance(gpu, str):
            found = _COUNTED_NAME.fullmatch(gpu.strip())
            n = found and int(found.group(1) or found.group(4))
            if found and 1 <= n <= 64:
                name = (found.group("a") or found.group("b")).strip()
                out += [name] * n
                notes.append(f"read {gpu.strip()!r} as {n} x {name!r}")
                continue
        elif (isinstance(gpu, dict) and gpu and not set(gpu) & _GPU_KEYS
              and all(isinstance(v, int) and not isinstance(v, bool) for v in gpu.values())):
            if len(gpu) > 1:
                errors.append(f"{where}: gpus: {json.dumps(gpu)[:80]} names several GPUs ({', '.join(sorted(gpu))}), "
                              f"not one machine; {_ONE_MACHINE}")
                continue
            (name, n), = gpu.items()
            if 1 <= n <= 64:
                out += [name] * n
                notes.append(f"read {json.dumps(gpu)} as {n} x {name!r}")
                continue
        if isinstance(gpu, str) and _AMD_NAME.fullmatch(gpu.strip()):  # `gpu: MI300X`: an AMD GPU (ROCm), not CUDA
            gpu = {"name": gpu.strip(), "vendor": "amd"}
            notes.append(f"read {gpu['name']!r} as an AMD GPU")
        out.append(gpu)
    return out


_ACCELERATOR = re.compile(r"\s*([A-Za-z][\w.-]*?)(?::(\d{1,2}))?\s*")


def _task_resources(data: dict, where: str) -> dict:
    """A cloud tool's task file (SkyPilot's `resources: accelerators: A100-80GB:8`, dstack's `resources: gpu:
    MI300X` or `gpu: A100:80GB:2`) read as the machine it asks for: a GPU name and a count, with a note. A spec
    that allows several machines (`{L4: 1, A10G: 1}`, a list, `16GB..24GB`, `count: 1..`, memory alone) names
    none: refused, naming what it allows. A mapping without `resources` comes back as it was."""
    resources = data.get("resources")
    if not isinstance(resources, dict) or any(k in data for k in ("gpus", "gpu", "gpu_name", "driver_version")):
        return data
    key = "accelerators" if "accelerators" in resources else "gpu" if "gpu" in resources else None
    if key is None:
        return data
    spec = resources[key]
    if isinstance(spec, str) and ".." not in spec:
        parts = spec.strip().split(":")
        name = parts[0]
        sizes = [p for p in parts[1:] if re.fullmatch(r"\d+(?:\.\d+)?\s*(?:GB|GiB|G)", p, re.I)]
        counts = [p for p in parts[1:] if re.fullmatch(r"\d{1,2}", p)]
        if (re.fullmatch(r"[A-Za-z][\w.-]*", name) and not re.fullmatch(r"\d+\s*(?:GB|GiB|G)", name, re.I)
                and len(sizes) + len(counts) == len(parts) - 1 and len(sizes) <= 1 and len(counts) <= 1):
            count = int(counts[0]) if counts else 1
            gpu: dict[str, Any] = {"name": name}
            if _AMD_NAME.fullmatch(name):  # dstack's `gpu: MI300X`
                gpu["vendor"] = "amd"
            mib = _size_mib(sizes[0], "GB") if sizes else None
            if mib is None and (found := re.search(r"-(\d+)GB$", name, re.I)):  # SkyPilot's `A100-80GB`
                mib = _size_mib(found.group(1), "GB")
            if mib is not None:
                gpu["memory_total_mib"] = mib
            return {"gpus": [gpu] * count, "notes": [f"read as a task file: resources.{key} {spec!r}: {count} of "
                                                         f"{name}"]}
    shown = json.dumps(spec)[:80] if not isinstance(spec, str) else spec
    raise InputError(f"{where}: a task file whose resources.{key} ({shown}) allows more than one machine; "
                     + _ONE_MACHINE)


def _with_memory(gpu: Any, mib: int) -> Any:
    if isinstance(gpu, str):
        gpu = {"name": gpu}
    if isinstance(gpu, dict) and gpu.get("memory_total_mib") is None:
        return {**gpu, "memory_total_mib": mib}
    return gpu


_HOST_MEMORY_GB_KEYS = ("ram", "ram_gb", "host_ram_gb", "host_memory_gb", "system_memory_gb", "system_ram_gb",
                        "host_memory", "system_memory")
_GPU_MEMORY_KEYS = ("memory", "vram", "memory_total", "total_memory", "gpu_memory", "memory_size")
"""A GPU's memory under the names people give it; a bare number below 1024 is GB, above it MiB."""


def _size_mib(value: Any, unit: str) -> int | None:
    """MiB from `24`, `24.5`, `"24 GB"`, `"80G"`, `"24576 MiB"`, `"2 TB"` (a bare number in `unit`, GB or MiB);
    None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number, unit = float(value), (unit if unit == "MiB" or value < 1024 else "MiB")
    elif isinstance(value, str):
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G|MB|MiB|M|TB|TiB|T)?\s*", value, re.I)
        if not found:
            return None
        number = float(found.group(1))
        unit = (found.group(2) or (unit if unit == "MiB" or number < 1024 else "MiB")).upper()
    else:
        return None
    mib = number * {"T": 2**20, "TB": 2**20, "TIB": 2**20, "M": 1, "MB": 1, "MIB": 1}.get(unit.upper(), 1024)
    return int(mib) if 0 < mib < 2**31 else None


def os_from_words(text: str) -> str | None:
    """The OS family words name: `Ubuntu 22.04` (or `Ubuntu22.04`), `Windows 11`, `macOS 14`, `Colab`; None when
    they name none. Windows first, then macOS, then Linux (a WSL box is Linux, whatever else is said)."""
    if re.search(r"\bWindows\b|\bWin(?:10|11)\b", text, re.I):
        return "windows"
    if re.search(r"\b(?:macOS|Mac ?OS|MacBook|OS X|Darwin)\b", text, re.I):
        return "darwin"
    if re.search(r"\b(?:Linux|Ubuntu|Debian|CentOS|RHEL|Red Hat|Rocky|Fedora|Alma|SUSE|Arch|WSL2?|Colab|Kaggle)"
                 r"(?:\b|(?=\d))", text, re.I):
        return "linux"
    # no OS named, but a PowerShell prompt or a Windows user path (`PS C:\Users\me>`, `C:\Users\...`)
    if re.search(r"(?:^|\s)PS [A-Z]:\\|\b[A-Z]:\\Users\\", text):
        return "windows"
    return None


def _gpu_aliases(raw: dict) -> dict:
    raw = dict(raw)
    for alias, key in (("cc", "compute_capability"), ("compute_cap", "compute_capability"),
                       ("sm", "compute_capability"), ("model", "name"), ("gpu", "name")):
        if alias in raw and key not in raw:
            raw[key] = raw.pop(alias)
    cc = raw.get("compute_capability")
    if isinstance(cc, (int, float)) and not isinstance(cc, bool):
        raw["compute_capability"] = f"{cc:.1f}" if isinstance(cc, float) or cc < 10 else f"{cc // 10}.{cc % 10}"
    elif isinstance(cc, str) and re.fullmatch(r"(sm_?)?\d{2,3}", cc.lower()):
        digits = re.sub(r"\D", "", cc)
        raw["compute_capability"] = f"{digits[:-1]}.{digits[-1]}"
    for key in (*_MEMORY_GB_KEYS, *_GPU_MEMORY_KEYS, "memory_total_gb", "memory_mib"):
        if key in raw and "memory_total_mib" not in raw:
            given = raw.pop(key)
            mib = _size_mib(given, "MiB" if key == "memory_mib" else "GB")
            raw["memory_total_mib"] = mib if mib is not None else given  # not a size: reported below
    return raw


_EXAMPLES = {"os": '"linux"', "arch": '"x86_64"', "python": '"3.11.7"', "libc": '"glibc 2.36"',
             "driver_version": '"550.54.15"', "cuda_driver_version": '"12.4"'}


def load_machine_file(path: Path | str) -> Machine:
    return machine_from_text(read_machine_text(path), path)


def read_machine_text(path: Path | str) -> str:
    path = Path(path)
    try:
        return unpaste(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such machine file (write one with `qlora-doctor check --save-machine {path}`)")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the machine file: {err}")


def machine_option(machine: Machine) -> str:
    """The `--machine ...` a suggested qlora-doctor command needs to mean the machine judged ("" for this one)."""
    import shlex

    if machine.source in ("probe", ""):
        return ""
    if machine.source.startswith("preset "):
        return f" --machine {machine.source.removeprefix('preset ')}"
    if machine.source == "--machine":  # inline JSON: the user has it at hand
        return " --machine '<the same description>'"
    return f" --machine {shlex.quote(machine.source)}"


def unpaste(text: str) -> str:
    """The text a paste from an issue thread quotes: without the `> ` of a markdown quote on every line, the
    indentation common to every line, and code-fence lines (```` ``` ````, ```` ```text ````, or a fence glued to
    the first line of output). Text that is none of these comes back as it was."""
    lines = text.splitlines()
    comment = re.compile(r"#(?!#)")  # a `# note` line at the left margin (where the paste came from) stays as is
    filled = [ln for ln in lines if ln.strip() and not comment.match(ln)]
    if filled and all(ln.lstrip().startswith(">") for ln in filled):
        lines = [ln if comment.match(ln) else re.sub(r"^\s*> ?", "", ln) for ln in lines]
    if any(ln.lstrip().startswith("```") for ln in lines):
        lines = [re.sub(r"^\s*```[\w-]*\s*$", "", ln) for ln in lines]
        lines = [re.sub(r"^(\s*)```", r"\1", ln) for ln in lines]
    filled = [ln for ln in lines if ln.strip() and not comment.match(ln)]
    indent = min((len(ln) - len(ln.lstrip(" ")) for ln in filled), default=0)
    if indent:
        lines = [ln if comment.match(ln) else ln[indent:] for ln in lines]
    out = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    return text if out.strip() == text.strip() and out.count("\n") == text.count("\n") else out


EXPECTED_FORMATS = ("a JSON (or YAML) machine description like "
                    '{"gpus": ["Tesla T4"], "driver_version": "550.54.15"}, the output of `nvidia-smi` (its table, '
                    "-q, -L or --query-gpu CSV), torch's `python -m torch.utils.collect_env` or `transformers env`")


def machine_from_text(text: str, path: Path | str) -> Machine:
    """A machine file's text, JSON (or YAML by the file's suffix), validated."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise InputError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                             f"({getattr(err, 'problem', None) or err}); see `qlora-doctor check --save-machine "
                             "FILE` for the format") from None
        return machine_from_dict(data, str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith(("{", "[")) and path.suffix.lower() != ".json":
            raise InputError(f"{path}: not a machine description this tool can read; expected {EXPECTED_FORMATS} "
                             "(see `qlora-doctor check --save-machine FILE` for the JSON format)") from None
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); "
                         "see `qlora-doctor check --save-machine FILE` for the format")
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to be a machine file; "
                         "see `qlora-doctor check --save-machine FILE` for the format") from None
    return machine_from_dict(data, str(path))


def save_machine_file(machine: Machine, path: Path | str) -> None:
    from qlora_doctor.core.fileio import write_atomic

    data = machine.to_json()
    data.pop("source", None)
    data.pop("notes", None)
    write_atomic(Path(path), json.dumps(data, indent=2) + "\n")

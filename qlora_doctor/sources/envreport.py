"""Environments as issue reports paste them: `pip list`, `conda list`, torch's `collect_env`, `transformers env`.

A report is what was installed, not a request to a resolver: `check -r report.txt` judges it as listed. A full
listing (`pip list`, `conda list`) says what is absent too; the partial ones (collect_env's `[pip3]` lines,
transformers env's few versions) leave every other watched package unknown. The machine facts of collect_env and
transformers env (OS, Python, driver, GPUs) are `machine_facts`, for `--machine report.txt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name

_VERSION = r"v?(\d+(?:\.\d+)*(?:(?:a|b|rc|\.post|\.dev)\d+)*(?:\+[\w.]+)?)"

PIP_LIST = re.compile(r"^Package[ \t]+Version(?:[ \t]+\S+)*[ \t]*\r?\n-{3,}[ -]*\r?\n", re.M)
CONDA_LIST = re.compile(r"^#\s*Name\s+Version\s+Build(?:\s+Channel)?\s*$", re.M)
COLLECT_ENV = re.compile(r"^(?:Collecting environment information|Versions of relevant libraries:|PyTorch version:)",
                         re.M)
HF_ENV = re.compile(r"^-\s*(?:`?transformers`? version|PyTorch version(?: \(GPU\?\))?|torch:)", re.M)

CONDA_NAMES = {"pytorch": "torch", "pytorch-cuda": None, "cudatoolkit": None}
"""conda package -> PyPI name (None: not a Python package pip installs)."""

HF_ENV_NAMES = {"`transformers` version": "transformers", "transformers version": "transformers",
                "huggingface_hub version": "huggingface-hub", "safetensors version": "safetensors",
                "accelerate version": "accelerate", "pytorch version (gpu?)": "torch", "pytorch version": "torch",
                "deepspeed version": "deepspeed", "peft version": "peft", "bitsandbytes version": "bitsandbytes",
                "datasets version": "datasets", "trl version": "trl", "tokenizers version": "tokenizers",
                "torch": "torch"}  # a hand-written `- torch: 2.5.0` (`- **torch:** 2.5.0` once unbolded)


@dataclass(frozen=True)
class EnvReport:
    kind: str
    """pip list, conda list, collect_env, transformers env."""
    pins: dict[str, str]
    complete: bool
    """Lists every installed package (absent means not installed)."""


def read_report(text: str) -> EnvReport | None:
    """The packages of a pasted environment report; None when the text is not one (a requirements file)."""
    from qlora_doctor.core.machine import unpaste

    text = unpaste(text)  # a report quoted (`> `) or fenced in an issue comment
    if re.search(r"^(?:PyTorch version|Is CUDA available|Python platform)[ \t]+:", text, re.M):
        text = re.sub(r"^([A-Za-z][\w /()?'.-]*?[\w)?])[ \t]+:[ \t]?", r"\1: ", text, flags=re.M)  # vLLM's
    # hand-written bullets with markdown bold keys (`- **torch:** 2.5.0`) read as `- torch: 2.5.0`
    text = _unbold_keys(text)
    if PIP_LIST.search(text):
        body = text[PIP_LIST.search(text).end():]
        pins = _rows(re.findall(rf"^([A-Za-z0-9][\w.\-]*)[ \t]+{_VERSION}(?:[ \t]+\S.*)?[ \t\r]*$", body, re.M))
        return EnvReport("pip list", pins, complete=True)
    if CONDA_LIST.search(text):
        rows = []
        for name, version, build in re.findall(rf"^([A-Za-z0-9][\w.\-]*)[ \t]+{_VERSION}[ \t]+(\S+)", text, re.M):
            pypi = CONDA_NAMES.get(name, name)
            if pypi is None:
                continue
            cuda = re.search(r"cuda(\d+)\.(\d+)", build)
            if pypi == "torch" and cuda and "+" not in version:
                version += f"+cu{cuda.group(1)}{cuda.group(2)}"
            rows.append((pypi, version))
        return EnvReport("conda list", _rows(rows), complete=True)
    if COLLECT_ENV.search(text) and re.search(r"^(?:\[(?:pip3?|conda)\]|PyTorch version:)", text, re.M):
        rows = [(n, v) for n, v in re.findall(rf"^\[pip3?\][ \t]*([A-Za-z0-9][\w.\-]*)[ \t]*==[ \t]*{_VERSION}[ \t\r]*$",
                                               text, re.M)]
        for name, version in re.findall(rf"^\[conda\][ \t]*([A-Za-z0-9][\w.\-]*)[ \t]+{_VERSION}[ \t]", text, re.M):
            if CONDA_NAMES.get(name, name) is not None:
                rows.append((CONDA_NAMES.get(name, name), version))
        torch = re.search(rf"^PyTorch version:\s*{_VERSION}", text, re.M)
        if torch:
            rows.insert(0, ("torch", torch.group(1)))  # with its +cuXXX tag, before [pip3] torch==2.1.0
        return EnvReport("collect_env", _rows(rows), complete=False)
    if HF_ENV.search(text):
        rows = []
        for key, version in re.findall(rf"^-[ \t]*([^:\n]+?):[ \t]*{_VERSION}(?:[ \t]|$)", text, re.M):
            name = HF_ENV_NAMES.get(key.strip().lower())
            if name:
                rows.append((name, version))
        return EnvReport("transformers env", _rows(rows), complete=False)
    ultralytics = _ULTRALYTICS.search(text)
    if ultralytics:  # ultralytics' banner: `Ultralytics 8.3.59 🚀 Python-3.10.12 torch-2.3.0+cu121 CUDA:0 (...)`
        return EnvReport("ultralytics banner", _rows([("torch", ultralytics.group(2))]), complete=False)
    banner = _UNSLOTH_TORCH.search(text)
    if banner:  # unsloth's start-up banner: `Torch: 2.5.1+cu124. CUDA: 6.1. ...` (2024's: `Pytorch: ...`)
        return EnvReport("unsloth banner", _rows([("torch", banner.group(1))]), complete=False)
    return None


def _unbold_keys(text: str) -> str:
    """Hand-written bullets with markdown bold keys (`- **torch:** 2.5.0`, `- **Device**: ...`) as plain ones."""
    return re.sub(r"^([ \t]*[-*][ \t]*)\*\*([^*\n]+?)(?::\*\*|\*\*:)", r"\1\2:", text, flags=re.M)


def _rows(rows: list[tuple[str, str]]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for name, version in rows:
        try:
            Version(version)
        except InvalidVersion:
            continue
        pins.setdefault(canonical_name(name), version)
    return pins


_UNSLOTH_GPU = re.compile(r"/\|\s+(?:GPU: )?(?P<name>\S.*?)\.(?: Num GPUs = (?P<count>\d+)\.)? Max memory: "
                          r"(?P<gib>\d+(?:\.\d+)?) GB\. Platform(?::| =) ?(?P<os>\w+)", re.M)
_UNSLOTH_TORCH = re.compile(rf"(?:Torch|Pytorch): {_VERSION}\.\s+CUDA(?::| =) ?\d+\.\d+\.", re.M)


_NOT_A_NAME = re.compile(r"^(?:No CUDA|Could not collect|N/A|None|)$", re.I)
_AMD = re.compile(r"\b(?:AMD|Radeon|Instinct|gfx\d+)", re.I)


def machine_facts(text: str) -> dict[str, Any] | None:
    """A machine description (the `--machine` format) from pasted text: nvidia-smi output (the table, `-q`/`-a`,
    `-L`, `--query-gpu` CSV), torch's collect_env (classic, or vLLM's `key : value` one) or a `transformers env`-
    like bullet list (OS, arch, Python, libc, driver, GPUs); failing those, `nvidia-container-cli info` or the GPU
    lines of an ollama or SD.Next log. None when the text is none of these. A report that
    says nothing of the GPU comes back with `UNREAD` set, which `machine_from_dict` refuses, naming the file."""
    from qlora_doctor.core.machine import UNREAD, unpaste

    text = unpaste(text)
    memory = host_memory_mib(text)
    data = _machine_facts(text)
    if data is not None and memory and UNREAD not in data:
        data["host_memory_mib"] = memory
    return data


def _machine_facts(text: str) -> dict[str, Any] | None:
    from qlora_doctor.core.machine import UNREAD

    if re.search(r"NVIDIA-SMI has failed", text):
        return {UNREAD: "nvidia-smi says it could not talk to the NVIDIA driver, so the GPU is not known (paste "
                        "`nvidia-smi` from a machine where it works)"}
    smi = nvidia_smi_facts(text)
    if smi is not None:
        return smi
    banner = (unsloth_facts(text) or device_query_facts(text) or ultralytics_facts(text) or rocm_smi_facts(text) or
              gpustat_facts(text) or gpu_json_facts(text) or warp_facts(text) or pci_listing_facts(text))
    if banner is not None:
        return banner
    # `- **Device:** NVIDIA Jetson Orin Nano Super` (markdown bold keys) read as `- Device: ...`
    text = _unbold_keys(text)
    # `- 设备名称：NVIDIA H100` (Chinese keys, a full-width colon) read as `- Device: NVIDIA H100`; `- Python版本：`
    # as `- Python version:`
    text = re.sub(r"^([ \t]*[-*][ \t]*)([^:：\n]{1,30}?)[ \t]*：[ \t]*", r"\1\2: ", text, flags=re.M)
    text = re.sub(r"^([ \t]*[-*][ \t]*)(?:设备名称|设备型号|设备|显卡型号|显卡|GPU型号):", r"\1Device:", text, flags=re.M)
    text = re.sub(r"^([ \t]*[-*][ \t]*)(\w+?)[ \t]*版本:", r"\1\2 version:", text, flags=re.M)
    # `- GPU: **NVIDIA H100 80GB HBM3**`, `- Driver **535.183.06**` (markdown bold values) read without the stars
    # (the first two bold runs of a bullet line: a key's and its value's)
    for _ in range(2):
        text = re.sub(r"^([ \t]*[-*][ \t]*[^*\n]*?)\*\*([^*\n]+)\*\*", r"\1\2", text, flags=re.M)
    text = re.sub(r"^([A-Za-z][\w /()?'.-]*?[\w)?])[ \t]+:[ \t]?", r"\1: ", text, flags=re.M)  # vLLM `key : value`
    # A GitHub issue form's answers (`### GPU model`, a blank line, `NVIDIA GeForce RTX 4090`), read as the bullets
    # `- GPU model: NVIDIA GeForce RTX 4090` that the rest of this reads.
    # (An answer that is itself a bullet list, `### Environment` then `- Device: ...`, is left to the bullets.)
    text = re.sub(r"^###[ \t]+([^\n]+?)[ \t]*\n[ \t]*\n[ \t]*(?![-*][ \t])([^\s#][^\n]*)$", r"- \1: \2", text,
                  flags=re.M)
    # a two-column Markdown table's rows (`| GPU | NVIDIA A100-PCIE-40GB |`, `| NVIDIA driver | 590.48.01 |`), as a
    # PR's `Tested on` table has them, read as the bullets `- GPU: NVIDIA A100-PCIE-40GB` (nvidia-smi's tables are
    # read above, before this)
    text = re.sub(r"^\|[ \t]*([A-Za-z][^|\n]{0,40}?)[ \t]*\|[ \t]*([^|\n]*?[^|\s][^|\n]*?)[ \t]*\|[ \t]*$", r"- \1: \2",
                  text, flags=re.M)
    # diffusers-cli env: `Accelerator: NVIDIA A100 80GB PCIe, 81920 MiB` and one `name, N MiB` line for each further
    # GPU, read as a rig report's `- GPU 0: NVIDIA A100 80GB PCIe | 81920 MiB`; its keys as bullets where the paste
    # lost their dashes (`Platform: Linux-...`, `Python version: 3.10.12`)
    accel = re.search(r"^(?:-[ \t]*)?Accelerator:[ \t]*([^,\n]*[^,\s]),[ \t]*(\d{3,6})[ \t]*MiB[ \t]*$"
                      r"((?:\n[ \t]*(?:-[ \t]*)?[A-Za-z][^,\n]*,[ \t]*\d{3,6}[ \t]*MiB[ \t]*$)*)", text, re.M)
    if accel:
        rows = [(accel.group(1), accel.group(2))] + re.findall(r"^[ \t]*(?:-[ \t]*)?([A-Za-z][^,\n]*[^,\s]),[ \t]*(\d{3,6})"
                                                               r"[ \t]*MiB[ \t]*$", accel.group(3), re.M)
        lines = "\n".join(f"- GPU {i}: {n.strip()} | {mib} MiB" for i, (n, mib) in enumerate(rows))
        text = text[:accel.start()] + lines + text[accel.end():]
        text = re.sub(r"^(?=(?:Platform|Python version|PyTorch version \(GPU\?\)):)", "- ", text, flags=re.M)
    collect_env = re.search(r"^`?(?:Collecting\W*environment information|PyTorch version:|Is CUDA available:|"
                            r"CUDA used to build PyTorch:|GPU models and configuration:)", text, re.M)
    # transformers/accelerate env bullets, and the hand-written ones (`- GPU: NVIDIA RTX A6000`, `- OS: Ubuntu`)
    hf_env = re.search(r"^-\s*(?:`?\w+`? version|Platform|Python version|(?:\d{1,2}[ \t]*[x×]?[ \t]*GPUs?|GPU)"
                       r"(?: type| model| name| vendor)?|OS|"
                       r"Operating system|Device|Hardware):", text, re.M | re.I)
    if not collect_env and not hf_env:
        return container_cli_facts(text) or log_facts(text) or prose_facts(text) or instance_facts(text)
    data: dict[str, Any] = {}
    platform_line = re.search(r"^(?:-\s*)?(?:Python )?[Pp]latform:\s*(\S+)", text, re.M)
    os_line = re.search(r"^(?:-\s*)?(?:OS|Operating System):\s*(.+)$", text, re.M | re.I)
    where = " ".join(m.group(1) for m in (platform_line, os_line) if m).lower()
    if where:
        # (`OS: nt` is Python's os.name on Windows, as ComfyUI's system info prints it)
        data["os"] = ("windows" if re.search(r"windows|\bnt\b", where) else
                      "darwin" if re.search(r"mac ?os|darwin", where) else "linux")
        arch = re.search(r"x86_64|aarch64|arm64|amd64", where)
        if arch:
            data["arch"] = {"amd64": "x86_64"}.get(arch.group(0), arch.group(0))
    # `Python version: 3.10.12`, and a hand-written `python version：3.8.16` (lower case, a full-width colon)
    python = re.search(r"^(?:-\s*)?[Pp]ython(?: [Vv]ersion)?[ \t]*[:：]\s*(\d+\.\d+(?:\.\d+)?)", text, re.M)
    # a wheel-tag-like `py3123` / `cp312` / `py310` (3.12.3, 3.12, 3.10): minors of 10 on take two digits
    tag = None if python else re.search(r"^(?:-\s*)?Python(?: version)?:\s*(?:py|cp)(3)(1\d|[6-9])(\d{0,2})\b", text,
                                        re.M | re.I)
    if python:
        data["python"] = python.group(1)
    elif tag:
        data["python"] = ".".join(g for g in tag.groups() if g)
    libc = re.search(r"glibc[- ]?(\d+\.\d+)", text)
    if libc:
        data["libc"] = f"glibc {libc.group(1)}"
    # `- Driver: 535.183.06`, and the colon left out: `- Driver 535.183.06 → max supported CUDA 12.9`
    # (and the branch named before the number: `- NVIDIA Driver: Studio 595.79`, `Game Ready 576.02`)
    driver = re.search(r"^(?:Nvidia driver version|-\s*(?:NVIDIA )?Driver(?: version)?):?[ \t]*"
                       r"(?:(?:Studio|Game[ \t]+Ready|GRD|SD)[ \t]+)?(\d{3}\.\d+(?:\.\d+)?)(.*)$", text, re.M | re.I)
    if driver:
        data["driver_version"] = driver.group(1)
        # the CUDA version the driver supports, said on the driver's own line (nvidia-smi's `CUDA Version`)
        cuda = re.search(r"\b(?:max(?:imum)?[ \t]+supported[ \t]+)?CUDA(?:[ \t]+Version)?:?[ \t]*(\d{2}\.\d)\b",
                         driver.group(2), re.I)
        if cuda:
            data["cuda_driver_version"] = cuda.group(1)
    else:  # the driver in a bullet's parentheses: `- OS / Backend: Debian Linux / llama.cpp (CUDA 12.4, Driver 550.163.01)`
        aside = re.search(r"^[ \t]*-[ \t][^\n]*\([^()\n]*\bDriver(?:[ \t]+version)?:?[ \t]*(\d{3}\.\d+(?:\.\d+)?)[,)]", text,
                          re.M | re.I)
        if aside:
            data["driver_version"] = aside.group(1)
    # a bullet that says its CUDA version is nvidia-smi's (the driver's): `- CUDA version (from nvidia-smi): 13.0`
    smi_cuda = re.search(r"^-\s*CUDA(?: version)?[ \t]*\((?:from|per|by|via)?[ \t]*(?:nvidia-smi|the driver|driver)\)"
                         r"[ \t]*:[ \t]*(\d{2}\.\d)\b", text, re.M | re.I)
    if smi_cuda and "cuda_driver_version" not in data:
        data["cuda_driver_version"] = smi_cuda.group(1)
    # (a count in the key, `- 1 GPU: RTX 4090 (24GB)`, `- 2x GPUs: ...`: that many of the one GPU it names)
    gpu_line = re.search(r"^(?:GPU models and configuration|-\s*(?:\d{1,2}[ \t]*[x×]?[ \t]*GPUs?|GPU)(?: type| model| name)?):"
                         r"[ \t]*(.*)$", text, re.M | re.I)
    keyed_count = re.search(r"^-\s*(\d{1,2})[ \t]*[x×]?[ \t]*GPUs?:", text, re.M | re.I)
    names = [n for n in re.findall(r"GPU \d+:\s*([^\n(|]+?)\s*(?:\(UUID[^)]*\))?\s*$", text, re.M)
             if not _NOT_A_NAME.match(n.strip())]
    per_gpu: list[dict[str, Any]] = []
    # a rig report's GPU lines, fields split by `|`: `- GPU 0: NVIDIA GeForce RTX 3090 | 24576 MiB | driver 595.58.03
    # | VBIOS ...`; a launcher's `GPU 0: NVIDIA RTX 3090 (24 GB, sm 8.6)` (its rounded GB left to the tables)
    piped = re.findall(r"GPU \d+:[ \t]*([^|\n(]+?)[ \t]*\|[ \t]*(\d{3,6}) MiB\b(?:[ \t]*\|[ \t]*driver[ \t]+(\d{3}\.\d+(?:\.\d+)?)\b)?",
                       text, re.I)
    sm = re.findall(r"GPU \d+:[ \t]*([^|\n(]+?)[ \t]*\(\d{1,3} ?GB, sm[ _]?(\d+)\.(\d)\)[ \t]*$", text, re.M | re.I)
    if piped and not names:
        names = [n for n, _, _ in piped]
        per_gpu = [{"memory_total_mib": int(mib)} for _, mib, _ in piped]
        drivers = {d for _, _, d in piped if d}
        if len(drivers) == 1 and "driver_version" not in data:
            data["driver_version"] = drivers.pop()
        runtime = re.search(r"^-\s*CUDA Runtime \(per driver\):[ \t]*(\d{2}\.\d)\b", text, re.M)
        if runtime and "driver_version" in data:
            data["cuda_driver_version"] = runtime.group(1)
    elif sm and not names:
        names = [n for n, _, _ in sm]
        per_gpu = [{"compute_capability": f"{a}.{b}"} for _, a, b in sm]
    # ComfyUI's system info: `- Name: cuda:0 NVIDIA GeForce RTX 3060 : cudaMallocAsync` (the allocator after the
    # colon) and, under it, `- VRAM Total: 12884246528` (bytes)
    comfy = re.findall(r"^[ \t]*-[ \t]*Name:[ \t]*cuda:\d{1,2}[ \t]+([^\n]+?)(?:[ \t]+:[ \t]*\w+)?[ \t]*$", text, re.M)
    if comfy and not names:
        names = comfy
        totals = re.findall(r"^[ \t]*-[ \t]*VRAM Total:[ \t]*(\d{8,14})[ \t]*$", text, re.M)
        per_gpu = [{"memory_total_mib": int(b) // 2**20} for b in totals] if len(totals) == len(comfy) else []
    if not gpu_line:  # a hand-written `- Device: NVIDIA Jetson Orin Nano Super` / `- Hardware: Jetson AGX Orin 64GB`
        gpu_line = re.search(r"^-\s*(?:Device|Hardware):[ \t]*((?:NVIDIA|GeForce|Tesla|Quadro|Jetson)\b.*)$", text,
                             re.M | re.I)
    apple = re.search(r"^-\s*GPU(?: vendor| type)?:[ \t]*(?:Apple\b|.*\bMPS\b)", text, re.M | re.I)
    if not names and gpu_line and not _NOT_A_NAME.match(gpu_line.group(1).strip()):
        # `GPU models and configuration: GPU 0: Orin (nvgpu)` (one GPU, on the heading's line)
        names = [re.sub(r"^GPU \d+:\s*|\s*\((?:nvgpu|UUID[^)]*)\)\s*$", "", gpu_line.group(1).strip())]
    extra: dict[str, Any] = {}
    # a hand-written `- Compute capability: sm_87` (or `8.7`) beside one GPU
    cc_line = re.search(r"^-\s*Compute capability:\s*(?:sm_?(\d+)(\d)\b|(\d+)\.(\d)\b)", text, re.M | re.I)
    if cc_line and len(names) == 1:
        extra["compute_capability"] = ".".join(g for g in cc_line.groups() if g)
    if len(names) == 1:  # a hand-written `- GPU: NVIDIA RTX A6000 (Compute Capability 8.6)` or `... (16GB VRAM)`
        aside = re.search(r"\s*\(([^()]*)\)\s*$", names[0])
        cc = aside and re.search(r"(?:compute capability|cc|sm)[ _]?(\d+)\.?(\d)\b", aside.group(1), re.I)
        # `- GPU: NVIDIA NVIDIA RTX4070 (laptop)`: the laptop part (another product, another memory size) by the
        # name nvidia-smi gives it, its number apart from RTX (the tables' spelling) and the vendor once
        if aside and re.fullmatch(r"[ \t]*(?:laptop|notebook|mobile|笔记本)[ \t]*", aside.group(1), re.I):
            bare = re.sub(r"\b(NVIDIA)(?:[ \t]+\1)+\b", r"\1", names[0][:aside.start()], flags=re.I)
            names = [re.sub(r"\b(RTX|GTX)(\d{4})\b", r"\1 \2", bare, flags=re.I).strip() + " Laptop GPU"]
            aside = None
        # `(16GB VRAM)`, and a laptop's power beside it: `(16GB VRAM, 115W TGP)`
        items = [i.strip() for i in aside.group(1).split(",")] if aside else []
        gb = next((m for i in items if (m := re.fullmatch(r"(\d{1,3})\s*GB(?: VRAM)?", i, re.I))), None)
        if gb and not all(re.fullmatch(r"\d{1,3}\s*GB(?: VRAM)?|\d{2,3}\s*W(?:[ \t]+(?:TGP|TDP))?", i, re.I) for i in items):
            gb = None
        if cc or gb:
            names = [names[0][:aside.start()]]
            extra.update({"compute_capability": f"{cc.group(1)}.{cc.group(2)}"} if cc else
                         {"memory_total_mib": int(gb.group(1)) * 1024 * 15 // 16})  # as sold, less 1/16
    available = re.search(r"^(?:Is CUDA available:\s*(True|Yes|False|No)|"
                          r"-\s*PyTorch version \(GPU\?\):.*\((True|False)\))", text, re.M)
    available = (available.group(1) or available.group(2)).lower() in ("true", "yes") if available else None
    rocm = re.search(r"^(?:ROCM used to build PyTorch:\s*\d|HIP runtime version:\s*\d)", text, re.M) or \
        any(_AMD.search(n) for n in names)
    if apple and not names:  # an issue form's `### GPU vendor` answered `Apple Silicon (MPS)`: no CUDA GPU
        data["gpus"], data["gpu_vendor"] = [], "apple"
    elif rocm:  # a ROCm build answers torch.cuda with the AMD GPU: no CUDA GPU here
        data["gpus"] = [{"name": n.strip(), "vendor": "amd"} for n in names]
        data["gpu_vendor"] = "amd"
    elif names and per_gpu:
        data["gpus"] = [{"name": n.strip(), **g} for n, g in zip(names, per_gpu)]
    elif names:
        # llamafactory-cli env names one `GPU type` and counts them: `- GPU number: 8` (that many of it)
        number = re.search(r"^-\s*GPU number:[ \t]*(\d{1,2})[ \t]*$", text, re.M)
        number = number or keyed_count
        count = int(number.group(1)) if number and len(names) == 1 and 0 < int(number.group(1)) <= 64 else 1
        data["gpus"] = [{"name": n.strip(), **extra} for n in names] * count
    elif available is not False and (heading := _heading_gpus(text, collect_env)) is not None:
        data["gpus"], data["notes"] = heading
    elif available:
        data["gpus"] = [{"name": "NVIDIA GPU (the report does not name it)"}]  # judged unknown, not absent
    elif available is False or gpu_line:
        if "driver_version" not in data:
            data["gpus"] = []
    elif "driver_version" not in data:
        data[UNREAD] = ("read as " + ("torch's collect_env" if collect_env else "an environment report") +
                        ", but it says nothing of the GPU (cut before `Is CUDA available` and `GPU models and "
                        "configuration`?)")
    return data


def _heading_gpus(text: str, report: re.Match | None) -> tuple[list, list[str]] | None:
    """The GPUs a report's heading names in words where the report itself names none (cut before its GPU list): a
    vLLM issue's `<summary>vllm==0.9.1, python==3.10,8xA100 80GB, Ubuntu 22.04.5 LTS </summary>`, or the lines
    above `Collecting environment information`. None where the heading names no one GPU."""
    summary = re.findall(r"<summary>([^<\n]*)</summary>", text)
    words = "\n".join(summary) + ("\n" + text[:report.start()] if report else "")
    found = prose_facts(words) if words.strip() else None
    if not found or not found.get("gpus") or found.get("gpu_vendor", "nvidia") != "nvidia":
        return None
    notes = [n.replace("read from words", "read from the report's heading", 1) for n in found.get("notes", [])
             if n.startswith("read from words")]
    return found["gpus"], notes + ["the report names no GPU itself (cut before `GPU models and configuration`?)"]


def nvidia_smi_facts(text: str) -> dict[str, Any] | None:
    """A machine description from nvidia-smi output as people paste it: the table (any driver's header,
    `KMD Version` of R610+ included; Linux, Windows' TCC/WDDM column; cut mid-way), `nvidia-smi -q`/`-a`,
    `nvidia-smi -L` (MIG slices too) or `--query-gpu=...` CSV with its header row. None when it is none of these.
    The header alone says an NVIDIA GPU is there, not which: it comes back as an unnamed NVIDIA GPU."""
    csv = _query_gpu_csv(text)
    if csv is not None:
        return csv
    header = re.search(r"NVIDIA-SMI\s+\S+\s+(?:Driver|KMD) Version:\s*(\d+\.\d+(?:\.\d+)?)"
                       r"(?:\s+CUDA (?:UMD )?Version:\s*(\d+\.\d+)?)?", text)
    query = re.search(r"^\s*Driver Version\s+:\s*(\d+\.\d+(?:\.\d+)?)", text, re.M)
    # `nvidia-smi -q -x` (XML): `<driver_version>430.64</driver_version>`, `<cuda_version>10.1</cuda_version>`
    xml = re.search(r"^\s*<driver_version>(\d+\.\d+(?:\.\d+)?)</driver_version>", text, re.M)
    listing = re.findall(r"^GPU (\d+): (.+?) \(UUID: GPU-", text, re.M)
    if not header and not query and not listing and not xml:
        return None
    data: dict[str, Any] = {}
    cuda = header.group(2) if header else None
    if query:
        data["driver_version"] = query.group(1)
        found = re.search(r"^\s*CUDA Version\s+:\s*(\d+\.\d+)", text, re.M)
        cuda = found.group(1) if found else None
    if xml and not query:
        data["driver_version"] = xml.group(1)
        found = re.search(r"^\s*<cuda_version>(\d+\.\d+)</cuda_version>", text, re.M)
        cuda = found.group(1) if found else cuda
    if header:
        data["driver_version"] = header.group(1)
    if cuda:
        data["cuda_driver_version"] = cuda
    gpus: list[dict[str, Any]] = []
    notes: list[str] = []
    table = text[header.end():] if header else ""
    table = re.split(r"^\s*\|\s*(?:MIG devices|Processes):", table, maxsplit=1, flags=re.M)[0]
    for line in table.splitlines():
        row = re.match(r"^\|\s+(\d+)\s+(.+?)\s+(On|Off|WDDM|TCC|N/A)\s+\|", line)
        if row:
            name = row.group(2).strip()
            if name.endswith("..."):
                notes.append(f"{name}: nvidia-smi cut the name short; the product is judged from what is left")
            gpus.append({"name": re.sub(r"\s*\.\.\.$", "", name)})
            if row.group(3) in ("WDDM", "TCC"):
                data["os"] = "windows"
            continue
        total = re.search(r"\d+\s*MiB\s*/\s*(\d+)\s*MiB", line)
        if total and gpus and "memory_total_mib" not in gpus[-1]:
            gpus[-1]["memory_total_mib"] = int(total.group(1))
    if query and not gpus:
        names = re.findall(r"^\s*Product Name\s+:\s*(.+?)\s*$", text, re.M)
        totals = re.findall(r"FB Memory Usage\s*\n\s*Total\s+:\s*(\d+)\s*MiB", text)
        gpus = [{"name": n, **({"memory_total_mib": int(totals[i])} if i < len(totals) else {})}
                for i, n in enumerate(names)]
        attached = re.search(r"^\s*Attached GPUs\s+:\s*(\d+)", text, re.M)
        if attached and len(gpus) == 1 and int(attached.group(1)) > 1:
            count = int(attached.group(1))
            notes.append(f"Attached GPUs: {count}, only the first shown ({gpus[0]['name']}): taken as {count} of it")
            gpus = gpus * count
    if xml and not gpus:  # `-q -x`: one `<product_name>` per GPU
        gpus = [{"name": n} for n in re.findall(r"^\s*<product_name>([^<\n]+)</product_name>", text, re.M)]
    if listing and not gpus:
        gpus = [{"name": name.strip()} for _, name in listing]
    attached = re.search(r"^\s*Attached GPUs\s+:\s*(\d+)", text, re.M) if query else None
    if attached and not gpus and 1 < int(attached.group(1)) <= 64:  # `-q -d MEMORY,...` prints no Product Name
        count = int(attached.group(1))
        notes.append(f"Attached GPUs: {count}, none named (`nvidia-smi -q -d ...` leaves the names out): {count} "
                     "NVIDIA GPUs, not which")
        gpus = [{"name": "NVIDIA GPU (the nvidia-smi output does not name it)"} for _ in range(count)]
    migs = re.findall(r"^\s+MIG (\d+)g\.(\d+)gb\s+Device\s+\d+:", text, re.M)
    if migs and len(gpus) == 1:
        slices, gb = len(migs), min(int(g) for _, g in migs)
        mib = int(gb * 1024 * 15 / 16)
        notes.append(f"{gpus[0]['name']}: split into {slices} MIG slices (smallest {migs[0][0]}g.{gb}gb); a process "
                     f"sees one slice, so judged as one GPU of {mib} MiB ({gb} GB less 1/16)")
        gpus = [{"name": gpus[0]["name"], "memory_total_mib": mib}]
    stat = gpustat_facts(text)
    if stat is not None and len(stat["gpus"]) > len(gpus) and all(
            s["name"].startswith(g["name"]) for g, s in zip(gpus, stat["gpus"])):
        # gpustat's lines beside a table cut after its first GPUs: gpustat lists them all
        notes.append(f"gpustat lists {len(stat['gpus'])} GPUs, the nvidia-smi table shows {len(gpus)} (cut): "
                     "read from gpustat's lines")
        gpus = stat["gpus"]
    if not gpus:
        gpus = [{"name": "NVIDIA GPU (the nvidia-smi output does not name it)"}]
        notes.append("nvidia-smi's header alone: an NVIDIA GPU is there, but not which (paste the whole table)")
    data["gpus"] = gpus
    data.update(_side_facts(text))
    if notes:
        data["notes"] = notes
    return data


_GPUSTAT_ROW = re.compile(r"^\[(\d{1,2})\][ \t]+([^|\n]*?\S)[ \t]*\|[ \t]*-?\d+'C,[ \t]*\d+[ \t]*%[ \t]*(?:,[^|\n]*)?\|"
                          r"[ \t]*\d+[ \t]*/[ \t]*(\d+)[ \t]*MB[ \t]*\|", re.M)


def gpustat_facts(text: str) -> dict[str, Any] | None:
    """gpustat's lines: `[0] Tesla P100-PCIE-16GB | 27'C,   0 % |   103 / 16384 MB |` (its MB are NVML's MiB),
    under the host line that ends in the driver (`gpu-a-11  Mon Aug 22 15:23:57 2022  515.65.01`). None without
    them, or where the indices do not run 0, 1, 2, ..."""
    rows = _GPUSTAT_ROW.findall(text)
    if not rows or [int(i) for i, _, _ in rows] != list(range(len(rows))):
        return None
    data: dict[str, Any] = {"gpus": [{"name": name, "memory_total_mib": int(mib)} for _, name, mib in rows]}
    host = re.search(r"^\S+[ \t]+\w{3}[ \t]+\w{3}[ \t]+\d{1,2}[ \t]+\d\d:\d\d:\d\d[ \t]+\d{4}[ \t]+"
                     r"(\d{3}\.\d+(?:\.\d+)?)[ \t]*$", text, re.M)
    if host:
        data["driver_version"] = host.group(1)
    return data


def gpu_json_facts(text: str) -> dict[str, Any] | None:
    """gpustack's GPU list (JSON objects with `"manufacturer": "nvidia"`, `"name"`, `"memory"` in MiB,
    `"compute_capability"`, `"driver_version"`), whole or cut mid-way. A list cut short counts the GPUs it shows,
    unless the words beside it count that product (`an 8-GPU H100 configuration`): then that many of it, noted.
    None without such objects."""
    starts = list(re.finditer(r'^\s*\{\s*\n\s*"manufacturer":\s*"nvidia",', text, re.M))
    if not starts:
        return None
    gpus, drivers = [], set()
    for i, start in enumerate(starts):
        body = text[start.end():starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        name = re.search(r'^\s*"name":\s*"([^"\n]+)"', body, re.M)
        if not name:
            continue
        gpu: dict[str, Any] = {"name": name.group(1)}
        memory = re.search(r'^\s*"memory":\s*(\d{3,7}),?\s*$', body, re.M)
        if memory:
            gpu["memory_total_mib"] = int(memory.group(1))
        cc = re.search(r'^\s*"compute_capability":\s*"(\d+\.\d+)"', body, re.M)
        if cc:
            gpu["compute_capability"] = cc.group(1)
        driver = re.search(r'^\s*"driver_version":\s*"(\d{3}\.\d+(?:\.\d+)?)"', body, re.M)
        if driver:
            drivers.add(driver.group(1))
        gpus.append(gpu)
    if not gpus or len(drivers) > 1:
        return None
    data: dict[str, Any] = {"gpus": gpus}
    if drivers:
        data["driver_version"] = drivers.pop()
    cut = not re.search(r"^\s*\}\s*\n\s*\]\s*$", text[starts[-1].end():], re.M)
    names = {g["name"] for g in gpus}
    words = text[:starts[0].start()]
    counted = re.search(r"\b(\d{1,2})-GPU[ \t]+(\w+)\b", words)
    if cut and counted and len(names) == 1 and len(gpus) < int(counted.group(1)) <= 64 and \
            re.search(rf"\b{re.escape(counted.group(2))}\b", gpus[0]["name"]):
        count = int(counted.group(1))
        data["gpus"] = [dict(gpus[0]) for _ in range(count)]
        data["notes"] = [f"the GPU list is cut after {len(gpus)} ({gpus[0]['name']}); the text says "
                         f"'{counted.group(0)}': taken as {count} of it"]
    return data


def _side_facts(text: str) -> dict[str, str]:
    """What a user typed beside the output, as `Key==value` lines (`Architecture==aarch64`, `OS==Linux`,
    `Python==3.9.18`, as in pip's pin syntax): the facts the output itself does not say."""
    out: dict[str, str] = {}
    arch = re.search(r"^\s*(?:Architecture|Arch)\s*==\s*(aarch64|arm64|x86_64|amd64)\s*$", text, re.M | re.I)
    if arch:
        out["arch"] = {"arm64": "aarch64", "amd64": "x86_64"}.get(arch.group(1).lower(), arch.group(1).lower())
    # `Python==3.9.18`, and a typed `python version：3.8.16` (a full-width colon) under nvidia-smi's lines
    python = re.search(r"^\s*Python\s*(?:==|[ \t]version[ \t]*[:：])\s*(\d+\.\d+(?:\.\d+)?)\s*$", text, re.M | re.I)
    if python:
        out["python"] = python.group(1)
    system = re.search(r"^\s*OS\s*==\s*(Linux|Windows)\b", text, re.M | re.I)
    if system:
        out["os"] = system.group(1).lower()
    return out


def unsloth_facts(text: str) -> dict[str, Any] | None:
    """unsloth's start-up banner: `NVIDIA GeForce GTX 1070. Num GPUs = 1. Max memory: 7.909 GB. Platform: Linux.`
    (2024's: `GPU: Tesla P40. Max memory: 23.879 GB. Platform = Linux.`) and `Torch: 2.5.1+cu124. CUDA: 6.1. CUDA
    Toolkit: 12.4.`, where `CUDA` is the compute capability and `Max memory` torch's total in GiB. None without it."""
    gpu = _UNSLOTH_GPU.search(text)
    if not gpu:
        return None
    entry: dict[str, Any] = {"name": gpu.group("name").strip(), "memory_total_mib": int(float(gpu.group("gib")) * 1024)}
    cc = re.search(r"(?:Torch|Pytorch): \S+?\.\s+CUDA(?::| =) ?(\d+\.\d+)\.", text)
    if cc:
        entry["compute_capability"] = cc.group(1)
    count = int(gpu.group("count") or 1)
    data: dict[str, Any] = {"gpus": [entry] * (count if 0 < count <= 64 else 1)}
    system = gpu.group("os").lower()
    if system in ("linux", "windows"):
        data["os"] = system
    return data


def warp_facts(text: str) -> dict[str, Any] | None:
    """NVIDIA Warp's start-up banner: `CUDA Toolkit 12.8, Driver 13.0` (the driver's CUDA version) and under
    `Devices:` one `"cuda:0" : "NVIDIA GeForce RTX 5090" (32 GiB, sm_120, mempool enabled)` line per GPU (its
    total in whole GiB), beside `"cpu" : "x86_64"`. None without its device lines."""
    from qlora_doctor.core.machine import os_from_words

    devices = re.findall(r'^[ \t]*"cuda:(\d{1,2})"[ \t]*:[ \t]*"([^"\n]+)"[ \t]*\((\d+(?:\.\d+)?) GiB, sm_(\d+)(\d)\b', text,
                         re.M)
    if not devices or not re.search(r"^Warp \S+ initialized:", text, re.M):
        return None
    data: dict[str, Any] = {"gpus": [{"name": name, "memory_total_mib": int(float(gib) * 1024),
                                      "compute_capability": f"{major}.{minor}"}
                                     for _, name, gib, major, minor in devices]}
    driver = re.search(r"^[ \t]*CUDA Toolkit \d+\.\d+, Driver (\d+\.\d+)\b", text, re.M)
    if driver:
        data["cuda_driver_version"] = driver.group(1)
    cpu = re.search(r'^[ \t]*"cpu"[ \t]*:[ \t]*"(x86_64|aarch64|AMD64|arm64)"', text, re.M)
    if cpu:
        data["arch"] = {"AMD64": "x86_64", "arm64": "aarch64"}.get(cpu.group(1), cpu.group(1))
    system = os_from_words(text)
    if system:
        data["os"] = system
    return data


def host_memory_mib(text: str) -> int | None:
    """The host's total memory where a paste gives it: /proc/meminfo's `MemTotal: N kB`, the `Mem:` row of `free`
    (`-h`'s Gi/Mi/Ti, `-m`/`-g` by the command shown, else free's default KiB), accelerate env's `- System RAM:
    251.53 GB` or a hand-written `- RAM: 64GB` (GB read as GiB, as these tools print them). None when none is."""
    meminfo = re.search(r"^\s*MemTotal:\s*(\d+)\s*kB", text, re.M)
    if meminfo:
        return int(meminfo.group(1)) // 1024
    free = re.search(r"^\s*total\s+used\s+free\b.*\n\s*Mem:\s+(\d+(?:[.,]\d+)?)([KMGT])?i?B?\s", text, re.M)
    if free:
        unit = free.group(2) or ("M" if re.search(r"\bfree\s+(?:-\w*\s+)*-m\b", text) else
                                 "G" if re.search(r"\bfree\s+(?:-\w*\s+)*-g\b", text) else "K")
        return int(float(free.group(1).replace(",", ".")) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}[unit])
    # `- System RAM: 251.53 GB`, `- RAM: 64GB`; ultralytics' checks table: `RAM                 251.55 GB`
    ram = re.search(r"^\s*-?\s*(?:System RAM|Host RAM|System memory|RAM)(?:\s*:|[ \t]{2,})\s*(\d+(?:\.\d+)?)\s*"
                    r"(GB|GiB|TB|TiB)\b", text, re.M | re.I)
    if ram:
        return int(float(ram.group(1)) * (1024 if ram.group(2).upper().startswith("G") else 1024**2))
    # a cloud instance's spec list: `vCPUs: 4`, `Memory: 16 GiB` (the host's), `GPU Memory: 24 GiB` (the GPU's)
    spec = re.search(r"^[ \t]*-?[ \t]*Memory[ \t]*:[ \t]*(\d+(?:\.\d+)?)[ \t]*(GB|GiB|TB|TiB)\b", text, re.M | re.I)
    if spec and re.search(r"^[ \t]*-?[ \t]*vCPUs?[ \t]*:[ \t]*\d+", text, re.M | re.I):
        return int(float(spec.group(1)) * (1024 if spec.group(2).upper().startswith("G") else 1024**2))
    # Chinese system info: `内存 512G`, `内存：64GB` (内存 is the host's memory; the GPU's is 显存)
    ram = re.search(r"^\s*-?\s*(?:系统)?内存[ \t]*[:：]?[ \t]*(\d+(?:\.\d+)?)[ \t]*(GB|GiB|G|TB|TiB|T)(?![A-Za-z])", text,
                    re.M | re.I)
    if ram:
        return int(float(ram.group(1)) * (1024 if ram.group(2).upper().startswith("G") else 1024**2))
    return None


def container_cli_facts(text: str) -> dict[str, Any] | None:
    """`nvidia-container-cli info` (nvidia-docker's bug template): `NVRM version` (the driver), `CUDA version`
    and a `Model:` / `Architecture:` (compute capability) block per device. None when it is not that."""
    driver = re.search(r"^\s*NVRM version:\s*(\d+\.\d+(?:\.\d+)?)", text, re.M)
    models = re.findall(r"^\s*Model:\s*(.+?)\s*$", text, re.M)
    if not driver or not models:
        return None
    archs = re.findall(r"^\s*Architecture:\s*(\d+\.\d+)\s*$", text, re.M)
    data: dict[str, Any] = {"driver_version": driver.group(1)}
    cuda = re.search(r"^\s*CUDA version:\s*(\d+\.\d+)", text, re.M)
    if cuda:
        data["cuda_driver_version"] = cuda.group(1)
    data["gpus"] = [{"name": m, **({"compute_capability": archs[i]} if len(archs) == len(models) else {})}
                    for i, m in enumerate(models)]
    return data


def log_facts(text: str) -> dict[str, Any] | None:
    """GPU lines of the `key=value` logs people paste: ollama's `msg="inference compute" ... compute=8.9
    driver=12.3 name="NVIDIA GeForce RTX 4080" total="15.7 GiB"` (its `driver` is the driver's CUDA version; the
    driver itself is in `libcuda.so.545.23.08`) and SD.Next's `device=NVIDIA GeForce RTX 5090 n=1 ...
    capability=(12, 0) ... driver=576.02`. None when the text has neither."""
    ollama = [m for m in re.finditer(r'msg="inference compute"(.*)$', text, re.M)
              if re.search(r"\blibrary=cuda\b", m.group(1), re.I)]  # `library=cuda` (2024), `library=CUDA` (2025)
    if ollama:
        gpus, seen, cuda = [], set(), None
        totals = re.findall(r"CUDA totalMem (\d+) ?mb", text, re.I)
        for m in ollama:
            line = m.group(1)
            ident = re.search(r"\bid=(\S+)", line)
            if ident and ident.group(1) in seen:
                continue
            seen.add(ident.group(1) if ident else len(seen))
            # 2025's log names the device `name=CUDA0` and the product `description="NVIDIA GB10"`
            name = re.search(r'\bdescription="([^"]+)"', line) or re.search(r'\bname="([^"]+)"', line)
            gpu: dict[str, Any] = {"name": name.group(1) if name else "NVIDIA GPU (the log does not name it)"}
            cc = re.search(r"\bcompute=(\d+\.\d+)", line)
            if cc:
                gpu["compute_capability"] = cc.group(1)
            total = re.search(r'\btotal="([\d.]+) GiB"', line)
            if len(totals) == len(ollama):
                gpu["memory_total_mib"] = int(totals[len(gpus)])
            elif total:
                gpu["memory_total_mib"] = int(float(total.group(1)) * 1024)
            gpus.append(gpu)
            cuda = cuda or re.search(r"\bdriver=(\d+\.\d+)\b", line)
        data: dict[str, Any] = {"gpus": gpus}
        if cuda:
            data["cuda_driver_version"] = cuda.group(1)
        lib = re.search(r"libcuda\.so\.(\d{3}\.\d+(?:\.\d+)?)", text)
        if lib:
            data["driver_version"] = lib.group(1)
        return data
    # a device list in a log: `[info] Using CUDA devices:` then `cuda:0 - NVIDIA L40S`, one line per GPU
    listed = dict(re.findall(r"\bcuda:(\d{1,2})[ \t]+-[ \t]+((?:NVIDIA|Tesla|Quadro|GeForce)\b[^\n]*?)[ \t]*$", text, re.M))
    if listed:
        return {"gpus": [{"name": name} for _, name in sorted(listed.items(), key=lambda kv: int(kv[0]))]}
    # torch's warning for a GPU its build lacks kernels for: `NVIDIA GeForce RTX 5070 Ti Laptop GPU with CUDA
    # capability sm_120 is not compatible with the current PyTorch installation.` (one GPU per product named)
    warned = re.findall(r"^[ \t]*(?:\S+UserWarning:[ \t]*)?(\S[^\n]*?) with CUDA capability sm_(\d+)(\d) is not "
                        r"compatible with the current PyTorch installation", text, re.M)
    if warned:
        names = dict.fromkeys((name, f"{major}.{minor}") for name, major, minor in warned)
        return {"gpus": [{"name": name, "compute_capability": cc} for name, cc in names]}
    device = re.search(r"\bdevice=(.+?) n=(\d+)\b(.*(?:\n\s+\S+=.*)?)", text)
    if not device:
        return None
    rest = device.group(3)
    gpu = {"name": device.group(1).strip()}
    cc = re.search(r"capability=\((\d+), ?(\d+)\)", rest)
    if cc:
        gpu["compute_capability"] = f"{cc.group(1)}.{cc.group(2)}"
    data = {"gpus": [gpu] * int(device.group(2)) if 0 < int(device.group(2)) <= 64 else [gpu]}
    driver = re.search(r"\bdriver=(\d{3}\.\d+(?:\.\d+)?)\b", rest)
    if driver:
        data["driver_version"] = driver.group(1)
    system = re.search(r"\bsystem=(Windows|Linux|Darwin)\b", text)
    if system:
        data["os"] = system.group(1).lower()
    python = re.search(r"\bpython=(\d+\.\d+\.\d+)\b", text)
    if python:
        data["python"] = python.group(1)
    arch = re.search(r"\barch=(AMD64|x86_64|aarch64|arm64)\b", text)
    if arch:
        data["arch"] = {"AMD64": "x86_64", "arm64": "aarch64"}.get(arch.group(1), arch.group(1))
    return data


def _query_gpu_csv(text: str) -> dict[str, Any] | None:
    """`nvidia-smi --query-gpu=name,driver_version,memory.total,... --format=csv[,noheader][,nounits]`: by its
    header row when it has one, else the fields qlora-doctor itself asks for."""
    headless = _query_gpu_noheader(text)
    if headless is not None:
        return headless
    rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    # The header row where the CSV follows other lines (the `$ nvidia-smi --query-gpu=...` command, an
    # `nvidia-smi -L` listing, a sentence): the rows are the lines after it with as many fields.
    start = next((i for i, r in enumerate(rows) if "," in r and {"name", "driver_version"} <=
                  {c.strip().split(" [")[0] for c in r.split(",")} and
                  all(re.fullmatch(r"[\w.]+(?: \[[^\]]+\])?", c.strip()) for c in r.split(","))), 0)
    rows = rows[start:]
    if not rows or "," not in rows[0]:
        return None
    head = [c.strip().split(" [")[0] for c in rows[0].split(",")]
    if "name" in head:
        fields, rows = head, rows[1:]
        width = [i for i, r in enumerate(rows) if len(r.split(",")) != len(fields)]
        rows = rows[:width[0]] if width and start else rows
    else:
        fields = ["name", "memory.total", "memory.free", "compute_cap", "driver_version"]
    cells = [[c.strip() for c in r.split(",")] for r in rows]
    if not cells or any(len(c) != len(fields) for c in cells):
        return None
    gpus, drivers = [], set()
    for c in cells:
        row = dict(zip(fields, c))
        if not row.get("name") or not re.fullmatch(r"\d+\.\d+(?:\.\d+)?", row.get("driver_version", "")):
            return None
        gpus.append(_query_gpu_row(row))
        drivers.add(row["driver_version"])
    return {"driver_version": sorted(drivers)[0], "gpus": gpus}


def _query_gpu_row(row: dict[str, str]) -> dict[str, Any]:
    """One GPU of a `--query-gpu` CSV row (field -> cell): its name, memory.total and compute_cap where given."""
    gpu: dict[str, Any] = {"name": row["name"]}
    total = re.fullmatch(r"(\d+)(?:\s*MiB)?", row.get("memory.total", ""))
    if total:
        gpu["memory_total_mib"] = int(total.group(1))
    if re.fullmatch(r"\d+\.\d+", row.get("compute_cap", "")):
        gpu["compute_capability"] = row["compute_cap"]
    return gpu


def _query_gpu_noheader(text: str) -> dict[str, Any] | None:
    """`nvidia-smi --query-gpu=name,pci.device_id --format=csv,noheader` with the rows it printed: the fields are
    the command's own, in its order (a row quoted in a debug list, `['200.00, ..., GeForce RTX 2080, ...', '']`,
    read inside its quotes). Only the first run of rows with exactly that many cells, a name with a letter in it, and
    (where asked) a driver version that is one; None without the command or such a row."""
    command = re.search(r"--query-gpu[= ]([\w.]+(?:,[\w.]+)*)[^\n]*--format[= ]csv,[\w,]*\bnoheader\b", text)
    if not command:
        return None
    fields = command.group(1).split(",")
    if "name" not in fields:
        return None
    gpus, drivers = [], set()
    for line in text[command.end():].splitlines():
        line = re.sub(r"^\s*\[?'([^'\n]*)'(?:,\s*'')?\]?\s*$", r"\1", line).strip()
        cells = [c.strip() for c in line.split(",")]
        row = dict(zip(fields, cells))
        if len(cells) != len(fields) or not re.fullmatch(r"[A-Za-z][\w .()/-]*", row["name"]) or \
                row["name"] == "name" or ("driver_version" in row and
                                          not re.fullmatch(r"\d{3}\.\d+(?:\.\d+)?", row["driver_version"])):
            if gpus:  # the rows run together: the first line that is not one ends them
                break
            continue
        gpus.append(_query_gpu_row(row))
        if "driver_version" in row:
            drivers.add(row["driver_version"])
    if not gpus or len(drivers) > 1:
        return None
    data: dict[str, Any] = {"gpus": gpus}
    if drivers:
        data["driver_version"] = drivers.pop()
    return data


def device_query_facts(text: str) -> dict[str, Any] | None:
    """CUDA samples' `deviceQuery`: `Detected N CUDA Capable device(s)`, then per device `Device 0: "NAME"`,
    `CUDA Driver Version / Runtime Version 11.2 / 10.0` (the first is the driver's CUDA), `CUDA Capability
    Major/Minor version number: 6.1` and `Total amount of global memory: 2003 MBytes` (MiB). None without it."""
    blocks = list(re.finditer(r'^\s*Device \d+: "([^"\n]+)"', text, re.M))
    if not blocks or not re.search(r"CUDA Capability Major/Minor version number|CUDA Driver Version / Runtime",
                                   text):
        return None
    gpus: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        body = text[block.end():blocks[i + 1].start() if i + 1 < len(blocks) else len(text)]
        gpu: dict[str, Any] = {"name": block.group(1).strip()}
        cc = re.search(r"CUDA Capability Major/Minor version number:\s*(\d+\.\d+)", body)
        if cc:
            gpu["compute_capability"] = cc.group(1)
        total = re.search(r"Total amount of global memory:\s*(\d+)\s*MBytes", body)
        if total:
            gpu["memory_total_mib"] = int(total.group(1))
        gpus.append(gpu)
    data: dict[str, Any] = {"gpus": gpus}
    cuda = re.search(r"CUDA Driver Version / Runtime Version\s+(\d+\.\d+)\s*/", text)
    if cuda:
        data["cuda_driver_version"] = cuda.group(1)
    detected = re.search(r"Detected (\d+) CUDA Capable device", text)
    if detected and len(gpus) == 1 and 1 < int(detected.group(1)) <= 64:  # cut after the first device's block
        data["gpus"] = gpus * int(detected.group(1))
        data["notes"] = [f"deviceQuery detected {detected.group(1)} devices, only the first shown ({gpus[0]['name']}): "
                         f"taken as {detected.group(1)} of it"]
    return data


_ULTRALYTICS = re.compile(r"^Ultralytics\s+\S+\s+\S*\s*Python-(\d+\.\d+\.\d+)\s+torch-(\S+)\s+(CUDA:.*|CPU.*)$", re.M)


def ultralytics_facts(text: str) -> dict[str, Any] | None:
    """ultralytics' start-up banner, `Ultralytics 8.3.59 🚀 Python-3.10.12 torch-2.3.0 CUDA:0 (NVIDIA RTX A6000,
    48670MiB)` (a `CUDA:N (...)` per device used, `CPU (...)` without one), and `yolo checks`' table beside it
    (`OS Linux-...-x86_64-with-glibc2.35`, `GPU NVIDIA RTX A6000, 48670MiB`, `GPU count 4`). None without it."""
    banner = _ULTRALYTICS.search(text)
    if not banner:
        return None
    data: dict[str, Any] = {"python": banner.group(1)}
    devices = re.findall(r"CUDA:\d+ \(([^,()\n]+), (\d+)MiB\)", text)
    gpus = [{"name": name.strip(), "memory_total_mib": int(mib)} for name, mib in devices]
    count = re.search(r"^GPU count\s+(\d+)\s*$", text, re.M)
    if count and len(gpus) == 1 and 1 < int(count.group(1)) <= 64:
        data["notes"] = [f"GPU count {count.group(1)}, only CUDA:0 named ({gpus[0]['name']}): taken as "
                         f"{count.group(1)} of it"]
        gpus = gpus * int(count.group(1))
    data["gpus"] = gpus
    system = re.search(r"^OS\s{2,}(Linux|Windows|macOS|Darwin)\S*", text, re.M)
    if system:
        from qlora_doctor.core.machine import os_from_words

        data["os"] = os_from_words(system.group(1))
        arch = re.search(r"x86_64|aarch64|arm64|AMD64", system.group(0))
        if arch:
            data["arch"] = {"AMD64": "x86_64"}.get(arch.group(0), arch.group(0))
        libc = re.search(r"glibc(\d+\.\d+)", system.group(0))
        if libc:
            data["libc"] = f"glibc {libc.group(1)}"
    return data


def rocm_smi_facts(text: str) -> dict[str, Any] | None:
    """`rocm-smi --showproductname`, as its `GPU[0] : Card series: ...` block or `--csv` (`device,Card series,
    Card model,...`): AMD GPUs, named by their card series. None without it."""
    csv = re.search(r"^device,Card series,.*\n((?:card\d+,.*\n?)+)", text, re.M)
    names = [row.split(",")[1].strip() for row in csv.group(1).splitlines() if row.strip()] if csv else \
        re.findall(r"^GPU\[\d+\]\s*:\s*Card series:\s*(.+?)\s*$", text, re.M)
    if not names:
        return None
    return {"gpus": [{"name": n, "vendor": "amd"} for n in names], "gpu_vendor": "amd"}


_PCI_GPU = re.compile(r"^(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.\d[ \t]+(?:VGA compatible controller|3D controller|"
                      r"Display controller)(?:[ \t]+\[03[0-9a-f]{2}\])?:[ \t]+NVIDIA Corporation[ \t]+(?:\w+[ \t]+)?"
                      r"\[([^\]\n]+)\]", re.M | re.I)
_PNP_GPU = re.compile(r"^[ \t]*(\S[^\n]*?)[ \t]{2,}PCI\\VEN_10DE&DEV_[0-9A-F]{4}\b", re.M | re.I)


def pci_listing_facts(text: str) -> dict[str, Any] | None:
    """NVIDIA GPUs as the PCI bus lists them: `lspci` (`01:00.0 VGA compatible controller [0300]: NVIDIA Corporation
    GA102 [GeForce RTX 3090] [10de:2204] (rev a1)`, one line per GPU; a `3D controller` for the data-center cards; the
    card's audio function and `Subsystem:` lines are no GPUs) and Windows' `Get-PnpDevice` (`NVIDIA GeForce RTX 5090
    Laptop GPU   PCI\\VEN_10DE&DEV_2C58&...`). None without such lines."""
    names = [n for n in _PCI_GPU.findall(text) if not re.fullmatch(r"[0-9a-f]{4}(?::[0-9a-f]{4})?", n, re.I)]
    if names:
        return {"gpus": [{"name": n.strip()} for n in names],
                "notes": [f"read from lspci: {len(names)} NVIDIA GPU(s) ({', '.join(dict.fromkeys(names))})"]}
    pnp = _PNP_GPU.findall(text)
    if pnp:
        return {"gpus": [{"name": n.strip()} for n in pnp], "os": "windows",
                "notes": [f"read from Windows' device list (PCI\\VEN_10DE): {', '.join(dict.fromkeys(pnp))}"]}
    return None


def instance_types(text: str) -> list[str]:
    """The cloud instance types of the table named in the text (`g5.2xlarge`, SageMaker's `ml.g5.2xlarge`,
    `a2-highgpu-1g`, `Standard_NC24ads_A100_v4`), each once, lower-cased, in order."""
    from qlora_doctor.knowledge.loading import load_cloud_instances

    table = load_cloud_instances()
    found = re.findall(r"(?<![\w.-])(?:ml\.)?([A-Za-z][\w-]*?(?:\.\w+|-\d+g|-standard-\d+|_v\d))(?![\w-])(?!\.\w)", text)
    return list(dict.fromkeys(t.lower() for t in found if t.lower() in table))


def instance_facts(text: str) -> dict[str, Any] | None:
    """A machine named by its cloud instance type alone (`"current_instance_type": "ml.g5.2xlarge"`, `instance_type =
    "g4dn.8xlarge"`): the GPUs the provider's table gives it (knowledge/data/cloud_instances.toml), with a note. Two
    instance types named are not one machine: refused, naming them. None without an instance type of the table."""
    from qlora_doctor.core.machine import UNREAD
    from qlora_doctor.knowledge.loading import load_cloud_instances

    named = instance_types(text)
    if not named:
        return None
    if len(named) > 1:
        return {UNREAD: f"the text names several instance types ({', '.join(named)}), not one machine; describe one "
                        "machine per file"}
    gpu, count, source = load_cloud_instances()[named[0]]
    notes = [f"read from the instance type {named[0]}: {count} x {gpu} ({source}); the text names no GPU"]
    facts: dict[str, Any] = {}
    if len(text) <= PROSE_MAX_CHARS:  # a description: what it says beside the instance type
        facts = _platform_words(text)
        notes += _driver_words(text, facts)
    return {**facts, "gpus": [{"name": gpu}] * count, "notes": notes}


# --- a machine described in words ---------------------------------------------------------------------------------

PROSE_MAX_CHARS = 4000
"""Longer text is a log or a thread, not a description: left to the readers above."""

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "1x": 1, "two": 2, "dual": 2, "double": 2, "three": 3,
                "four": 4, "quad": 4, "six": 6, "eight": 8}
_TIMES = r"(?:x|×|\*|X)"
_VENDOR_WORDS = r"(?:(?:NVIDIA|Nvidia|nvidia|GeForce|Tesla|Quadro)[ \t]+)*"
_SENTENCE_END = re.compile(r"[.;!?](?:\s|$)|\n\s*\n|[。；，]")
_APPLE = re.compile(r"\bApple[ \t]+(?:silicon|M[1-5])\b|\bM[1-5](?:[ \t]+(?:Pro|Max|Ultra))?\b(?=[^.\n]*\b(?:Mac|macOS|"
                    r"MacOS|MacBook|mps|MPS)\b)|\b(?:Mac(?:Book)?|macOS|MacOS)\b[^.\n]*\bM[1-5]\b", re.I)
# `Radeon RX 7900 XTX` keeps its `XT`/`XTX` (a different card from the RX 7900 GRE)
_AMD_GPU = re.compile(r"\b(?:AMD[ \t]+)?(?:Instinct[ \t]+)?(MI\d{2,3}[A-Z]?|Radeon(?:[ \t]+(?:Pro|RX))?[ \t]+\w+(?:[ \t]XTX?\b)?|"
                      r"RX[ \t]?\d{4}(?:[ \t]?XTX?)?|(?i:AMD)[ \t]+\d{4}[ \t]?(?i:XTX?|GRE))\b")
_INTEL_GPU = re.compile(r"\bIntel(?:\(R\))?[ \t]+(?:Arc|Data[ \t]+Center[ \t]+GPU|Iris|UHD)\b|\+xpu\b|\bXPU\b")


def prose_facts(text: str) -> dict[str, Any] | None:
    """A machine described in words, as issue bodies and hand-written notes put it: `2x RTX 4090 (24GB each),
    driver 550.54.15, CUDA 12.4, Ubuntu 22.04`, `a single A100 GPU of 80GB`, `Kaggle T4 x 2`, `GPU: NVIDIA L4,
    Driver: 550.120`. Read only where the text names exactly one NVIDIA product of the GPU tables (by its table
    name as a word: `RTX 4090`, `rtx4090`, `A100-80GB`; a GeForce number alone, `2 * 4090`, only beside a count or
    the word GPU/card); a count, a stated memory size, the driver, the CUDA version, Python and the OS are taken
    from around it, each said in a note. Several products named (`tested on T4 and A100`) is not one machine: the
    text is refused, naming them. Apple silicon, AMD and Intel GPUs named in words are read as such (no CUDA GPU).
    None when the text names no GPU or is too long to be a description."""
    from qlora_doctor.core.machine import UNREAD
    from qlora_doctor.knowledge.loading import load_tables

    if len(text) > PROSE_MAX_CHARS:
        return None
    body = "\n".join(ln for ln in text.splitlines() if not re.match(r"\s*#\s*https?://", ln))  # a `# URL` line
    # a two-column Markdown table's rows with bold keys (`| **Driver** | 595.71.05 (open kernel module) |`, as an
    # issue's `Environment` table has them), read as `Driver: 595.71.05 ...` (the plain ones are bullets already)
    body = re.sub(r"^\|[ \t]*\*\*([A-Za-z][^|*\n]{0,40}?)\*\*[ \t]*\|[ \t]*([^|\n]*?\S)[ \t]*\|[ \t]*$", r"\1: \2", body,
                  flags=re.M)
    # an instance type's name is no GPU named in words (`Standard_NC24ads_A100_v4`): instance_facts reads it
    for named in instance_types(body):
        body = re.sub(rf"(?<![\w.-])(?:ml\.)?{re.escape(named)}(?![\w-])", lambda m: " " * len(m.group(0)), body, flags=re.I)
    tables = load_tables()
    names = sorted({m.match for m in tables.gpu_models if not m.match.endswith(" P")} |
                   {m.match for m in tables.gpu_memory}, key=len, reverse=True)
    mentions: list[tuple[int, int, str]] = []
    for name in names:
        for found in re.finditer(_name_pattern(name), body, re.I):
            if not any(s < found.end() and found.start() < e for s, e, _ in mentions):
                mentions.append((found.start(), found.end(), name))
    for found in _OWNED_NUMBER.finditer(body):  # `with a 4090`, `on my 3090`, `The 4090 has 24GB`
        name = next((n for n in names if re.fullmatch(rf"(?:RTX|GTX) {found.group(1)}", n)), None)
        if name and not any(s < found.end(1) and found.start(1) < e for s, e, _ in mentions):
            mentions.append((found.start(1), found.end(1), name))
    # A GPU named in a sentence about a paper's or its authors' hardware (`The original paper talks about 8 A100
    # GPUs`) is not the machine, where the text names another GPU outside such sentences.
    own = [m for m in mentions if not _REFERENCE_SENTENCE.search(_sentence_of(body, m[0], m[1]))]
    mentions = own or mentions
    facts = _platform_words(body)
    products = sorted({model.match if (model := tables.gpu_model_for(n)) else n for _, _, n in mentions})
    if not mentions:
        return _other_vendor(body, facts)
    if len(products) > 1:
        return {UNREAD: f"the text names several GPUs ({', '.join(products)}), not one machine; describe one "
                        "machine per file (e.g. {\"gpus\": [\"NVIDIA GeForce RTX 4090\"], \"driver_version\": "
                        "\"550.54.15\"})"}
    mentions.sort()
    start, end, name = mentions[0]
    count, how = 1, None
    for s, e, _ in mentions:
        found = _count_near(body, s, e)
        if found:
            count, how = found
            break
    else:  # no count beside the name: the text's one `node with 8 GPUs` / `machine with 4 gpus`, where it has one
        hosts = {(int(m.group(1)) if m.group(1).isdigit() else _COUNT_WORDS[m.group(1).lower()], m.group(0))
                 for m in _HOST_WITH_GPUS.finditer(body)}
        # a config's count key: `gpu_per_vm = 2`, `gpu-count = 1`, `accelerator_count: 4`, `num_gpus=8`
        hosts |= {(int(m.group(1) or m.group(2)), m.group(0)) for m in _COUNT_KEY.finditer(body)}
        if len({n for n, _ in hosts}) == 1 and 0 < next(iter(hosts))[0] <= 64:
            count, how = next(iter(hosts))
    gb = next((g for s, e, _ in mentions for g in [_memory_near(body, s, e)] if g), None)
    if gb is None and count > 1:  # `2 * 4090 ... 2 * 24GB`: the same count times a size, elsewhere in the text
        each = re.search(rf"(?<![\d.]){count}[ \t]*{_TIMES}[ \t]*(\d{{1,3}})[ \t]*(?:GB|G)(?![A-Za-z])", body)
        gb = float(each.group(1)) if each and 2 <= int(each.group(1)) <= 512 else None
    if gb is None and count == 1:  # one GPU and a memory key line: `**Video Memory**: 96GB GDDR7`, `VRAM: 24GB`
        keyed = re.search(r"\b(?:Video[ \t]+Memory|VRAM|GPU[ \t]+Memory|显存)\**[ \t]*[:：=]\**[ \t]*(\d{1,3})[ \t]*"
                          r"(?:GB|GiB|G)(?![A-Za-z])", body, re.I)
        keyed = keyed or re.search(r"(?<![\d.])(\d{1,3})[ \t]*(?:GB|GiB|G)[ \t]+(?:of[ \t]+)?(?:VRAM|GPU[ \t]+memory|显存)\b", body,
                                   re.I)
        gb = float(keyed.group(1)) if keyed and 2 <= int(keyed.group(1)) <= 512 else None
    # the table's spelling: `rtx3090` and `4090` alone are its `RTX 3090`; a GeForce suffix kept (`RTX 2080 Ti`)
    suffix = re.search(rf"{_GEFORCE_SUFFIX}$", body[start:end], re.I) if re.fullmatch(r"(?:RTX|GTX) \d{4}", name) \
        else None
    gpu: dict[str, Any] = {"name": name + (" Ti" if suffix and suffix.group(0).strip(" \t-").lower() == "ti" else
                                           " SUPER" if suffix else "")}
    notes = [f"read from words: {count} x {gpu['name']}" + (f" ({how})" if how else f" ('{body[start:end]}')") +
             (f", {gb:g} GB each as stated" if gb else "")]
    if gb:
        gpu["memory_total_mib"] = int(gb * 1024)
    facts["gpus"] = [gpu] * count
    facts["notes"] = notes + _driver_words(body, facts)
    return facts


def _driver_words(body: str, facts: dict[str, Any]) -> list[str]:
    """The driver and the CUDA version a description states in words, into `facts`; the notes they need."""
    # `driver 550.54.15`, `Driver: 550.120`, and in a sentence: `NVIDIA Driver is 535.86`
    # (and Russian's `Драйвер NVIDIA: 591.86`)
    driver = re.search(r"\b(?:driver(?:[ \t_-]*version)?|Драйвер(?:[ \t]+NVIDIA)?)(?:[ \t]*[:=]|[ \t]+is)?[ \t]*v?"
                       r"(\d{3}(?:\.\d{1,3}){0,2})\b", body, re.I)
    if driver:
        facts["driver_version"] = driver.group(1)
    # (not a toolkit's full version, `cuda12.2.91`: nvidia-smi prints the driver's CUDA as major.minor only)
    # (nor one the text calls the toolkit's or runtime's: `CUDA: 13.0 (toolkit & runtime)`)
    cuda = re.search(r"\bCUDA(?:[ \t_-]*(?:version|driver|runtime))?(?:[ \t]*[:=]|[ \t]+is)?[ \t]*v?(\d{1,2}\.\d)\b(?!\.\d)"
                     r"(?![ \t]*\(?[ \t]*(?:toolkit|runtime)\b)", body, re.I)
    if not cuda:
        return []
    facts["cuda_driver_version"] = cuda.group(1)
    return [f"read 'CUDA {cuda.group(1)}' as the CUDA version the driver reports (nvidia-smi's); "
            "the text does not say whether it is the driver's or torch's"]


_OWNED_NUMBER = re.compile(r"(?<![A-Za-z])(?:(?:with|on|using|have|has|had|own|got|bought|rented)[ \t]+(?:a|an|one|my|our)"
                           r"|my|our|the)[ \t]+(?:GeForce[ \t]+)?([1-5]0[5-9]0)(?![\w.])(?![ \t]*(?:s\b|seconds?|secs?|"
                           r"ms|MHz|W\b|watts?|steps?|tokens?|images?|it/s|MB|MiB|GB|port|epochs?|samples?|rows?|lines?))",
                           re.I)
"""A GeForce number alone that the text owns or uses (`with a 4090`, `on my 3090`, `The 4090 has 24GB`): the card;
not after `as a`/`than a` (a comparison, `the same as a 3060`) and not before a unit (`the 4090 steps`)."""
_REFERENCE_SENTENCE = re.compile(r"\b(?:paper|original|authors?|officially|README|reported)\b", re.I)


def _sentence_of(body: str, start: int, end: int) -> str:
    """The sentence (or line) the span [start, end) lies in."""
    stops = list(_SENTENCE_END.finditer(body[:start]))
    begin = stops[-1].end() if stops else 0
    begin = max(begin, body.rfind("\n", 0, start) + 1)
    after = _SENTENCE_END.search(body, end)
    stop = after.start() if after else len(body)
    line_end = body.find("\n", end)
    return body[begin:min(stop, line_end if line_end >= 0 else stop)]


_COUNT_KEY = re.compile(r"\b(?:gpus?|accelerators?)[_-](?:per[_-](?:vm|node|instance|machine|host)|count|num|number)"
                        r"[ \t\"']*[:=][ \t\"']*(\d{1,2})\b|\bnum[_-]gpus[ \t\"']*[:=][ \t\"']*(\d{1,2})\b", re.I)
"""A count of GPUs under a key of a config (Terraform, YAML, JSON, env files)."""
_HOST_WITH_GPUS = re.compile(r"\b(?:node|machine|server|box|host|instance|workstation)[ \t]+with[ \t]+"
                             r"(\d{1,2}|two|three|four|six|eight)[ \t]+GPUs\b", re.I)


_GEFORCE_SUFFIX = r"(?:[ \t-]?(?:Ti|SUPER)(?![A-Za-z]))"
"""A GeForce name's `Ti` / `SUPER` (any case, glued or not): the pattern is used with re.I."""


def _name_pattern(name: str) -> str:
    """A table name as people write it: any case, the space between its words optional or a hyphen
    (`RTX 4090`, `rtx4090`, `RTX-4090`), a plural `s`, an `x2` or a size glued on (`A100-80GB`, `T4x2`)."""
    words = [re.escape(w) for w in name.split()]
    core = r"[ \t-]?".join(words)
    if re.fullmatch(r"RTX A\d{4}", name):  # a workstation card without its RTX: `4 A6000 GPUs`, `two 48GB A6000`
        core = rf"(?:RTX[ \t-]?)?{words[1]}"
    if re.fullmatch(r"(?:RTX|GTX) \d{4}", name):  # a GeForce number alone: beside a count or the word GPU/card
        digits = re.escape(name.split()[1])  # (or owned: `_OWNED_NUMBER`, read in prose_facts)
        # also: after a vendor word (`nvidia 3090`), after a Chinese measure word for cards (`两张3090`, `8块4090`),
        # before a count (`4090*4`, `3090x2`) or a stated size (`3060 12G`, `5080 16G`)
        # and a `GPU:` field's answer (`GPU：2080Ti`, `GPU: 3090`)
        core = (rf"(?:{core}|(?<=[x×*X][ \t])\s*{digits}|(?<=[x×*X]){digits}|(?<=nvidia[ \t]){digits}|(?<=nvidia){digits}|"
                rf"(?<=geforce[ \t]){digits}|(?<=[张块]){digits}|(?<=GPU[:：]){digits}|(?<=GPU[:：] ){digits}|"
                rf"{digits}(?={_GEFORCE_SUFFIX}?[ \t]*(?:(?:GPUs?|cards?)\b|显卡|卡|[x×*X][ \t]*\d{{1,2}}(?!\d)|"
                rf"\d{{1,2}}[ \t]?G(?:B|iB)?(?![A-Za-z]))))")
        # `3060 Ti`, `4060TI`, `2080ti`, `4070 SUPER`: another product than the number alone (another memory
        # size), kept in the match so that prose_facts names it (`RTX 3060 Ti`, not `RTX 3060`)
        core = rf"{core}{_GEFORCE_SUFFIX}?"
    # glued to a count before it too: `8xH100`, `2×A100`
    return rf"(?:(?<![A-Za-z0-9])|(?<=\d[xX×])|(?<=nvidia)){core}(?=s?(?![A-Za-z0-9])|x\d|-?\d+\s*G)"


def _count_near(body: str, start: int, end: int) -> tuple[int, str] | None:
    before, after = body[max(0, start - 40):start], body[end:end + 24]
    times = re.search(rf"(?<![\d.])(\d{{1,2}})[ \t]*{_TIMES}[ \t]*{_VENDOR_WORDS}$", before)
    if times:
        return int(times.group(1)), times.group(0).strip()
    # `two Nvidia A40`, and a size between the count and the name: `two 48GB A6000`
    word = re.search(rf"\b(a|an|one|single|1x|two|dual|double|three|four|quad|six|eight|\d{{1,2}})[ \t]+"
                     rf"(?:\d{{1,3}}[ \t]?G(?:B|iB)?[ \t]+)?{_VENDOR_WORDS}$", before, re.I)
    if word and not re.search(r"[\d.][ \t]*\Z", before[:word.start(1)]):
        value = word.group(1).lower()
        count = _COUNT_WORDS.get(value) or (int(value) if value.isdigit() else 0)
        if 0 < count <= 64:
            return count, word.group(0).strip()
    # Chinese: a count with its measure word before the name, `8张Tesla P4`, `两张3090`, `4块A100`
    measure = re.search(rf"(\d{{1,2}}|[单一两二三四六八])[ \t]*[张块][ \t]*{_VENDOR_WORDS}$", before)
    if measure and 0 < _chinese_count(measure.group(1)) <= 64:
        return _chinese_count(measure.group(1)), measure.group(0).strip()
    # `双 16G V100`, `双4090`: a pair (双), a size between allowed
    pair = re.search(rf"双[ \t]*(?:\d{{1,3}}[ \t]?G(?:B|iB)?[ \t]*)?{_VENDOR_WORDS}$", before, re.I)
    if pair:
        return 2, pair.group(0).strip()
    # `T4 x 2`, `A100 GPUs * 8`, and Chinese `Tesla T4 显卡*6` (a card word, `显卡`/`卡`, before the times)
    # (and a size between: `RTX 4090-24G*8`, `A100 80G x 4`)
    suffix = re.match(rf"(?:[ \t-]*\d{{1,3}}[ \t]?G(?:B|iB)?)?(?:[ \t]*(?:GPUs?|显卡|卡))?[ \t]*{_TIMES}[ \t]*(\d{{1,2}})\b",
                      after)
    if suffix and 0 < int(suffix.group(1)) <= 64:
        return int(suffix.group(1)), suffix.group(0).strip()
    # Chinese: a count of cards after the name, `RTX 4090 八卡` (eight cards), `A100 4卡`, `单卡` (one card)
    cards = re.match(r"[ \t]*(\d{1,2}|[单一两二三四六八])[ \t]*(?:张|块)?卡", after)
    # Korean: units after the name, `RTX 2080 4대` (four units; `1대당` is "per unit", not a count)
    units = re.match(r"[ \t]*(\d{1,2})[ \t]*대(?!당)", after)
    if units and not cards and 0 < int(units.group(1)) <= 64:
        return int(units.group(1)), units.group(0).strip()
    if cards and 0 < _chinese_count(cards.group(1)) <= 64:
        return _chinese_count(cards.group(1)), cards.group(0).strip()
    return None


_CHINESE_COUNTS = {"单": 1, "一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "六": 6, "八": 8}


def _chinese_count(token: str) -> int:
    """`8` or a Chinese numeral (`两`, `八`, `单`) as a number."""
    return int(token) if token.isdigit() else _CHINESE_COUNTS[token]


def _memory_near(body: str, start: int, end: int) -> float | None:
    """A size stated with the GPU: right after its name in the same sentence (`A100 80GB`, `A100-80GB`, `T4 15 GB`,
    `A100 GPU of 80GB memory`, `A10G with 24GB each`), or right before it (`24GB RTX 4090`)."""
    after = body[end:end + 48]
    stop = _SENTENCE_END.search(after)
    after = after[:stop.start()] if stop else after
    # not a host's RAM, and not a network's speed (`an A100 cluster with 100G IB`)
    size = re.search(r"(?<![\d.])(\d{1,3}(?:\.\d)?)[ \t]*(?:GB|GiB|G|기가|ГБ|Гб)(?![A-Za-z])(?![ \t]*(?:of[ \t]+)?(?:system[ \t]+|host[ \t]+|"
                     r"DDR\d[ \t]+)?RAM\b)(?![ \t]*(?:IB|InfiniBand|Ethernet|RoCE|NICs?|network|networking|"
                     r"interconnect|bandwidth|links?)\b)", after, re.I)
    if size is None:  # `a100 memory=80`, `A100 (VRAM: 40)`: a size whose unit is left out, after the word memory
        size = re.search(r"\b(?:memory|mem|VRAM)[ \t]*[=:][ \t]*(\d{1,3})(?![\d.])(?![ \t]*(?:MiB|MB|M\b|%))", after,
                         re.I)
    if size is None:
        size = re.search(r"(?<![\d.])(\d{1,3})[ \t]*(?:GB|G)[ \t]+" + _VENDOR_WORDS + "$", body[max(0, start - 16):start],
                         re.I)
    value = float(size.group(1)) if size else None
    return value if value and 2 <= value <= 512 else None


def _platform_words(body: str) -> dict[str, Any]:
    from qlora_doctor.core.machine import os_from_words

    facts: dict[str, Any] = {}
    system = os_from_words(body)
    if system:
        facts["os"] = system
    python = re.search(r"\bPython(?:[ \t]+version)?[ \t]*[:=]?[ \t]*v?(3\.\d{1,2}(?:\.\d{1,2})?)\b", body, re.I)
    if python:
        facts["python"] = python.group(1)
    ram = (re.search(r"(?<![\d.])(\d{1,4})[ \t]*(GB|GiB|gigs?|G|TB|TiB)[ \t]+(?:of[ \t]+)?(?:system[ \t]+|host[ \t]+|CPU[ \t]+|"
                     r"DDR\d[ \t]+)?RAM\b", body, re.I) or
           re.search(r"\b(?:system[ \t]+|host[ \t]+)?RAM[ \t]*[:=]?[ \t]*(\d{1,4})[ \t]*(GB|GiB|G|TB|TiB)(?![A-Za-z])", body, re.I))
    if ram:
        mib = int(ram.group(1)) * (1024 * 1024 if ram.group(2).upper().startswith("T") else 1024)
        if 1024 <= mib <= 2**24:
            facts["host_memory_mib"] = mib
    return facts


def _other_vendor(body: str, facts: dict[str, Any]) -> dict[str, Any] | None:
    """Apple silicon, AMD or Intel GPUs named in words: no CUDA GPU (None when none is named)."""
    if _APPLE.search(body):
        return {**facts, "os": "darwin", "arch": "arm64", "gpus": [], "gpu_vendor": "apple",
                "notes": ["read from words: Apple silicon (MPS), no NVIDIA GPU"]}
    amd = _AMD_GPU.search(body)
    if amd:
        count = _count_near(body, amd.start(), amd.end())
        n = count[0] if count else 1
        return {**facts, "gpus": [{"name": amd.group(0).strip(), "vendor": "amd"}] * n, "gpu_vendor": "amd",
                "notes": [f"read from words: {n} x {amd.group(0).strip()} (AMD, ROCm)"]}
    if _INTEL_GPU.search(body):
        return {**facts, "gpus": [], "gpu_vendor": "none",
                "notes": ["read from words: an Intel GPU (XPU), which CUDA builds cannot use: no NVIDIA GPU"]}
    return None

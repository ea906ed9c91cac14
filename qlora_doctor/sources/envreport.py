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
HF_ENV = re.compile(r"^-\s*`?transformers`? version:", re.M)

CONDA_NAMES = {"pytorch": "torch", "pytorch-cuda": None, "cudatoolkit": None}
"""conda package -> PyPI name (None: not a Python package pip installs)."""

HF_ENV_NAMES = {"`transformers` version": "transformers", "transformers version": "transformers",
                "huggingface_hub version": "huggingface-hub", "safetensors version": "safetensors",
                "accelerate version": "accelerate", "pytorch version (gpu?)": "torch", "pytorch version": "torch",
                "deepspeed version": "deepspeed", "peft version": "peft", "bitsandbytes version": "bitsandbytes",
                "datasets version": "datasets", "trl version": "trl", "tokenizers version": "tokenizers"}


@dataclass(frozen=True)
class EnvReport:
    kind: str
    """pip list, conda list, collect_env, transformers env."""
    pins: dict[str, str]
    complete: bool
    """Lists every installed package (absent means not installed)."""


def read_report(text: str) -> EnvReport | None:
    """The packages of a pasted environment report; None when the text is not one (a requirements file)."""
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
    return None


def _rows(rows: list[tuple[str, str]]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for name, version in rows:
        try:
            Version(version)
        except InvalidVersion:
            continue
        pins.setdefault(canonical_name(name), version)
    return pins


def machine_facts(text: str) -> dict[str, Any] | None:
    """A machine description (the `--machine` format) from torch's collect_env or `transformers env`: OS, arch,
    Python, libc, `Nvidia driver version`, `GPU 0: ...` lines. None when the text is neither."""
    collect_env = re.search(r"^(?:Collecting environment information|PyTorch version:|Is CUDA available:)", text, re.M)
    hf_env = re.search(r"^-\s*(?:`transformers` version|Platform|Python version):", text, re.M)
    if not collect_env and not hf_env:
        return None
    data: dict[str, Any] = {}
    platform_line = re.search(r"^(?:-\s*)?(?:Python )?[Pp]latform:\s*(\S+)", text, re.M)
    os_line = re.search(r"^OS:\s*(.+)$", text, re.M)
    where = " ".join(m.group(1) for m in (platform_line, os_line) if m).lower()
    if where:
        data["os"] = "windows" if "windows" in where else "darwin" if re.search(r"macos|darwin", where) else "linux"
        arch = re.search(r"x86_64|aarch64|arm64|amd64", where)
        if arch:
            data["arch"] = {"amd64": "x86_64"}.get(arch.group(0), arch.group(0))
    python = re.search(r"^(?:-\s*)?Python version:\s*(\d+\.\d+(?:\.\d+)?)", text, re.M)
    if python:
        data["python"] = python.group(1)
    libc = re.search(r"glibc[- ]?(\d+\.\d+)", text)
    if libc:
        data["libc"] = f"glibc {libc.group(1)}"
    driver = re.search(r"^Nvidia driver version:\s*(\d+\.\d+(?:\.\d+)?)", text, re.M | re.I)
    if driver:
        data["driver_version"] = driver.group(1)
    names = re.findall(r"GPU \d+:\s*([^\n(]+?)\s*(?:\(UUID[^)]*\))?\s*$", text, re.M)
    if not names:
        single = re.search(r"^(?:GPU models and configuration|-\s*GPU type):\s*(?!Could not collect|N/A)(.+?)\s*$",
                           text, re.M)
        names = [single.group(1)] if single else []
    if names:
        data["gpus"] = [{"name": n.strip()} for n in names]
    elif re.search(r"^(?:Is CUDA available:\s*True|-\s*PyTorch version \(GPU\?\):.*\(True\))", text, re.M):
        data["gpus"] = [{"name": "NVIDIA GPU (the report does not name it)"}]  # judged unknown, not absent
    elif re.search(r"^(?:Is CUDA available:\s*False|-\s*PyTorch version \(GPU\?\):.*\(False\))", text, re.M) \
            and "driver_version" not in data:
        data["gpus"] = []
    return data

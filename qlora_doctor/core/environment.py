"""The Python environment judged: package versions and torch's build, as plain values. Where one comes
from (the installed packages, a requirements file, a resolver's answer) is qlora_doctor/sources/."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from packaging.version import Version


# The packages the doctor reports on, in display order. Training needs the first six.
WATCHED = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "datasets", "gradio",
           "gradio-client", "huggingface-hub", "trl", "numpy", "triton", "safetensors", "tokenizers",
           "pydantic", "liger-kernel")


TRAINING_NEEDS = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "datasets")


@dataclass(frozen=True)
class Package:
    name: str
    """Canonical (PEP 503) name."""
    version: Version | None
    """None when not installed, or when its version is unreadable (then `problem` says why)."""
    raw_version: str = ""
    problem: str = ""
    """Why the package is broken (missing metadata, unparseable version), empty when fine."""


@dataclass(frozen=True)
class TorchBuild:
    backend: str | None
    """cuda, rocm or cpu; None when torch is not installed or its build could not be read."""
    cuda: Version | None = None
    """CUDA runtime torch was built for (`cu124` -> 12.4)."""
    rocm: str | None = None
    how: str = ""
    """How the build was read (local tag, torch/version.py, PyPI default for this version)."""


@dataclass(frozen=True)
class Environment:
    packages: dict[str, Package]
    """Canonical name -> Package, for every package known (installed, or pinned in the file)."""
    torch: TorchBuild
    source: str = "installed"
    """`installed` or the requirements file's path."""
    conflicts: tuple[str, ...] = field(default=())
    """Declared-requirement violations among installed packages, explained."""
    unpinned: tuple[str, ...] = field(default=())
    """Packages a file names without an exact version that no resolver could fix: they will be installed,
    at a version nobody knows here (rules on them are `unknown`, never clear or firing)."""

    def version(self, name: str) -> Version | None:
        pkg = self.packages.get(canonical_name(name))
        return pkg.version if pkg else None

    def installed(self, name: str) -> bool:
        pkg = self.packages.get(canonical_name(name))
        return pkg is not None and (pkg.version is not None or bool(pkg.problem))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name in WATCHED:
            pkg = self.packages.get(name)
            data[name] = pkg.raw_version if pkg and pkg.raw_version else None
        data["torch_build"] = {"backend": self.torch.backend, "cuda": str(self.torch.cuda) if self.torch.cuda else None,
                               "rocm": self.torch.rocm, "how": self.torch.how}
        data["source"] = self.source
        return data


def build_from_local_tag(local: str) -> TorchBuild | None:
    """`cu124` -> CUDA 12.4, `rocm6.2` -> ROCm, `cpu` -> CPU."""
    match = re.fullmatch(r"cu(\d+)(\d)", local)
    if match:
        return TorchBuild("cuda", Version(f"{match.group(1)}.{match.group(2)}"), how=f"local tag +{local}")
    if local.startswith("rocm"):
        return TorchBuild("rocm", rocm=local[4:], how=f"local tag +{local}")
    if local == "cpu":
        return TorchBuild("cpu", how="local tag +cpu")
    return None


def parse_torch_version_py(text: str) -> TorchBuild:
    cuda = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*['\"]([\d.]+)['\"]", text, re.MULTILINE)
    hip = re.search(r"^hip\s*(?::\s*\S+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if cuda:
        version = re.match(r"\d+(?:\.\d+)?", cuda.group(1))
        if version is None:  # `cuda = '.'`: a corrupted file, not a CUDA version
            return TorchBuild(None, how=f"torch/version.py says cuda = {cuda.group(1)!r}, not a version")
        return TorchBuild("cuda", Version(version.group(0)), how="torch/version.py")
    if hip:
        return TorchBuild("rocm", rocm=hip.group(1), how="torch/version.py")
    return TorchBuild("cpu", how="torch/version.py (no CUDA, no HIP)")


def canonical_name(name: str) -> str:
    """PEP 503 normalized distribution name: `Huggingface_Hub` -> `huggingface-hub`."""
    return re.sub(r"[-_.]+", "-", name).lower()

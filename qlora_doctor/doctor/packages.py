"""Which packages would training use, at which versions: read without importing them.

Two sources, one result type (`Environment`):
  * the installed environment: `importlib.metadata` (a package whose metadata is missing or corrupt is
    reported as broken, not crashed on); torch's build (CUDA/ROCm/CPU) from its local version tag, else
    from `torch/version.py` read as text — never `import torch`;
  * a proposed pin set (`--requirements FILE`, pip format `name==version`): a torch local tag such as
    `2.5.1+cu124` gives its CUDA variant, a bare torch pin the default build PyPI serves for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from qlora_doctor.doctor.knowledge import canonical_name
from qlora_doctor.errors import InputError

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


# --- installed ----------------------------------------------------------------------------------

def installed_environment(with_conflicts: bool = True) -> Environment:
    packages: dict[str, Package] = {}
    dists: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:
            name = None
        if not name:
            # Metadata folder without a Name: a half-installed or corrupted package.
            folder = getattr(dist, "_path", None)
            guess = _name_from_dist_folder(folder)
            if guess:
                packages.setdefault(guess, Package(guess, None, "", f"metadata is missing or corrupt ({folder})"))
            continue
        key = canonical_name(name)
        if key in packages and packages[key].version is not None:
            continue  # first on sys.path wins, as for imports
        raw = dist.version or ""
        try:
            packages[key] = Package(key, Version(raw), raw)
        except InvalidVersion:
            packages[key] = Package(key, None, raw, f"version {raw!r} is not a valid version")
        dists[key] = dist
    torch = _installed_torch_build(dists.get("torch"), packages.get("torch"))
    conflicts = tuple(_declared_conflicts(dists, packages)) if with_conflicts else ()
    return Environment(packages=packages, torch=torch, conflicts=conflicts)


def _name_from_dist_folder(folder: Any) -> str | None:
    if folder is None:
        return None
    match = re.match(r"([A-Za-z0-9_.]+?)-\d", Path(str(folder)).name)
    return canonical_name(match.group(1)) if match else None


def _installed_torch_build(dist: metadata.Distribution | None, pkg: Package | None) -> TorchBuild:
    if pkg is None:
        return TorchBuild(None, how="torch is not installed")
    if pkg.version is not None and pkg.version.local:
        build = build_from_local_tag(pkg.version.local)
        if build is not None:
            return build
    # No local tag (PyPI wheels): torch/version.py says `cuda = '12.4'` / `hip = None`. Read it as text.
    if dist is not None:
        try:
            files = dist.files or []
            version_py = next((f for f in files if str(f).replace("\\", "/") == "torch/version.py"), None)
            text = Path(dist.locate_file(version_py)).read_text() if version_py else ""
        except Exception as err:
            return TorchBuild(None, how=f"torch/version.py unreadable ({type(err).__name__})")
        if text:
            return parse_torch_version_py(text)
    return TorchBuild(None, how="torch's build could not be read")


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


def _declared_conflicts(dists: dict[str, metadata.Distribution], packages: dict[str, Package]) -> list[str]:
    """Like `pip check` for the watched packages, but explained: who needs what, and what is there."""
    conflicts: list[str] = []
    marker_env = default_environment()
    for name in WATCHED:
        dist, pkg = dists.get(name), packages.get(name)
        if dist is None or pkg is None or pkg.version is None:
            continue
        try:
            requires = dist.requires or []
        except Exception:
            continue
        for line in requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({**marker_env, "extra": ""}):
                continue
            dep = packages.get(canonical_name(req.name))
            if dep is None or dep.version is None:
                if dep is None and canonical_name(req.name) in WATCHED:
                    conflicts.append(f"{name} {pkg.raw_version} needs {req.name}{req.specifier or ''}, "
                                     "which is not installed")
                continue
            if req.specifier and not req.specifier.contains(dep.version, prereleases=True):
                conflicts.append(f"{name} {pkg.raw_version} needs {req.name}{req.specifier}, "
                                 f"you have {dep.raw_version}")
    return conflicts


# --- proposed pins ------------------------------------------------------------------------------

def parse_requirements(text: str, where: str) -> dict[str, str]:
    """`name==version` lines -> {canonical name: version}. Comments, blank lines, hashes and index
    options are ignored; anything else that is not an exact pin is an error naming the line."""
    pins: dict[str, str] = {}
    errors: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if line.startswith("#") or not line:
            continue
        if line.startswith("-"):  # --index-url, --extra-index-url, -f, -c: options, not pins
            continue
        line = re.sub(r"\s+--hash=\S+", "", line).rstrip("\\").strip()
        try:
            req = Requirement(line)
        except InvalidRequirement as err:
            errors.append(f"{where}:{lineno}: not a requirement ({err}); expected name==version")
            continue
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator not in ("==", "==="):
            errors.append(f"{where}:{lineno}: {line!r} is not an exact pin; write name==version "
                          "(`qlora-doctor lock` writes such files)")
            continue
        version = specs[0].version
        try:
            Version(version)
        except InvalidVersion:
            errors.append(f"{where}:{lineno}: {version!r} is not a valid version")
            continue
        name = canonical_name(req.name)
        if name in pins and pins[name] != version:
            errors.append(f"{where}:{lineno}: {req.name} is pinned twice ({pins[name]} and {version})")
        pins[name] = version
    if errors:
        raise InputError(errors)
    return pins


def environment_from_pins(pins: dict[str, str], source: str) -> Environment:
    from qlora_doctor.doctor.knowledge import load_tables

    packages = {name: Package(name, Version(v), v) for name, v in pins.items()}
    torch = TorchBuild(None, how="torch is not pinned")
    if "torch" in packages:
        version = packages["torch"].version
        assert version is not None
        build = build_from_local_tag(version.local) if version.local else None
        if build is None:
            row = load_tables().default_cuda_for_torch(version)
            if row is None:
                build = TorchBuild(None, how=f"no record of the default PyPI build of torch {version}")
            elif row.cuda == "cpu":
                build = TorchBuild("cpu", how=f"PyPI default for torch {version}")
            else:
                build = TorchBuild("cuda", Version(row.cuda), how=f"PyPI default for torch {version} (Linux)")
        torch = build
    return Environment(packages=packages, torch=torch, source=source)


def load_requirements_file(path: Path) -> Environment:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such requirements file")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the requirements file ({err})")
    return environment_from_pins(parse_requirements(text, str(path)), str(path))

"""What a pasted error or log says, read before matching: the text cleaned of what copying damages, and
the facts in it that decide between rules (driver, GPU, torch build, package versions, loading or training).

Cleaning (`clean_paste`): ANSI colour codes; curly quotes and dashes; `[rank0]:` / `[default0]:` prefixes
of distributed launchers; the borders of rich's box-drawn tracebacks; markdown that ate underscores
(`**init**` or `Trainer.init()` for `__init__`, `\\_`). Pure functions, tested on real pastes
(tests/data/explain_corpus/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\[\d{1,3}(?:;\d{1,3})*m")
QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u2013": "-", "\u2014": "-",
                        "\u2212": "-", "\u00a0": " ", "\u200b": ""})
RANK_PREFIX = re.compile(r"^[ \t]*\[(?:rank|default)\d+\]:[ \t]?", re.MULTILINE)
BOX_BORDER = re.compile(r"^[ \t]*[\u2502\u2503\u2551|][ \t]?|[ \t]*[\u2502\u2503\u2551][ \t]*$", re.MULTILINE)
BOX_LINE = re.compile(r"^[ \t]*[\u256d\u256e\u2570\u256f\u250c\u2510\u2514\u2518\u2500\u2501\u2550].*$", re.MULTILINE)
MARKDOWN_DUNDER = re.compile(r"\*\*([A-Za-z_][A-Za-z0-9_]*)\*\*(?=\s*\()")
"""`**init**(` is `__init__(` after markdown made it bold."""
MARKDOWN_INIT = re.compile(r"(?<=\w)\.init(?:\(\))?(?=:?\s+(?:got an unexpected keyword|missing \d+ required))")
"""`Trainer.init() got an unexpected keyword ...`: markdown rendered `__init__` as bold `init` and the copy lost it."""


def clean_paste(text: str) -> str:
    """The paste with copying damage undone; line structure kept (patterns may anchor on lines)."""
    text = ANSI.sub("", text).translate(QUOTES).replace("\r\n", "\n").replace("\r", "\n")
    text = RANK_PREFIX.sub("", text)
    text = BOX_LINE.sub("", text)
    text = BOX_BORDER.sub("", text)
    text = MARKDOWN_DUNDER.sub(r"__\1__", text).replace("\\_", "_")
    text = MARKDOWN_INIT.sub(".__init__()", text)
    return text


def squeeze(text: str) -> str:
    """Lower-case, no whitespace, no backticks or quotes: survives lines wrapped mid-word and quoting."""
    return re.sub(r"[\s`'\"*]+", "", text).lower()


def spaced(text: str) -> str:
    return " ".join(text.split())


# --- facts ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """One answer to a paste: a hand-written rule whose error text matched, or a computed import fact."""

    id: str
    title: str
    cause: str
    fix: str
    sources: tuple[str, ...]
    matched: str
    """The error text (or the pattern's match) found in the pasted text."""
    score: float = 0.0
    evidence: tuple[str, ...] = ()
    """Why it ranks where it does: the facts that agreed or contradicted."""
    contradicted: bool = False
    """A fact in the paste contradicts the rule's conditions: shown only as an alternative."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "cause": self.cause, "fix": self.fix,
                "sources": list(self.sources), "matched": self.matched, "score": round(self.score, 2),
                "evidence": list(self.evidence), "contradicted": self.contradicted}


@dataclass(frozen=True)
class PasteFacts:
    """Facts read from a paste; None / empty when the paste does not say."""

    driver_cuda: Version | None = None
    """The CUDA version the driver supports: `found version 11060` -> 11.6, nvidia-smi's `CUDA Version: 12.2`."""
    driver: str | None = None
    """The NVIDIA driver version (`Driver Version: 535.104.05`)."""
    compute_capabilities: tuple[str, ...] = ()
    """From `sm_120`, `CUDA capability sm_86`, `compute capability 7.5`, or a GPU name."""
    gpu_names: tuple[str, ...] = ()
    torch: Version | None = None
    """torch's version with its local tag when the paste shows it (`2.1.0+cu121`)."""
    torch_cuda: Version | None = None
    """The CUDA torch was built with (`+cu121`, `CUDA used to build PyTorch: 12.1`)."""
    os: str | None = None
    """windows (a `C:\\` path), darwin (`/Users/...`, `/opt/homebrew`), linux (`/usr/`, `/home/`)."""
    arch: str | None = None
    """aarch64 (`aarch64` / Tegra paths, or a compute capability only Jetson boards have), x86_64 (`x86_64`)."""
    gpu_vendor: str | None = None
    """amd (Radeon, ROCm, gfx targets, HIP, DirectML, ZLUDA), nvidia (a known NVIDIA GPU, nvidia-smi output);
    None where the paste says neither or both."""
    phase: str | None = None
    """`loading` when the error is raised while weights are loaded or placed, `training` in a step."""
    packages: dict[str, str] = field(default_factory=dict)
    """name -> version from a `pip list` / `pip freeze` / `transformers env` / `collect_env` block."""

    def to_json(self) -> dict[str, Any]:
        return {"driver_cuda": str(self.driver_cuda) if self.driver_cuda else None, "driver": self.driver,
                "compute_capabilities": list(self.compute_capabilities), "gpu_names": list(self.gpu_names),
                "torch": str(self.torch) if self.torch else None,
                "torch_cuda": str(self.torch_cuda) if self.torch_cuda else None, "os": self.os, "arch": self.arch,
                "gpu_vendor": self.gpu_vendor, "phase": self.phase,
                "packages": dict(self.packages)}


GPU_NAME = re.compile(r"(?<![#/\w])(?:NVIDIA |Tesla |Quadro |GeForce )*(?:RTX ?(?:PRO ?)?\d{4}(?: ?Ti| ?SUPER)?|"
                      r"GTX ?\d{3,4}(?: ?Ti)?|(?:A\d{2,3}|H\d{2,3}|L\d{1,2}S?|V100S?|B[12]00|P100|P40|K80|M40)[A-Z]?"
                      r"(?:-(?:SXM|PCIE)\w*)?|A\d{4}|GH200|GB200|Tesla T4|T4 GPU|Jetson \w+)\b")
BUILD_ARCH_LIST = re.compile(r"supports CUDA capabilities(?:[ \t]+sm_\d{2,3}[a-z]?)+")
"""torch's list of the architectures its build has kernels for (a fact about the build, not the GPU)."""
JETSON_CCS = frozenset({"5.3", "6.2", "7.2", "8.7"})
"""Compute capabilities that only Jetson (Tegra, aarch64) boards have: TX1/Nano, TX2, Xavier, Orin."""
AMD_HINTS = re.compile(r"\b(?:radeon|rocm\d?|gfx\d{3,4}|hip error|hiperror\w*|directml|zluda)\b")
"""Searched in the lower-cased paste."""
NVIDIA_HINTS = re.compile(r"NVIDIA-SMI \d|Driver Version:\s*\d")
LOADING_FRAMES = re.compile(r"from_pretrained|_load_state_dict|load_state_dict_into_meta_model|"
                            r"_load_pretrained_model|dispatch_model|load_checkpoint_and_dispatch|"
                            r"set_module_tensor_to_device|\bmodel\.to\(|\.cuda\(\)|quantize_4bit|_process_model_before|"
                            r"create_quantized_param|Loading checkpoint shards|in convert\s*\n\s*return t\.to\(")
"""Frames of loading or placing the weights (`Module.to`'s `convert` moves the whole model to the GPU)."""
TRAINING_FRAMES = re.compile(r"training_step|\.backward\(|optimizer\.step|_inner_training_loop|compute_loss|"
                             r"torch/autograd/|trainer\.train\(")
PACKAGE_LINE = re.compile(
    r"^(?:\[(?:pip3?|conda)\]\s*|-\s*`?|\s*)"
    r"(?P<name>[A-Za-z][A-Za-z0-9_.\-]*[A-Za-z0-9])`?\s*(?:==|\s+version:\s*|:\s+|\s{2,}|\s+)"
    r"v?(?P<version>\d+(?:\.\d+){1,3}(?:(?:a|b|rc|\.post|\.dev)\d+)?(?:\+[\w.]+)?)\s*$", re.MULTILINE)
WATCHED_IN_PASTES = frozenset({
    "torch", "bitsandbytes", "transformers", "peft", "accelerate", "datasets", "trl", "huggingface-hub",
    "huggingface_hub", "gradio", "gradio-client", "gradio_client", "numpy", "triton", "safetensors", "tokenizers",
    "pydantic", "fsspec", "pyarrow", "deepspeed", "flash-attn", "flash_attn", "xformers", "torchvision",
    "sentence-transformers", "diffusers", "liger-kernel", "unsloth", "vllm", "auto-gptq", "optimum"})


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _cuda_from_int(value: str) -> Version | None:
    """NVIDIA's integer CUDA versions: 11060 -> 11.6, 12020 -> 12.2."""
    number = int(value)
    if not 9000 <= number < 20000:
        return None
    return Version(f"{number // 1000}.{(number % 1000) // 10}")


def read_facts(text: str, gpu_cc: Any = None) -> PasteFacts:
    """Facts from a cleaned paste. `gpu_cc(name) -> "8.6" | None` looks a GPU name up (the GPU table)."""
    driver_cuda = None
    found = re.search(r"found version (\d{4,5})", text)
    if found:
        driver_cuda = _cuda_from_int(found.group(1))
    smi = re.search(r"CUDA Version:\s*(\d+\.\d+)", text)
    if driver_cuda is None and smi:
        driver_cuda = _version(smi.group(1))
    driver = None
    drv = re.search(r"Driver Version(?::|\s+is)\s*(\d{3}\.\d+(?:\.\d+)?)", text, re.IGNORECASE)
    if drv:
        driver = drv.group(1)
    ccs: list[str] = []
    # torch's "The current PyTorch install supports CUDA capabilities sm_50 sm_60 ..." lists the build's kernels,
    # not the GPU: only the GPU's own capability ("with CUDA capability sm_120 is not compatible") is a fact.
    own = BUILD_ARCH_LIST.sub(" ", text)
    for sm in re.findall(r"\bsm_?(\d{2,3})[a-z]?\b", own):
        cc = f"{sm[:-1]}.{sm[-1]}"
        if cc not in ccs and 3 <= int(sm[:-1]) <= 13:
            ccs.append(cc)
    for cc in re.findall(r"(?:compute capability|CUDA capability)(?: among GPUs detected)?[ :]*(?:of )?(\d{1,2})\.(\d)",
                         text, re.IGNORECASE):
        value = f"{cc[0]}.{cc[1]}"
        if value not in ccs:
            ccs.append(value)
    names: list[str] = []
    for match in GPU_NAME.finditer(text):
        name = match.group(0).strip()
        if name not in names:
            names.append(name)
    if gpu_cc is not None:
        for name in names:
            cc = gpu_cc(name)
            if cc and cc not in ccs:
                ccs.append(cc)
    torch_version = torch_cuda = None
    for pattern in (r"(?:PyTorch version|torch version|Torch version)\s*[:=]\s*(\d+\.\d+\.\d+{pre}(?:\+\w+)?)",
                    r"\btorch[=-]=?(\d+\.\d+\.\d+{pre}(?:\+\w+)?)", r"\btorch (\d+\.\d+\.\d+{pre}\+\w+)"):
        # {pre}: a nightly or pre-release (`2.7.0.dev20250310+cu124`, `2.7.0a0+git...`) keeps its CUDA tag
        m = re.search(pattern.replace("{pre}", r"(?:(?:a|b|rc)\d+|\.dev\d+)?"), text)
        if m:
            torch_version = _version(m.group(1))
            break
    if torch_version is not None and torch_version.local:
        local = re.fullmatch(r"cu(\d+)", str(torch_version.local))
        if local:
            digits = local.group(1)
            torch_cuda = _version(f"{digits[:-1]}.{digits[-1]}")
    built = re.search(r"CUDA used to build PyTorch:\s*(\d+\.\d+)", text)
    if torch_cuda is None and built:
        torch_cuda = _version(built.group(1))
    bnb_setup = re.search(r"PyTorch settings found: CUDA_VERSION=(\d{3})\b", text)
    if torch_cuda is None and bnb_setup:   # bitsandbytes' CUDA SETUP reads torch.version.cuda: 124 -> 12.4
        torch_cuda = _version(f"{bnb_setup.group(1)[:-1]}.{bnb_setup.group(1)[-1]}")
    os_name = ("windows" if re.search(r"\b[A-Za-z]:\\\\?[A-Za-z]", text) else
               "darwin" if re.search(r"(/Users/|/opt/homebrew/|/Volumes/|darwin|macOS)", text) else
               "linux" if re.search(r"(/usr/(local/)?lib/python|/home/|/opt/conda/|/root/|linux)", text) else None)
    lowered = text.lower()
    arch = ("aarch64" if "aarch64" in lowered or re.search(r"\b(?:tegra|jetson|l4t)\b", lowered)
            or JETSON_CCS.intersection(ccs) else "x86_64" if re.search(r"x86_64|x86-64|\bamd64\b", text) else None)
    amd = bool(AMD_HINTS.search(lowered))
    nvidia = bool(NVIDIA_HINTS.search(text)) or (gpu_cc is not None and any(gpu_cc(n) for n in names))
    gpu_vendor = "amd" if amd and not nvidia else "nvidia" if nvidia and not amd else None
    phase = _phase(text)
    packages: dict[str, str] = {}
    for m in PACKAGE_LINE.finditer(text):
        name = m.group("name").lower().replace("_", "-")
        if name in {n.replace("_", "-") for n in WATCHED_IN_PASTES}:
            packages.setdefault(name, m.group("version"))
    if torch_version is not None:
        packages.setdefault("torch", str(torch_version))
    return PasteFacts(driver_cuda=driver_cuda, driver=driver, compute_capabilities=tuple(ccs), gpu_names=tuple(names),
                      torch=torch_version, torch_cuda=torch_cuda, os=os_name, arch=arch, gpu_vendor=gpu_vendor,
                      phase=phase, packages=packages)


ERROR_LINE = re.compile(r"^[ \t]*(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b:", re.MULTILINE)


def _phase(text: str) -> str | None:
    """Whether the last error happened while loading the model or in a training step. The frames of the
    traceback nearest the last error line decide (the innermost loading or training frame above it); without
    such frames, the last loading or training frame in the paste's tail."""
    errors = list(ERROR_LINE.finditer(text))
    if errors:
        end = errors[-1].start()
        before = [e.end() for e in errors[:-1] if e.end() <= end]
        window = text[max(before[-1] if before else 0, end - 8000):end]
        nearest = _last_frame(window)
        if nearest is not None:
            return nearest
    lines = text.splitlines()
    return _last_frame("\n".join(lines[-60:]))


def _last_frame(text: str) -> str | None:
    loading = [m.start() for m in LOADING_FRAMES.finditer(text)]
    training = [m.start() for m in TRAINING_FRAMES.finditer(text)]
    if not loading and not training:
        return None
    if loading and (not training or max(loading) > max(training)):
        return "loading"
    return "training"

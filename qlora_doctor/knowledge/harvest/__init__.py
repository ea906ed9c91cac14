"""The harvester: compatibility facts computed from the releases themselves (issue #14, item 2).

    python -m qlora_doctor.knowledge.harvest [--packages peft accelerate ...] [--since 2023-01-01] [--cache DIR]

reads every release since `--since` of the QLoRA stack from PyPI and writes, under
`qlora_doctor/knowledge/data/computed/` (format: data/SCHEMA.md, "computed/"):

- `requires.json`: each release's declared requirements (Requires-Dist, Requires-Python, upload date), from the
  PEP 658 metadata PyPI serves beside each wheel (a few KB a release), for resolving a stack offline;
- `imports.json`: import facts: A's release range imports `name` from B's module at import time (or on the QLoRA
  path), and the releases of B that define it (harvest/analyze.py says how conservatively); and floors stated
  in code but not in metadata (transformers' import-time dependency check).

Downloads are cached under `cache_root()/harvest` (a rerun fetches only what is new) and bounded (`--max-mb`).
CI never runs the full harvest: tests/test_harvest.py harvests a handful of small releases and judges the data
as committed. Stdlib + `packaging` only.
"""

from __future__ import annotations

import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from qlora_doctor.knowledge.harvest.facts import LAST_PATCH_ONLY
from qlora_doctor.knowledge.harvest.analyze import (
    Code,
    Defines,
    ImportSite,
    runtime_imports,
)
from qlora_doctor.knowledge.harvest.floors import Floor, code_floors
from qlora_doctor.knowledge.harvest.pypi import (
    BudgetExceeded,
    Fetcher,
    HarvestError,
    Release,
)

log = logging.getLogger("qlora_doctor.harvest")

OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "computed"

ENTRIES: dict[str, tuple[str, ...]] = {
    "peft": ("peft",),
    "transformers": ("transformers", "transformers.modeling_utils", "transformers.trainer",
                     "transformers.integrations.bitsandbytes", "transformers.utils.bitsandbytes",
                     "transformers.quantizers.auto", "transformers.quantizers.quantizer_bnb_4bit",
                     "transformers.utils.quantization_config", "transformers.models.auto.modeling_auto",
                     "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_fast",
                     "transformers.models.llama.modeling_llama", "transformers.data.data_collator"),
    "trl": ("trl", "trl.trainer.sft_trainer", "trl.trainer.sft_config", "trl.trainer.utils"),
    "accelerate": ("accelerate",),
    "datasets": ("datasets",),
    "gradio": ("gradio",),
    "gradio-client": ("gradio_client",),
}
"""What each importer runs on the QLoRA path: `import A`, plus (for lazy packages) the modules training loads."""

TARGETS = ("transformers", "peft", "accelerate", "huggingface-hub", "safetensors", "tokenizers", "datasets",
           "gradio-client", "fsspec")
"""Packages whose releases are read for the names they define."""

METADATA_ONLY = ("bitsandbytes", "torch", "triton", "numpy", "pyarrow", "torchvision", "torchaudio", "xformers",
                 "sentence-transformers", "diffusers", "timm")
"""Requires-Dist only: their code is large or compiled, and no import fact needs it. torchvision and the rest
are what QLoRA files pin beside the stack: without them the offline resolver (sources/snapshot.py) cannot see
the torch they hold a stack to."""

# LAST_PATCH_ONLY (harvest/facts.py): read the last patch of each minor release only (gradio's wheels are ~40 MB
# and it has ~250 releases); the facts' ranges then end where the next read minor starts (facts.runs).

DEFAULT_PACKAGES = tuple(dict.fromkeys((*ENTRIES, *TARGETS, *METADATA_ONLY)))


@dataclass
class HarvestResult:
    requires: dict[str, dict[str, dict]] = field(default_factory=dict)
    """name -> version -> {requires_dist, requires_python, uploaded}."""
    sites: dict[str, dict[Version, list[ImportSite]]] = field(default_factory=dict)
    """importer -> release -> the imports it runs."""
    floors: dict[str, dict[Version, list[Floor]]] = field(default_factory=dict)
    defines: dict[str, dict[Version, dict[tuple[str, str], bool | None]]] = field(default_factory=dict)
    """target -> release -> (module, name) -> Defines.has: for every name an importer's site asks of it."""
    downloaded_bytes: int = 0
    requests: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)


def select(releases: list[Release], name: str) -> list[Release]:
    usable = [r for r in releases if not r.yanked and r.wheel is not None]
    if name not in LAST_PATCH_ONLY:
        return usable
    last: dict[tuple[int, int], Release] = {}
    for release in usable:
        key = (release.version.major, release.version.minor)
        if key not in last or release.version > last[key].version:
            last[key] = release
    return sorted(last.values(), key=lambda r: r.version)


def harvest(packages: tuple[str, ...], since: str, cache: Path, max_mb: float,
            versions: dict[str, tuple[str, ...]] | None = None, refresh_index: bool = False) -> HarvestResult:
    """Fetch and read the releases; `versions` limits a package to the versions named (the tests' handful)."""
    started = time.monotonic()
    fetcher = Fetcher(cache, int(max_mb * 1e6), refresh_index=refresh_index)
    result = HarvestResult()
    names = [canonicalize_name(p) for p in packages]
    targets_top = {t.replace("-", "_") for t in TARGETS if t in names}
    selected: dict[str, list[Release]] = {}
    for name in names:
        releases = fetcher.releases(name, since)
        if versions and name in versions:
            wanted = {Version(v) for v in versions[name]}
            releases = [r for r in releases if r.version in wanted]
        log.info("%s: %d releases since %s", name, len(releases), since)
        result.requires[name] = _requires(fetcher, releases, result.skipped)
        selected[name] = select(releases, name)
    for name in (n for n in names if n in ENTRIES):  # pass 1: what each importer's releases import
        entries = ENTRIES[name]
        for release in selected[name]:
            code = _code(fetcher, release, result.skipped)
            if code is not None:
                result.sites.setdefault(name, {})[release.version] = runtime_imports(
                    code, entries, targets_top - {entries[0].split(".")[0]})
                result.floors.setdefault(name, {})[release.version] = code_floors(name, code)
        log.info("%s: imports read; %.0f MB downloaded so far", name, fetcher.downloaded / 1e6)
    asked: dict[str, set[tuple[str, str]]] = {}
    for per_release in result.sites.values():
        for sites in per_release.values():
            for site in sites:
                asked.setdefault(canonicalize_name(site.target.split(".")[0]), set()).add((site.target, site.name))
    for name in (n for n in names if n in TARGETS):  # pass 2: which of those names each target release defines
        for release in selected[name]:
            code = _code(fetcher, release, result.skipped)
            if code is None:
                continue
            modules: dict[str, Defines] = {}
            answers = {}
            for module, wanted_name in sorted(asked.get(name, ())):
                if module not in modules:
                    modules[module] = Defines(code, module)
                    answers[(module, "<module>")] = not modules[module].missing
                answers[(module, wanted_name)] = modules[module].has(wanted_name)
            result.defines.setdefault(name, {})[release.version] = answers
        log.info("%s: definitions read; %.0f MB downloaded so far", name, fetcher.downloaded / 1e6)
    result.downloaded_bytes, result.requests = fetcher.downloaded, fetcher.requests
    result.seconds = time.monotonic() - started
    return result


def _requires(fetcher: Fetcher, releases: list[Release], skipped: list[str]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for release in releases:
        try:
            meta = fetcher.metadata(release)
        except BudgetExceeded:
            raise
        except HarvestError as err:
            skipped.append(f"{release.name} {release.version}: metadata: {err}")
            continue
        entry = {"requires_dist": meta["requires_dist"] if meta else None,
                 "requires_python": (meta or {}).get("requires_python") or release.requires_python,
                 "uploaded": release.uploaded}
        if release.yanked:
            entry["yanked"] = True
        found[str(release.version)] = entry
    return found


def _code(fetcher: Fetcher, release: Release, skipped: list[str]) -> Code | None:
    try:
        return Code(fetcher.wheel(release))
    except BudgetExceeded:
        raise
    except (HarvestError, OSError, zipfile.BadZipFile) as err:
        skipped.append(f"{release.name} {release.version}: wheel: {err}")
        return None


__all__ = ["DEFAULT_PACKAGES", "ENTRIES", "OUT_DIR", "TARGETS", "HarvestError", "HarvestResult", "harvest"]

"""The knowledge base: rules and tables from `data/*.toml`, loaded into typed, frozen objects.

Format: `data/SCHEMA.md`. Every row carries its sources. Loading validates everything and reports
all problems at once, so a bad edit to the data fails the tests with the file and the rule id.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.hazards import AttentionScope
from qlora_doctor.core.machine import Machine

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_DIR = Path(__file__).parent / "data"
SEVERITIES = ("fail", "warn", "note")
WORKAROUNDS = {"cudnn_attention_off": "performance.cudnn_attention"}
JUDGED_BY = ("cuda.driver", "cuda.arch", "bnb.cuda", "torch.build")
"""Table checks of qlora_doctor/doctor/environment.py that a rule may duplicate (`judged_by`)."""
"""What `qlora-doctor run` does by itself where a rule with this `workaround` fires (-> the recipe key that
decides it; recipe/levers.py)."""
OSES = ("linux", "windows", "darwin")
VENDORS = ("nvidia", "amd", "apple", "none")
BACKENDS = ("cuda", "rocm", "cpu")
USES = ("fsdp", "merge", "bf16", "tf32", "int8", "triton")
"""What a run may or may not do (`[rule.when] uses`): a rule that only bites when the run shards with FSDP,
merges the adapter, trains in bf16 or tf32, loads in 8 bit or runs Triton kernels. Without a recipe the
doctor cannot tell, so such a rule is a note; with one, it fires only when the run does that
(qlora_doctor/doctor/environment.py `uses_of`)."""


class KnowledgeError(Exception):
    """The shipped data is malformed (a bug in the data, caught by the tests)."""


@dataclass(frozen=True)
class Conditions:
    """`[rule.when]`: all given conditions must hold."""

    packages: tuple[tuple[str, SpecifierSet], ...] = ()
    missing: tuple[str, ...] = ()
    os: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()
    python: SpecifierSet | None = None
    gpu_vendor: tuple[str, ...] = ()
    driver: SpecifierSet | None = None
    compute_capability: SpecifierSet | None = None
    torch_cuda: SpecifierSet | None = None
    torch_backend: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    """The rule only bites when the run does one of these (USES); judged by the doctor, not by `evaluate`."""

    def describe(self) -> str:
        parts = [f"{name}{spec or ' installed'}" for name, spec in self.packages]
        parts += [f"{name} not installed" for name in self.missing]
        for key in ("os", "arch", "gpu_vendor", "torch_backend"):
            values = getattr(self, key)
            if values:
                parts.append(f"{key} in {', '.join(values)}")
        for key in ("python", "driver", "compute_capability", "torch_cuda"):
            spec = getattr(self, key)
            if spec is not None:
                parts.append(f"{key} {spec}")
        if self.uses:
            parts.append(f"the run uses {' or '.join(self.uses)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class ExplainContext:
    """`[rule.explain]`: what else a paste must (or must not) show for this rule to answer it, and facts
    read from the paste (knowledge/paste.py) that must agree where the paste states them."""

    requires: tuple[re.Pattern, ...] = ()
    """Every one of these must be found in the paste."""
    excludes: tuple[re.Pattern, ...] = ()
    """None of these may be found in the paste."""
    driver_cuda: SpecifierSet | None = None
    """The CUDA version the driver reports (`found version 11060` -> 11.6)."""
    phase: str | None = None
    """`loading` or `training`: where the traceback's nearest frames say the error was raised."""
    benign: bool = False
    """A harmless message printed on every run: it answers a paste only when nothing else matches."""


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    severity: str
    cause: str
    fix: str
    sources: tuple[str, ...]
    errors: tuple[str, ...] = ()
    patterns: tuple[re.Pattern, ...] = ()
    when: Conditions | None = None
    """None for explain-only rules: they match pasted errors but never fire in `check`."""
    examples: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    file: str = ""
    workaround: str | None = None
    """One of WORKAROUNDS: what the trainer turns off by itself where the rule fires."""
    workaround_scope: AttentionScope | None = None
    """`workaround_scope`: the only attention calls the bug bites (None: every call)."""
    explain: ExplainContext | None = None
    """`[rule.explain]`: context and paste facts that decide between rules matching the same text."""
    judged_by: str | None = None
    """The id of the table check (JUDGED_BY) that judges the same fact; `check` then shows that row only."""

    def matches_text(self, text: str, normalized: str) -> str | None:
        """The error text or pattern match found in `text` (a pasted log), else None."""
        for error in self.errors:
            if _normalize(error) in normalized:
                return error
        for pattern in self.patterns:
            match = pattern.search(text)
            if match:
                return match.group(0)
        return None


def _normalize(text: str) -> str:
    return " ".join(text.split())


class DriverVersion(Version):
    """An NVIDIA driver version, printed as the driver prints it (`525.60.13`, `580.65.06`: Version would drop
    the zero)."""

    def __str__(self) -> str:
        first, *rest = self.release
        return ".".join([str(first)] + [f"{n:02d}" for n in rest])


@dataclass(frozen=True)
class DriverMin:
    cuda: Version
    toolkit_driver: Version
    minor_compat_driver: Version | None
    sources: tuple[str, ...]


@dataclass(frozen=True)
class TorchArchs:
    torch: SpecifierSet
    cuda: Version
    archs: tuple[str, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class TorchDefaultCuda:
    torch: SpecifierSet
    cuda: str
    """CUDA version of the default PyPI wheel on Linux x86_64 (`cpu` for CPU-only)."""
    sources: tuple[str, ...]


@dataclass(frozen=True)
class BnbCuda:
    bitsandbytes: SpecifierSet
    cuda: tuple[Version, ...]
    sources: tuple[str, ...]
    same_major_fallback: bool = False
    """The release loads the closest shipped library of the same CUDA major when the exact one is missing."""

    def library_for(self, cuda: Version) -> Version | None:
        """The CUDA version of the native library this release loads for torch's CUDA `cuda`, or None."""
        if cuda in self.cuda:
            return cuda
        if not self.same_major_fallback:
            return None
        same = [v for v in self.cuda if v.major == cuda.major]
        lower = [v for v in same if v < cuda]
        return max(lower) if lower else min(same, default=None)


@dataclass(frozen=True)
class GpuModel:
    match: str
    compute_capability: str
    sources: tuple[str, ...]
    memory_gib: tuple[int, ...] = ()
    """The memory sizes the product is sold with (GB as marketed), smallest first; empty when not recorded."""
    host_arch: str = ""
    """The only CPU architecture the product comes with (`aarch64`: Grace, Jetson), or empty."""


@dataclass(frozen=True)
class GpuMemory:
    match: str
    gb: int
    """The size as sold."""
    memory_mib: int
    """The total nvidia-smi reports for it."""
    seen: str
    sources: tuple[str, ...]


_OTHER_PRODUCT = re.compile(r"\s*[- ]?(ti|super|laptop|mobile|max-q)\b", re.I)
"""Words after a product name that make it another product with another memory size (RTX 3060 Ti: 8 GB)."""


@dataclass(frozen=True)
class Tables:
    driver_min: tuple[DriverMin, ...] = ()
    torch_archs: tuple[TorchArchs, ...] = ()
    torch_default_cuda: tuple[TorchDefaultCuda, ...] = ()
    bnb_cuda: tuple[BnbCuda, ...] = ()
    gpu_models: tuple[GpuModel, ...] = ()
    gpu_memory: tuple[GpuMemory, ...] = ()

    def memory_for(self, gpu_name: str, stated_gb: int | None) -> GpuMemory | None:
        """The sourced nvidia-smi total for a product name: rows whose match stands in the name as a whole word,
        not followed by Ti/SUPER/Laptop (another product); the longest match; of its sizes the one the name
        states, or its only one."""
        hits = []
        for row in self.gpu_memory:
            for found in re.finditer(rf"(?<![A-Za-z0-9]){re.escape(row.match)}(?![A-Za-z0-9])", gpu_name, re.I):
                if not _OTHER_PRODUCT.match(gpu_name[found.end():]):
                    hits.append(row)
                    break
        if not hits:
            return None
        longest = max(len(r.match) for r in hits)
        rows = [r for r in hits if len(r.match) == longest]
        if stated_gb is not None:
            return next((r for r in rows if r.gb == stated_gb), None)
        return rows[0] if len(rows) == 1 else None

    def driver_for_cuda(self, cuda: Version) -> DriverMin | None:
        """The row for a CUDA runtime `major.minor` (exact, else the nearest lower minor of the same major)."""
        same_major = [r for r in self.driver_min if r.cuda.major == cuda.major and r.cuda <= cuda]
        return max(same_major, key=lambda r: r.cuda, default=None)

    def archs_for_torch(self, torch_version: Version, cuda: Version) -> TorchArchs | None:
        base = Version(torch_version.base_version)
        rows = [r for r in self.torch_archs if r.cuda == cuda and r.torch.contains(base, prereleases=True)]
        return rows[0] if rows else None

    def default_cuda_for_torch(self, torch_version: Version) -> TorchDefaultCuda | None:
        base = Version(torch_version.base_version)
        rows = [r for r in self.torch_default_cuda if r.torch.contains(base, prereleases=True)]
        return rows[0] if rows else None

    def bnb_cuda_for(self, bnb_version: Version) -> BnbCuda | None:
        base = Version(bnb_version.base_version)
        rows = [r for r in self.bnb_cuda if r.bitsandbytes.contains(base, prereleases=True)]
        return rows[0] if rows else None

    def gpu_model_for(self, gpu_name: str) -> GpuModel | None:
        """The table row for a product name; the longest matching entry wins (`A100` vs `A10`)."""
        name = gpu_name.lower()
        hits = [m for m in self.gpu_models if m.match.lower() in name]
        return max(hits, key=lambda m: len(m.match)) if hits else None

    def compute_capability_for(self, gpu_name: str) -> str | None:
        model = self.gpu_model_for(gpu_name)
        return model.compute_capability if model else None


# --- loading ------------------------------------------------------------------------------------

def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise KnowledgeError(f"{path}: {err}") from err


class _Collector:
    def __init__(self, where: str):
        self.where = where
        self.errors: list[str] = []

    def add(self, message: str) -> None:
        self.errors.append(f"{self.where}: {message}")

    def spec(self, value: Any, key: str) -> SpecifierSet | None:
        if not isinstance(value, str):
            self.add(f"{key}: expected a specifier string, got {value!r}")
            return None
        try:
            return SpecifierSet(value)
        except InvalidSpecifier:
            self.add(f"{key}: invalid specifier {value!r}")
            return None

    def version(self, value: Any, key: str) -> Version | None:
        try:
            return Version(str(value))
        except InvalidVersion:
            self.add(f"{key}: invalid version {value!r}")
            return None

    def sources(self, row: dict[str, Any]) -> tuple[str, ...]:
        sources = row.get("sources")
        if not isinstance(sources, list) or not sources or not all(
                isinstance(s, str) and s.startswith(("http://", "https://")) for s in sources):
            self.add("sources: at least one http(s) URL is required")
            return ()
        return tuple(sources)

    def choices(self, value: Any, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.add(f"{key}: expected a list of strings")
            return ()
        bad = [v for v in value if v not in allowed]
        if bad:
            self.add(f"{key}: {bad} not in {allowed}")
        return tuple(value)


_RULE_KEYS = {"id", "title", "severity", "cause", "fix", "sources", "errors", "patterns", "when", "examples", "explain", "judged_by",
              "workaround", "workaround_scope"}
_WHEN_KEYS = {"packages", "missing", "os", "arch", "python", "gpu_vendor", "driver", "compute_capability",
              "torch_cuda", "torch_backend", "uses"}


def _parse_rule(raw: dict[str, Any], file: str, c: _Collector) -> Rule | None:
    rid = raw.get("id")
    c.where = f"{file}: rule {rid!r}"
    if not isinstance(rid, str) or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9.]+)*", rid):
        c.add("id: expected kebab-case")
    for key in sorted(set(raw) - _RULE_KEYS):
        c.add(f"unknown key {key!r}")
    for key in ("title", "cause", "fix"):
        if not isinstance(raw.get(key), str) or not raw.get(key, "").strip():
            c.add(f"{key}: required text")
    if raw.get("severity") not in SEVERITIES:
        c.add(f"severity: expected one of {SEVERITIES}")
    sources = c.sources(raw)
    errors = raw.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(e, str) and e.strip() for e in errors):
        c.add("errors: expected a list of non-empty strings")
        errors = []
    patterns: list[re.Pattern] = []
    for p in raw.get("patterns", []):
        try:
            patterns.append(re.compile(p, re.MULTILINE))
        except (re.error, TypeError) as err:
            c.add(f"patterns: {p!r}: {err}")
    when = None
    if "when" in raw:
        when = _parse_conditions(raw["when"], c)
    examples = raw.get("examples", {})
    if not isinstance(examples, dict):
        c.add("examples: expected a table")
        examples = {}
    if when is not None and not ({"fires", "clear"} <= set(examples)):
        c.add("examples: rules with [rule.when] need examples.fires and examples.clear")
    if (errors or patterns) and not isinstance(examples.get("log"), str):
        c.add("examples.log: rules with errors/patterns need a log excerpt that explain must match")
    if when is None and not (errors or patterns):
        c.add("a rule needs [rule.when] or errors/patterns, else it can never fire")
    workaround = raw.get("workaround")
    if workaround is not None and (workaround not in WORKAROUNDS or when is None):
        c.add(f"workaround: expected one of {sorted(WORKAROUNDS)}, on a rule with [rule.when]")
        workaround = None
    scope = None
    if "workaround_scope" in raw:
        scope = _parse_scope(raw["workaround_scope"], c)
        if workaround != "cudnn_attention_off":
            c.add("workaround_scope: only with workaround = \"cudnn_attention_off\"")
            scope = None
    explain = _parse_explain(raw["explain"], c) if "explain" in raw else None
    judged_by = raw.get("judged_by")
    if judged_by is not None and ((judged_by not in JUDGED_BY and not str(judged_by).startswith("rule:"))
                                  or when is None):
        c.add(f"judged_by: expected one of {', '.join(JUDGED_BY)} or rule:<id> (a rule whose fix covers this one), "
              "on a rule with [rule.when]")
        judged_by = None
    return Rule(id=str(rid), title=str(raw.get("title", "")), severity=str(raw.get("severity", "")),
                cause=str(raw.get("cause", "")).strip(), fix=str(raw.get("fix", "")).strip(), sources=sources,
                errors=tuple(errors), patterns=tuple(patterns), when=when, examples=examples, file=file,
                workaround=workaround, workaround_scope=scope, explain=explain, judged_by=judged_by)


def _parse_scope(raw: Any, c: _Collector) -> AttentionScope | None:
    """`workaround_scope = { attn_mask = true, key_length_modulo = 128, key_length_remainders = [64] }`."""
    keys = {"attn_mask", "key_length_modulo", "key_length_remainders"}
    if not isinstance(raw, dict) or set(raw) != keys:
        c.add(f"workaround_scope: expected a table with exactly {sorted(keys)}")
        return None
    modulo, remainders, mask = raw["key_length_modulo"], raw["key_length_remainders"], raw["attn_mask"]
    if (not isinstance(mask, bool) or not isinstance(modulo, int) or isinstance(modulo, bool) or modulo < 2
            or not isinstance(remainders, list) or not remainders
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < modulo for r in remainders)):
        c.add("workaround_scope: attn_mask true/false, key_length_modulo an integer >= 2, key_length_remainders "
              "a non-empty list of integers in [0, modulo)")
        return None
    return AttentionScope(attn_mask=mask, modulo=modulo, remainders=tuple(sorted(set(remainders))))


def _parse_explain(raw: Any, c: _Collector) -> ExplainContext | None:
    if not isinstance(raw, dict) or not raw:
        c.add("explain: expected a non-empty table")
        return None
    for key in sorted(set(raw) - {"requires", "excludes", "driver_cuda", "phase", "benign"}):
        c.add(f"explain: unknown key {key!r} (known: requires, excludes, driver_cuda, phase, benign)")
    compiled: dict[str, tuple[re.Pattern, ...]] = {}
    for key in ("requires", "excludes"):
        found = []
        for p in raw.get(key, []):
            try:
                found.append(re.compile(p, re.MULTILINE | re.IGNORECASE))
            except (re.error, TypeError) as err:
                c.add(f"explain.{key}: {p!r}: {err}")
        compiled[key] = tuple(found)
    phase = raw.get("phase")
    if phase is not None and phase not in ("loading", "training"):
        c.add("explain.phase: expected loading or training")
        phase = None
    return ExplainContext(requires=compiled["requires"], excludes=compiled["excludes"],
                          driver_cuda=c.spec(raw["driver_cuda"], "explain.driver_cuda") if "driver_cuda" in raw else None,
                          phase=phase, benign=raw.get("benign") is True)


def _parse_conditions(raw: Any, c: _Collector) -> Conditions | None:
    if not isinstance(raw, dict) or not raw:
        c.add("when: expected a non-empty table")
        return None
    for key in sorted(set(raw) - _WHEN_KEYS):
        c.add(f"when: unknown condition {key!r} (known: {', '.join(sorted(_WHEN_KEYS))})")
    packages: list[tuple[str, SpecifierSet]] = []
    for name, spec in (raw.get("packages") or {}).items():
        parsed = c.spec(spec, f"when.packages.{name}")
        if parsed is not None:
            packages.append((canonical_name(name), parsed))
    missing = raw.get("missing", [])
    if not isinstance(missing, list):
        c.add("when.missing: expected a list of package names")
        missing = []
    return Conditions(
        packages=tuple(packages),
        missing=tuple(canonical_name(m) for m in missing),
        os=c.choices(raw["os"], "when.os", OSES) if "os" in raw else (),
        arch=c.choices(raw["arch"], "when.arch", ("x86_64", "aarch64", "arm64")) if "arch" in raw else (),
        python=c.spec(raw["python"], "when.python") if "python" in raw else None,
        gpu_vendor=c.choices(raw["gpu_vendor"], "when.gpu_vendor", VENDORS) if "gpu_vendor" in raw else (),
        driver=c.spec(raw["driver"], "when.driver") if "driver" in raw else None,
        compute_capability=(c.spec(raw["compute_capability"], "when.compute_capability")
                            if "compute_capability" in raw else None),
        torch_cuda=c.spec(raw["torch_cuda"], "when.torch_cuda") if "torch_cuda" in raw else None,
        torch_backend=(c.choices(raw["torch_backend"], "when.torch_backend", BACKENDS)
                       if "torch_backend" in raw else ()),
        uses=c.choices(raw["uses"], "when.uses", USES) if "uses" in raw else (),
    )


@functools.lru_cache(maxsize=4)
def load_rules(data_dir: Path = DATA_DIR) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    c = _Collector(str(data_dir))
    for path in sorted((data_dir / "rules").glob("*.toml")):
        data = _read_toml(path)
        file = path.name
        for raw in data.get("rule", []):
            rule = _parse_rule(raw, file, c)
            if rule is not None:
                rules.append(rule)
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            c.errors.append(f"{rule.file}: rule {rule.id!r}: duplicate id")
        seen.add(rule.id)
    for rule in rules:
        if rule.judged_by and rule.judged_by.startswith("rule:") and rule.judged_by.removeprefix("rule:") not in seen:
            c.errors.append(f"{rule.file}: rule {rule.id!r}: judged_by {rule.judged_by!r}: no such rule")
    if c.errors:
        raise KnowledgeError("\n".join(c.errors))
    return tuple(rules)


@functools.lru_cache(maxsize=4)
def load_cloud_instances(data_dir: Path = DATA_DIR) -> dict[str, tuple[str, int, str]]:
    """cloud_instances.toml: a GPU cloud instance type (lower case) -> (GPU name, count, the provider's page)."""
    path = data_dir / "cloud_instances.toml"
    if not path.exists():
        return {}
    return {name.lower(): (row["gpu"], int(row["count"]), row["sources"][0])
            for row in _read_toml(path).get("instance", []) for name in row["types"]}


@functools.lru_cache(maxsize=4)
def load_tables(data_dir: Path = DATA_DIR) -> Tables:
    path = data_dir / "cuda.toml"
    if not path.exists():
        return Tables()
    data = _read_toml(path)
    c = _Collector(path.name)
    driver_min, torch_archs, default_cuda, bnb_cuda, gpus = [], [], [], [], []
    for i, row in enumerate(data.get("driver_min", [])):
        c.where = f"{path.name}: driver_min[{i}]"
        cuda, tk = c.version(row.get("cuda"), "cuda"), c.version(row.get("toolkit_driver"), "toolkit_driver")
        mc = c.version(row["minor_compat_driver"], "minor_compat_driver") if row.get("minor_compat_driver") else None
        if cuda and tk:
            driver_min.append(DriverMin(cuda, DriverVersion(str(tk)), DriverVersion(str(mc)) if mc else None,
                                        c.sources(row)))
    for i, row in enumerate(data.get("torch_archs", [])):
        c.where = f"{path.name}: torch_archs[{i}]"
        spec, cuda = c.spec(row.get("torch"), "torch"), c.version(row.get("cuda"), "cuda")
        archs = row.get("archs", [])
        if not archs or not all(isinstance(a, str) and re.fullmatch(r"\d+\.\d+", a) for a in archs):
            c.add("archs: expected a list like [\"8.0\", \"9.0\"]")
        if spec is not None and cuda:
            torch_archs.append(TorchArchs(spec, cuda, tuple(archs), c.sources(row)))
    for i, row in enumerate(data.get("torch_default_cuda", [])):
        c.where = f"{path.name}: torch_default_cuda[{i}]"
        spec = c.spec(row.get("torch"), "torch")
        if spec is not None:
            default_cuda.append(TorchDefaultCuda(spec, str(row.get("cuda")), c.sources(row)))
    for i, row in enumerate(data.get("bnb_cuda", [])):
        c.where = f"{path.name}: bnb_cuda[{i}]"
        spec = c.spec(row.get("bitsandbytes"), "bitsandbytes")
        versions = tuple(v for v in (c.version(x, "cuda") for x in row.get("cuda", [])) if v)
        if spec is not None:
            bnb_cuda.append(BnbCuda(spec, versions, c.sources(row), bool(row.get("same_major_fallback", False))))
    for i, row in enumerate(data.get("gpu_model", [])):
        c.where = f"{path.name}: gpu_model[{i}]"
        cc = str(row.get("compute_capability", ""))
        if not re.fullmatch(r"\d+\.\d+", cc) or not row.get("match"):
            c.add("needs match and compute_capability like \"8.0\"")
        sizes = row.get("memory_gib", [])
        if not isinstance(sizes, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                  for x in sizes):
            c.add(f"gpu_model {row.get('match')!r}: memory_gib: expected a list of whole GB like [40, 80]")
            sizes = []
        host_arch = row.get("host_arch", "")
        if host_arch not in ("", "aarch64"):
            c.add(f"gpu_model {row.get('match')!r}: host_arch: expected \"aarch64\" or nothing, got {host_arch!r}")
            host_arch = ""
        gpus.append(GpuModel(str(row.get("match", "")), cc, c.sources(row), tuple(sorted(sizes)), host_arch))
    memory: list[GpuMemory] = []
    for i, row in enumerate(data.get("gpu_memory", [])):
        c.where = f"{path.name}: gpu_memory[{i}]"
        gb, mib = row.get("gb"), row.get("memory_mib")
        if not row.get("match") or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (gb, mib)):
            c.add("needs match, gb (size as sold) and memory_mib (nvidia-smi's total) as whole numbers")
            continue
        memory.append(GpuMemory(str(row["match"]), gb, mib, str(row.get("seen", "")), c.sources(row)))
    if c.errors:
        raise KnowledgeError("\n".join(c.errors))
    return Tables(tuple(driver_min), tuple(torch_archs), tuple(default_cuda), tuple(bnb_cuda), tuple(gpus),
                  tuple(memory))


def arch_supported(cc: str, archs: tuple[str, ...]) -> bool:
    """A cubin for sm_XY runs on sm_XZ with Z >= Y (same major): the binary-compatibility rule."""
    major, minor = (int(x) for x in cc.split("."))
    for arch in archs:
        a_major, a_minor = (int(x) for x in arch.split("."))
        if a_major == major and a_minor <= minor:
            return True
    return False


# --- the PyTorch CUDA variant a machine's driver runs (lock and the torch.build check agree on it) ---

CUDA_VARIANTS = ("13.0", "12.9", "12.8", "12.6", "12.4", "12.1", "11.8")


def torch_variant_for(machine: Machine, tables: Tables) -> str:
    """`cpu` without an NVIDIA GPU, else the newest PyTorch CUDA variant the driver can run."""
    if machine.gpu_vendor != "nvidia" or not machine.nvidia_gpus or machine.driver_version is None:
        return "cpu"
    driver = machine.driver
    for cuda in CUDA_VARIANTS:
        row = tables.driver_for_cuda(Version(cuda))
        if row is not None and driver >= (row.minor_compat_driver or row.toolkit_driver):
            return "cu" + cuda.replace(".", "")
    return "cpu"


@dataclass(frozen=True)
class TorchChoice:
    version: str
    """e.g. `2.13.0`."""
    variant: str
    """e.g. `cu126`."""
    why: str


def choose_torch_build(machine: Machine, preferred: list[str], tables: Tables) -> TorchChoice | None:
    """The torch build for `machine`: the first version of `preferred` (newest first) with a CUDA variant the
    driver runs that ships kernels for every GPU; of those variants the newest the driver fully supports,
    else the newest it runs under minor-version compatibility."""
    gpus = machine.nvidia_gpus
    if not gpus or machine.driver_version is None or any(g.compute_capability is None for g in gpus):
        return None
    driver = machine.driver
    for version in preferred:
        torch = Version(version)
        rows = [r for r in tables.torch_archs if r.torch.contains(Version(torch.base_version), prereleases=True)]
        def full_support(row) -> bool:  # the driver is the toolkit's own, not only minor-version compatible
            needs = tables.driver_for_cuda(row.cuda)
            return needs is not None and driver >= needs.toolkit_driver

        for row in sorted(rows, key=lambda r: (full_support(r), r.cuda), reverse=True):
            needs = tables.driver_for_cuda(row.cuda)
            if needs is None or driver < (needs.minor_compat_driver or needs.toolkit_driver):
                continue
            if all(arch_supported(g.compute_capability, row.archs) for g in gpus):
                sms = ", ".join(sorted({f"sm_{g.compute_capability.replace('.', '')}" for g in gpus}))
                return TorchChoice(torch.base_version, f"cu{str(row.cuda).replace('.', '')}",
                                   f"CUDA {row.cuda}: driver {machine.driver_version} runs it (>= "
                                   f"{needs.minor_compat_driver or needs.toolkit_driver}) and it ships {sms}")
    return None

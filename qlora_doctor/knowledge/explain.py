"""`qlora-doctor explain`: match a pasted error, traceback or log against the rules, and rank the answers.

    result = explain_text(paste)        # ranked matches, the facts read from the paste
    result.best                         # the one answer shown in full; result.others fold to a line each

Matching (each rule's `errors` and `patterns`) runs on the paste cleaned of copying damage
(knowledge/paste.py): whitespace and line wraps ignored, case and quoting ignored for the error texts.
A rule's `[rule.explain]` table can require context (`requires`, `excludes`: regexes searched in the cleaned
paste) and name facts that decide between rules matching the same text (`driver_cuda = ">=11.0,<12.0"`,
`phase = "loading"`).

Ranking: every candidate starts equal; facts read from the paste (driver, CUDA, GPU and its compute
capability, GPU vendor, CPU architecture, OS, torch build, package versions, loading vs training) that agree
with a rule's conditions (`[rule.when]` and `[rule.explain]`) raise it, facts that contradict them push it to
the bottom; then the more specific match (longer matched text), then where it stands: an error outweighs a
warning, and of two errors the earlier one (the root cause of a chained or cascading failure, the error a
report is about) outweighs the later; then the knowledge base's order.

A match on a warning line is dropped when the paste ends in a traceback that no rule explains, whose error comes
from the user's code or files (ModuleNotFoundError, SyntaxError, FileNotFoundError...), and every match lies
above that traceback: the warning is real but not what failed (e.g. bitsandbytes' CPU-library warning printed
before an unrelated ModuleNotFoundError).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from qlora_doctor.knowledge.computed import explain_import, installed_versions
from qlora_doctor.knowledge.loading import load_rules, load_tables
from qlora_doctor.knowledge.paste import (
    ERROR_LINE,
    Match,
    PasteFacts,
    clean_paste,
    read_facts,
    spaced,
    squeeze,
)

if TYPE_CHECKING:
    from qlora_doctor.knowledge.loading import Rule

SQUEEZED_OUT = re.compile(r"[\s`'\"*]")
"""What `squeeze` removes (paste.py); the index map of _Forms must agree with it."""
CHUNK = 4096
FALLBACK_CHARS = 200_000
# A whole training log can be large; the errors that matter are near its end.
MAX_CHARS = 2_000_000
AGREE, CONTRADICT = 3.0, -20.0
POSITION, WARNING = 1.5, -1.5
"""How much an error matched at the start of the paste gains over one at its end; what a match on a warning
line gets instead."""
WARNING_LINE = re.compile(r"warn", re.IGNORECASE)
UNRELATED_ERROR = re.compile(r"[ \t]*(?:[\w.]+\.)?(?:ModuleNotFoundError|ImportError|SyntaxError|IndentationError|"
                             r"FileNotFoundError|PermissionError)\b")
"""Final errors that a warning printed before them does not cause."""


@dataclass(frozen=True)
class Explanation:
    matches: tuple[Match, ...]
    """Ranked, best first."""
    facts: PasteFacts = field(default_factory=PasteFacts)

    @property
    def best(self) -> Match | None:
        return self.matches[0] if self.matches else None

    @property
    def others(self) -> tuple[Match, ...]:
        return self.matches[1:]

    @property
    def confidence(self) -> str:
        """high: one answer, or the best clearly ahead; medium: a close second; low: the best is contradicted."""
        if not self.matches:
            return "none"
        best = self.matches[0]
        if best.contradicted:
            return "low"
        if len(self.matches) == 1 or best.score - self.matches[1].score >= 2.0:
            return "high"
        return "medium"

    def to_json(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "matches": [m.to_json() for m in self.matches],
                "facts": self.facts.to_json()}


def explain_text(text: str) -> Explanation:
    """Every rule whose error text appears in `text`, ranked. Secrets in the pasted text (tokens, keys) are
    redacted before matching, so a match never quotes one."""
    from qlora_doctor.core.redact import redact

    raw = redact(text[-MAX_CHARS:].replace("\x00", ""))
    cleaned = clean_paste(raw)
    forms = _Forms(raw, cleaned)
    tables = load_tables()
    facts = read_facts(cleaned, tables.compute_capability_for)
    scored: list[tuple[float, int, Match]] = []
    where: dict[str, int] = {}
    for order, rule in enumerate(load_rules()):
        found = _find(rule, forms)
        if found is None:
            continue
        matched, at = found
        if not _context_holds(rule, cleaned):
            continue
        where[rule.id] = at
        agree, contradict, evidence = _judge_facts(rule, facts, tables)
        score = 10.0 + AGREE * agree + CONTRADICT * contradict + _placement(matched, at, cleaned)
        if rule.explain is not None and rule.explain.benign:
            score -= 10.0  # a harmless message every run prints: the answer only when nothing else matches
        scored.append((score, -order, Match(rule.id, rule.title, rule.cause, rule.fix, rule.sources, matched,
                                            score=score, evidence=tuple(evidence), contradicted=contradict > 0)))
    stale = _stale_warnings(cleaned, where)
    scored = [item for item in scored if item[2].id not in stale]
    if not scored:  # no hand-written rule: a "cannot import name" answered from the harvested facts
        scored = [(a.score, 0, a) for a in explain_import(cleaned, facts.packages, installed_versions())]
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return Explanation(matches=tuple(m for _, _, m in scored), facts=facts)


def _placement(matched: str, at: int, cleaned: str) -> float:
    """What the matched text adds to a rule's score: a longer match is a more specific answer; an error
    outweighs a warning; of two errors the earlier one (a chained or cascading failure's root cause, the
    error a report is about) outweighs the later."""
    specificity = min(len(matched), 120) / 40
    if _on_warning_line(cleaned, at):
        return specificity + WARNING
    return specificity + POSITION * (1 - at / max(len(cleaned), 1))


def _on_warning_line(cleaned: str, at: int) -> bool:
    start = cleaned.rfind("\n", 0, at) + 1
    end = cleaned.find("\n", at)
    return bool(WARNING_LINE.search(cleaned[start:end if end >= 0 else None]))


def _stale_warnings(cleaned: str, where: dict[str, int]) -> set[str]:
    """The rules matched only on warning lines above a final traceback that no rule matched and whose error
    comes from the user's code or files (a missing module, a syntax error, a missing file), so it cannot be
    a consequence of the warning."""
    errors = list(ERROR_LINE.finditer(cleaned))
    if not errors or not where or not UNRELATED_ERROR.match(cleaned, errors[-1].start()):
        return set()
    traceback = cleaned.rfind("Traceback (most recent call last)", 0, errors[-1].start())
    if traceback < 0 or max(where.values()) >= traceback:
        return set()
    return {rule_id for rule_id, at in where.items() if _on_warning_line(cleaned, at)}


class _Forms:
    """The paste in the forms matching needs, computed once."""

    def __init__(self, raw: str, cleaned: str):
        # The forms that undo line wraps (`spaced`) and the uncleaned text are searched in the paste's tail only:
        # copy damage is a property of short pastes, and a long log's errors are near its end.
        self.tail = max(len(cleaned) - FALLBACK_CHARS, 0)
        self.raw = raw[-FALLBACK_CHARS:]
        self.cleaned = cleaned
        self.spaced = spaced(cleaned[self.tail:])
        self.raw_differs = self.raw != cleaned[self.tail:]
        # Squeezed chunk by chunk (squeezing works character by character), so that a position in `squeezed`
        # maps back to `cleaned` by walking one chunk.
        parts = [squeeze(cleaned[i:i + CHUNK]) for i in range(0, len(cleaned), CHUNK)]
        self.squeezed = "".join(parts)
        self._chunk_starts: list[int] = []
        kept = 0
        for part in parts:
            self._chunk_starts.append(kept)
            kept += len(part)

    def origin(self, at: int) -> int:
        """The index in `cleaned` of the character at `at` in `squeezed`."""
        chunk = max(bisect.bisect_right(self._chunk_starts, at) - 1, 0)
        base, need, seen = chunk * CHUNK, at - (self._chunk_starts[chunk] if self._chunk_starts else 0), 0
        for offset, char in enumerate(self.cleaned[base:base + CHUNK]):
            if not SQUEEZED_OUT.fullmatch(char):
                seen += len(char.lower())
                if seen > need:
                    return base + offset
        return max(min(base + CHUNK, len(self.cleaned)) - 1, 0)

    def in_cleaned(self, fraction: float) -> int:
        """The index in `cleaned` of a position (0 to 1) in the tail's `spaced` or `raw` form."""
        length = len(self.cleaned) - self.tail
        return self.tail + min(int(fraction * length), max(length - 1, 0))


def _find(rule: Rule, forms: _Forms) -> tuple[str, int] | None:
    """(the matched text, its index in the cleaned paste) for the rule's error text or pattern that ranks it
    highest (`_placement`), else None. An error text is found at its last occurrence, a pattern at its last match."""
    found: list[tuple[str, int]] = []
    for error in rule.errors:
        key = squeeze(error)
        if len(key) >= 8:
            at = forms.squeezed.rfind(key)
            if at >= 0:
                found.append((error, forms.origin(at)))
        elif spaced(error) in forms.spaced:
            fraction = forms.spaced.rfind(spaced(error)) / max(len(forms.spaced), 1)
            found.append((error, forms.in_cleaned(fraction)))
    for pattern in rule.patterns:
        for text in (forms.cleaned, forms.spaced, forms.raw) if forms.raw_differs else (forms.cleaned, forms.spaced):
            last = None
            for last in pattern.finditer(text):
                pass
            if last is not None:
                at = last.start() if text is forms.cleaned else forms.in_cleaned(last.start() / max(len(text), 1))
                found.append((last.group(0), at))
                break
    return max(found, key=lambda f: _placement(f[0], f[1], forms.cleaned), default=None)


def _context_holds(rule: Rule, text: str) -> bool:
    explain = rule.explain
    if explain is None:
        return True
    if any(not p.search(text) for p in explain.requires):
        return False
    return not any(p.search(text) for p in explain.excludes)


def _judge_facts(rule: Rule, facts: PasteFacts, tables: Any) -> tuple[int, int, list[str]]:
    """(conditions the paste's facts agree with, conditions they contradict, the evidence in words)."""
    agree, contradict, evidence = 0, 0, []

    def judge(name: str, fact: Any, holds: bool) -> None:
        nonlocal agree, contradict
        if holds:
            agree += 1
            evidence.append(f"{name} {fact} fits")
        else:
            contradict += 1
            evidence.append(f"{name} {fact} contradicts")

    explain = rule.explain
    if explain is not None:
        if explain.driver_cuda is not None and facts.driver_cuda is not None:
            judge("the driver's CUDA", facts.driver_cuda, facts.driver_cuda in explain.driver_cuda)
        if explain.phase and facts.phase:
            judge("the failing phase", facts.phase, facts.phase == explain.phase)
    when = rule.when
    if when is None:
        return agree, contradict, evidence
    if when.compute_capability is not None and facts.compute_capabilities:
        fits = [cc for cc in facts.compute_capabilities if Version(cc) in when.compute_capability]
        judge("compute capability", ", ".join(facts.compute_capabilities), bool(fits))
    if when.torch_cuda is not None and facts.torch_cuda is not None:
        judge("torch's CUDA", facts.torch_cuda, facts.torch_cuda in when.torch_cuda)
    if when.driver is not None:
        driver = _driver(facts, tables)
        if driver is not None:
            judge("the driver", driver, driver in when.driver)
    if when.os and facts.os:
        judge("the OS", facts.os, facts.os in when.os)
    if when.arch and facts.arch:
        judge("the CPU architecture", facts.arch, facts.arch in when.arch or
              (facts.arch == "aarch64" and "arm64" in when.arch))
    if when.gpu_vendor and facts.gpu_vendor:
        judge("the GPU vendor", facts.gpu_vendor, facts.gpu_vendor in when.gpu_vendor)
    if when.torch_backend and facts.torch is not None and facts.torch.local:
        backend = "cpu" if str(facts.torch.local) == "cpu" else "rocm" if "rocm" in str(facts.torch.local) else "cuda"
        judge("torch's build", backend, backend in when.torch_backend)
    for name, spec in when.packages:
        version = facts.packages.get(name)
        if version is not None:
            try:
                holds = Version(version) in spec if str(spec) else True
            except ValueError:
                continue
            judge(name, version, holds)
    return agree, contradict, evidence


def _driver(facts: PasteFacts, tables: Any) -> Version | None:
    """The driver version the paste names, else the lowest driver that supports the CUDA version it reports."""
    if facts.driver:
        return Version(facts.driver)
    if facts.driver_cuda is None:
        return None
    row = tables.driver_for_cuda(facts.driver_cuda)
    if row is None:
        return None
    return row.toolkit_driver

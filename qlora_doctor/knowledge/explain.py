"""`qlora-doctor explain`: match a pasted error, traceback or log against the rules, and rank the answers.

    result = explain_text(paste)        # ranked matches, the facts read from the paste
    result.best                         # the one answer shown in full; result.others fold to a line each

Matching (each rule's `errors` and `patterns`) runs on the paste cleaned of copying damage
(knowledge/paste.py): whitespace and line wraps ignored, case and quoting ignored for the error texts.
A rule's `[rule.explain]` table can require context (`requires`, `excludes`: regexes) and facts
(`facts`: e.g. `driver_cuda = ">=11.0,<12.0"`, `phase = "loading"`).

Ranking: every candidate starts equal; facts read from the paste (driver, CUDA, GPU and its compute
capability, torch build, package versions, loading vs training) that agree with a rule's conditions
(`[rule.when]` and `[rule.explain].facts`) raise it, facts that contradict them push it to the bottom;
then the more specific match (longer matched text), then the later one in the paste (the final error
outweighs an early warning), then the knowledge base's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from qlora_doctor.knowledge.loading import load_rules, load_tables
from qlora_doctor.knowledge.paste import PasteFacts, clean_paste, read_facts, spaced, squeeze

if TYPE_CHECKING:
    from qlora_doctor.knowledge.loading import Rule

# A whole training log can be large; the errors that matter are near its end.
MAX_CHARS = 2_000_000
AGREE, CONTRADICT = 3.0, -20.0


@dataclass(frozen=True)
class Match:
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
    for order, rule in enumerate(load_rules()):
        found = _find(rule, forms)
        if found is None:
            continue
        matched, position = found
        if not _context_holds(rule, cleaned):
            continue
        agree, contradict, evidence = _judge_facts(rule, facts, tables)
        score = 10.0 + AGREE * agree + CONTRADICT * contradict
        score += min(len(matched), 120) / 40          # a longer matched text is a more specific answer
        score += 1.5 * position                        # the final error outweighs an early warning
        scored.append((score, -order, Match(rule.id, rule.title, rule.cause, rule.fix, rule.sources, matched,
                                            score=score, evidence=tuple(evidence), contradicted=contradict > 0)))
    scored.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return Explanation(matches=tuple(m for _, _, m in scored), facts=facts)


class _Forms:
    """The paste in the forms matching needs, computed once."""

    def __init__(self, raw: str, cleaned: str):
        self.raw = raw
        self.cleaned = cleaned
        self.spaced = spaced(cleaned)
        self.squeezed = squeeze(cleaned)
        self.length = max(len(self.squeezed), 1)


def _find(rule: Rule, forms: _Forms) -> tuple[str, float] | None:
    """(the matched text, its position in the paste from 0 to 1) for the rule's earliest-listed error text
    or pattern found, else None."""
    for error in rule.errors:
        key = squeeze(error)
        if len(key) >= 8:
            at = forms.squeezed.rfind(key)
            if at >= 0:
                return error, at / forms.length
        elif spaced(error) in forms.spaced:
            return error, forms.spaced.rfind(spaced(error)) / max(len(forms.spaced), 1)
    for pattern in rule.patterns:
        for text in (forms.cleaned, forms.spaced, forms.raw):
            found = None
            for found in pattern.finditer(text):
                pass
            if found is not None:
                return found.group(0), found.start() / max(len(text), 1)
    return None


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

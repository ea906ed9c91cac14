"""`qlora-doctor explain`: match a pasted error, traceback or log against the rules' error texts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_doctor.doctor.knowledge import _normalize, load_rules

# A whole training log can be large; the errors that matter are near its end.
MAX_CHARS = 2_000_000


@dataclass(frozen=True)
class Match:
    id: str
    title: str
    cause: str
    fix: str
    sources: tuple[str, ...]
    matched: str
    """The error text (or the pattern's match) found in the pasted text."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "cause": self.cause, "fix": self.fix,
                "sources": list(self.sources), "matched": self.matched}


def explain_text(text: str) -> list[Match]:
    """Every rule whose error text appears in `text`, in the order they first appear in it.

    Secrets in the pasted text (tokens, keys) are redacted before matching, so a match never quotes one."""
    from qlora_doctor.redact import redact

    text = redact(text[-MAX_CHARS:].replace("\x00", ""))
    normalized = _normalize(text)
    found: list[tuple[int, Match]] = []
    for rule in load_rules():
        matched = rule.matches_text(text, normalized)
        if matched is None:
            continue
        position = normalized.find(_normalize(matched))
        found.append((position if position >= 0 else len(normalized),
                      Match(rule.id, rule.title, rule.cause, rule.fix, rule.sources, matched)))
    found.sort(key=lambda pair: pair[0])
    return [m for _, m in found]

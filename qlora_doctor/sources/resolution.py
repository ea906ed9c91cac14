"""A resolver's answer for a requirements file, whichever resolver gave it (uv, pip, a PEP 751 lock)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Resolution:
    pins: dict[str, str]
    """Every package of the closure -> its version (canonical names)."""
    pulled_by: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """A package the file does not name -> who required it (`torch 2.6.0`)."""
    named: tuple[str, ...] = ()
    """The packages the file itself asks for."""
    resolver: str = ""
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None
    """The resolver's reason in one line when the file cannot install on the machine."""
    substitutions: tuple[str, ...] = ()
    """What was changed to resolve the file here (an index out of reach, a git URL kept by name), one line each."""
    unknown: tuple[str, ...] = ()
    """Packages the file installs whose version nobody here can know (a git URL out of reach)."""
    offline: bool = False
    """No package index answered: an error then says nothing about the file itself."""

    def to_json(self) -> dict:
        return {"resolver": self.resolver, "seconds": self.seconds, "cached": self.cached, "error": self.error,
                "pins": self.pins, "pulled_by": {k: list(v) for k, v in self.pulled_by.items()},
                "named": list(self.named), "substitutions": list(self.substitutions), "unknown": list(self.unknown),
                "offline": self.offline}

    @classmethod
    def from_json(cls, data: dict, cached: bool = True) -> Resolution:
        return cls(pins=dict(data["pins"]), pulled_by={k: tuple(v) for k, v in data.get("pulled_by", {}).items()},
                   named=tuple(data.get("named", ())), resolver=data.get("resolver", ""),
                   seconds=data.get("seconds", 0.0), cached=cached, error=data.get("error"),
                   substitutions=tuple(data.get("substitutions", ())), unknown=tuple(data.get("unknown", ())),
                   offline=bool(data.get("offline", False)))


def reason(stderr: str) -> str:
    """The resolver's refusal in one line (uv explains conflicts over several)."""
    lines = [re.sub(r"^[\s×╰─▶│]+", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line and not line.startswith("hint:")]
    text = " ".join(lines)
    return (text[:400] + "...") if len(text) > 400 else text or "the resolver failed without a message"

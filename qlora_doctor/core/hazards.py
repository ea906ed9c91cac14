"""Known-broken attention kernels, as the knowledge base states them and the trainer acts on them: a rule with
`workaround = "cudnn_attention_off"` becomes an AttentionHazard, and its `workaround_scope` (when the rule has
one) says which attention calls the bug bites, so `run` can keep the fast kernel for every other call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AttentionScope:
    """The calls a cuDNN attention bug bites: with an explicit mask (when `attn_mask`) and a key length L with
    L % modulo in remainders (pytorch/pytorch#196678: masked, L % 128 == 64)."""

    attn_mask: bool
    modulo: int
    remainders: tuple[int, ...]

    def bites(self, key_length: int, has_mask: bool) -> bool:
        return (has_mask or not self.attn_mask) and key_length % self.modulo in self.remainders

    def describe(self) -> str:
        lengths = " or ".join(f"L % {self.modulo} == {r}" for r in self.remainders)
        return ("calls with an attention mask and " if self.attn_mask else "calls with ") + f"key length {lengths}"

    def to_json(self) -> dict[str, Any]:
        return {"attn_mask": self.attn_mask, "key_length_modulo": self.modulo,
                "key_length_remainders": list(self.remainders)}


@dataclass(frozen=True)
class AttentionHazard:
    """One firing rule: `text` is "rule-id: title"; `scope` None means every call is at risk."""

    text: str
    scope: AttentionScope | None = None

    def __str__(self) -> str:
        return self.text

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.text, "scope": self.scope.to_json() if self.scope else None}

    @classmethod
    def from_json(cls, data: Any) -> AttentionHazard:
        """A run plan's entry: {"rule", "scope"}, or a bare string (plans written before scopes existed)."""
        if isinstance(data, str):
            return cls(data)
        scope = data.get("scope")
        return cls(str(data["rule"]), AttentionScope(bool(scope["attn_mask"]), int(scope["key_length_modulo"]),
                                                     tuple(int(r) for r in scope["key_length_remainders"]))
                   if scope else None)


def scoped(hazards: tuple[AttentionHazard, ...] | None) -> bool:
    """Whether every hazard is limited to some calls (so cuDNN attention can stay on for the rest)."""
    return bool(hazards) and all(h.scope is not None for h in hazards)

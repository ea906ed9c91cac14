"""Knowledge-base rules that name a workaround the product applies by itself (`workaround = "..."` in
the rules' data), evaluated for one machine and environment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlora_doctor.core.hazards import AttentionHazard
from qlora_doctor.knowledge.evaluate import evaluate_rule
from qlora_doctor.knowledge.loading import load_rules

if TYPE_CHECKING:
    from qlora_doctor.core.environment import Environment
    from qlora_doctor.core.machine import Machine


def cudnn_attention_hazards(machine: Machine, env: Environment) -> tuple[AttentionHazard, ...]:
    """Every knowledge-base rule with `workaround = "cudnn_attention_off"` that fires for `machine` and `env`
    (installed, or described by a requirements file), by the doctor's own rule evaluation: `rule-id: title`
    with the rule's `workaround_scope` (the calls it bites; None: all)."""

    rules = [r for r in load_rules() if r.workaround == "cudnn_attention_off"]
    if not rules or machine.gpu_vendor != "nvidia":
        return ()
    return tuple(AttentionHazard(f"{r.id}: {r.title}", r.workaround_scope)
                 for r in rules if evaluate_rule(r, machine, env).outcome == "fires")

"""`check --smoke`: the functional test in a subprocess, as one check (qlora_doctor/smoke/judge.py)."""

from __future__ import annotations

from qlora_doctor.core.report import Check
from qlora_doctor.smoke.judge import judge_smoke, run_smoke_process


def smoke_check(timeout_s: float = 180) -> Check:
    return judge_smoke(run_smoke_process(timeout_s), timeout_s)

"""The seconds-long functional test (`qlora-doctor smoke`, functional.py) and the judging of its result
from a subprocess (judge.py)."""

from qlora_doctor.smoke.functional import SmokeResult, SmokeStep, run_smoke

__all__ = ["SmokeResult", "SmokeStep", "run_smoke"]

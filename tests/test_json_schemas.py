"""The --json documents match their published schemas (qlora_doctor/core/schemas.py, `qlora-doctor schema
--report NAME`), for a passing, a failing and an unreadable case each (issue #17)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from qlora_doctor.cli import cli
from qlora_doctor.core.schemas import validate
from tests.helpers import write_machine


def _doc(args: list[str]) -> dict:
    result = CliRunner().invoke(cli, args)
    return json.loads(result.stdout)


def test_check_reports_match_their_schema(tmp_path):
    validate("check", _doc(["check", "--json"]))
    t4 = write_machine(tmp_path / "t4.json", gpus=[{"name": "Tesla T4", "compute_capability": "7.5"}],
                       driver_version="470.82.01")
    req = tmp_path / "r.txt"
    req.write_text("torch==2.5.1+cu124\nbitsandbytes==0.45.0\ntransformers==4.46.3\n")
    failing = _doc(["check", "--json", "--machine", str(t4), "-r", str(req), "--no-resolve"])
    assert failing["status"] == "fail"
    validate("check", failing)


def test_explain_and_error_documents_match_their_schemas(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("RuntimeError: The NVIDIA driver on your system is too old (found version 11060).")
    validate("explain", _doc(["explain", "--json", str(log)]))
    validate("error", _doc(["validate", str(tmp_path / "missing.yaml"), "--json"]))


def test_a_document_with_an_unknown_field_is_rejected():
    with pytest.raises(ValidationError):
        validate("error", {"schema_version": 1, "status": "error", "exit_code": 2, "errors": [], "surprise": 1})


def test_the_schemas_are_published():
    schema = json.loads(CliRunner().invoke(cli, ["schema", "--report", "check"]).stdout)
    assert "checks" in schema["properties"] and "schema_version" in schema["required"]

"""`check -r FILE` judges what installing FILE really gives (issue #14): uv's closure, with who pulled what.

A real case (tests/data/pinsets/02-edgetam-gradio444-hub1.txt, https://github.com/facebookresearch/EdgeTAM/issues/20):
gradio==4.44.0 pinned, huggingface_hub left to pip; from November 2025 pip pulls huggingface_hub 1.x, which
removed HfFolder that gradio 4 imports. The file's lines alone break no rule; the closure does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.version import Version

from qlora_doctor.cli import cli
from qlora_doctor.core.machine import machine_from_dict
from qlora_doctor.sources.resolve import find_uv, parse_compiled, resolve_requirements

DATA = Path(__file__).parent / "data"
CPU = {"os": "linux", "arch": "x86_64", "python": "3.11.9", "driver_version": None, "gpus": []}


def test_parse_compiled_names_who_pulled_each_package():
    text = (DATA / "resolved" / "uv-compile-gradio-4.44.0-2025-11-16.txt").read_text()
    pins, who = parse_compiled(text)
    assert pins["gradio"] == "4.44.0" and pins["huggingface-hub"].startswith("1.")
    assert who["gradio"] == ["-r gradio.txt"]
    assert who["huggingface-hub"] == ["gradio 4.44.0", f"gradio-client {pins['gradio-client']}"]


def test_a_cached_resolution_answers_without_the_resolver(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "r.txt"
    req.write_text("gradio==4.44.0\n")
    machine = machine_from_dict(CPU, "cpu")
    fake_uv = tmp_path / "uv"
    fake_uv.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0'; exit 0; fi\n"
                       f"cat {DATA / 'resolved' / 'uv-compile-gradio-4.44.0-2025-11-16.txt'}\n")
    fake_uv.chmod(0o755)
    first = resolve_requirements(req, machine, as_of="2025-11-16", uv=str(fake_uv))
    assert not first.cached and first.pins["huggingface-hub"].startswith("1.")
    fake_uv.unlink()
    again = resolve_requirements(req, machine, as_of="2025-11-16", uv=str(tmp_path / "gone"))
    assert again.cached and again.pins == first.pins


@pytest.mark.skipif(find_uv() is None and shutil.which("uv") is None, reason="uv is not installed")
def test_check_r_fails_a_stack_on_a_package_it_does_not_pin(tmp_path, monkeypatch):
    """Network: uv resolves against PyPI as of the date the thread reported the break."""
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("gradio==4.44.0\n")
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps(CPU))
    resolved = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--as-of", "2025-11-16",
                                        "--json"])
    report = json.loads(resolved.stdout)
    ids = {c["id"]: c for c in report["checks"]}
    assert "rule:hub-hffolder-gradio" in ids and ids["rule:hub-hffolder-gradio"]["status"] == "fail", ids.keys()
    assert "huggingface-hub 1." in ids["packages.resolved"]["detail"] and "required by gradio" in \
        ids["packages.resolved"]["detail"]
    lines_only = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--no-resolve", "--json"])
    assert "rule:hub-hffolder-gradio" not in {c["id"] for c in json.loads(lines_only.stdout)["checks"]}


def test_a_file_that_cannot_install_fails_with_the_resolvers_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    fake_uv = tmp_path / "uv"
    fake_uv.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0'; exit 0; fi\n"
                       "echo '  x No solution found when resolving dependencies:' >&2\n"
                       "echo '  `-> Because you require torch==2.6.0 and torch==2.5.1, we can conclude that your "
                       "requirements are unsatisfiable.' >&2\nexit 1\n")
    fake_uv.chmod(0o755)
    req = tmp_path / "r.txt"
    req.write_text("torch==2.6.0\ntorch==2.5.1\n")
    result = resolve_requirements(req, machine_from_dict(CPU, "cpu"), uv=str(fake_uv))
    assert result.error and "unsatisfiable" in result.error and "\n" not in result.error


def test_an_unresolvable_file_judges_unpinned_names_as_unknown_not_missing(tmp_path, monkeypatch):
    """A file with a git URL (the resolver cannot read it here) that names accelerate without a version:
    accelerate will be installed, so 'accelerate missing' must not fire; its version is simply unknown."""
    from qlora_doctor.doctor.resolved import resolved_environment
    from qlora_doctor.knowledge.evaluate import evaluate_rules
    from qlora_doctor.knowledge.loading import load_rules

    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    fake_uv = tmp_path / "uv"
    fake_uv.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0'; exit 0; fi\n"
                       "echo 'error: Git operation failed' >&2\nexit 2\n")
    fake_uv.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    req = tmp_path / "r.txt"
    req.write_text("transformers==4.34.1\naccelerate\ngit+https://github.com/NVlabs/nvdiffrast/\n")
    machine = machine_from_dict(CPU, "cpu")
    env, checks = resolved_environment(req, machine)
    assert checks[0].status == "unknown" and "Git operation failed" in checks[0].detail
    assert "accelerate" in env.unpinned
    fired = {r.rule.id for r in evaluate_rules(load_rules(), machine, env) if r.outcome == "fires"}
    assert "accel-missing" not in fired


def test_without_a_resolver_ranges_are_judged_not_refused(tmp_path, monkeypatch):
    """No uv on the machine: the file's exact pins are judged, its ranges are known names of unknown version,
    and the report says the pulled packages were not judged (no exit 2 for a range)."""
    import qlora_doctor.sources.resolve as resolve_mod
    from qlora_doctor.doctor.resolved import resolved_environment

    monkeypatch.setattr(resolve_mod, "find_uv", lambda: None)  # the machine fact: no resolver installed
    req = tmp_path / "r.txt"
    req.write_text("transformers>=4.46,<5\npeft==0.13.2\n")
    env, checks = resolved_environment(req, machine_from_dict(CPU, "cpu"))
    assert checks[0].status == "unknown" and "pip install uv" in checks[0].fix
    assert env.version("peft") == Version("0.13.2") and "transformers" in env.unpinned

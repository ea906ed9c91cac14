"""`check -r` with no package index: resolved over qlora-doctor's bundled snapshot of PyPI metadata (issue #14,
sources/snapshot.py). Offline and fast: every test here reads only the shipped snapshot (and uv, offline, for the
fallback test).

The expected versions are uv's answers for the same files, dates and Pythons, taken while PyPI answered
(UV_COMMAND); files where a package outside the snapshot changes uv's answer are in
bench/results/snapshot_resolve.json, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from qlora_doctor.cli import cli
from qlora_doctor.core.environment import canonical_name
from qlora_doctor.core.machine import machine_from_dict
from qlora_doctor.sources.reqfile import prepare_requirements
from qlora_doctor.sources.resolve import resolve_requirements
from qlora_doctor.sources.snapshot import (
    RESOLVER,
    Need,
    resolve_needs,
    resolve_prepared,
    snapshot_releases,
)

PINSETS = Path(__file__).parent / "data" / "pinsets"
UNREACHABLE = lambda host, port: False


def cpu(python: str = "3.11.9", os: str = "linux", arch: str = "x86_64"):
    return machine_from_dict({"os": os, "arch": arch, "python": python, "driver_version": None, "gpus": []}, "cpu")


UV_COMMAND = ("uv 0.13.9 on 2026-12-05, PyPI reachable: resolve_requirements(FILE, machine(python=PY, linux x86_64), "
              "as_of=DATE), i.e. `uv pip compile FILE --python-version PY --python-platform x86_64-manylinux_2_28 "
              "--exclude-newer DATET23:59:59Z`; for 01 the file's snapshot lines only (below)")
UV_ANSWERS = {
    # file: (as of, Python, uv's versions of the snapshot's packages, those uv got through a package outside it)
    "02-edgetam-gradio444-hub1.txt": ("2025-11-16", "3.11", {
        "fsspec": "2025.10.0", "gradio": "4.44.0", "gradio-client": "1.3.0", "huggingface-hub": "1.1.4",
        "numpy": "2.3.5", "safetensors": "0.6.2", "timm": "1.0.15", "torch": "2.9.1", "torchvision": "0.24.1",
        "triton": "3.5.1"}, set()),
    "05-sagemaker-llm-datasets213-fsspec.txt": ("2024-05-29", "3.10", {
        "datasets": "2.13.0", "fsspec": "2024.5.0", "gradio": "3.50.2", "gradio-client": "0.6.1",
        "huggingface-hub": "0.17.3", "numpy": "1.26.4", "pyarrow": "16.1.0", "safetensors": "0.4.3",
        "tokenizers": "0.14.1", "transformers": "4.34.0"}, set()),
    "09-qwen-finetune-tf432-accelerate1.txt": ("2024-10-24", "3.10", {
        "accelerate": "1.0.1", "fsspec": "2024.10.0", "huggingface-hub": "0.26.1", "numpy": "2.1.2",
        "peft": "0.7.1", "safetensors": "0.4.5", "tokenizers": "0.15.2", "torch": "2.5.0",
        "transformers": "4.37.2", "triton": "3.1.0"}, set()),
    "16-colab-llama2-qlora-bf16-t4.txt": ("2023-09-01", "3.10", {
        "accelerate": "0.21.0", "bitsandbytes": "0.40.2", "datasets": "2.13.0", "fsspec": "2023.6.0",
        "huggingface-hub": "0.16.4", "numpy": "1.25.2", "peft": "0.4.0", "pyarrow": "13.0.0",
        "safetensors": "0.3.3", "tokenizers": "0.13.3", "torch": "2.0.1", "transformers": "4.31.0",
        "triton": "2.0.0", "trl": "0.4.7"}, set()),
    "18-instantmesh-tf4341-accelerate032.txt": ("2024-07-08", "3.10", {
        "accelerate": "0.32.1", "bitsandbytes": "0.43.1", "diffusers": "0.20.2", "fsspec": "2024.6.1",
        "gradio": "3.41.2", "gradio-client": "0.5.0", "huggingface-hub": "0.17.3", "numpy": "1.26.4",
        "safetensors": "0.4.3", "tokenizers": "0.14.1", "torch": "2.3.1", "transformers": "4.34.1",
        "triton": "2.3.1"}, set()),
    "23-whisper-finetune-tf-open-eval-strategy.txt": ("2025-04-28", "3.11", {
        "accelerate": "1.6.0", "bitsandbytes": "0.45.5", "datasets": "3.5.1", "fsspec": "2025.3.0",
        "huggingface-hub": "0.30.2", "numpy": "2.2.5", "peft": "0.15.2", "pyarrow": "20.0.0",
        "safetensors": "0.5.3", "tokenizers": "0.21.1", "torch": "2.7.0", "transformers": "4.51.3",
        "triton": "3.3.0"}, set()),
}
AUTOTRAIN = "01-autotrain-bnb045-triton32.txt"
AUTOTRAIN_UV = {  # uv, as above, on the file's lines naming snapshot packages, as of 2025-04-15, Python 3.11
    "accelerate": "1.2.1", "bitsandbytes": "0.45.0", "datasets": "3.2.0", "fsspec": "2024.9.0",
    "huggingface-hub": "0.27.0", "numpy": "2.2.4", "peft": "0.14.0", "pyarrow": "19.0.1", "safetensors": "0.5.3",
    "tokenizers": "0.21.1", "torch": "2.6.0", "transformers": "4.48.0", "triton": "3.2.0", "trl": "0.13.0",
    # since torchvision, timm and sentence-transformers joined the snapshot (uv on the same lines, 2026-12-05):
    "sentence-transformers": "3.3.1", "timm": "1.0.12", "torchvision": "0.21.0"}
"""The whole file differs: uv picks torchvision 0.15.2 (pulled by timm, outside the snapshot), which pins torch 2.0.1;
pip in April 2025 got torch 2.6.0 + triton 3.2.0 (the issue). Outside packages' requirements are not followed."""


def snapshot_lines(path: Path, into: Path) -> Path:
    """The requirement lines of `path` that name a package of the snapshot."""
    snapshot = snapshot_releases()[0]
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith(("#", "-"))
             and canonical_name(Requirement(line).name) in snapshot]
    into.write_text("\n".join(lines) + "\n")
    return into


def offline(path: Path, python: str, as_of: str | None):
    machine = cpu(python)
    return resolve_prepared(prepare_requirements(path, machine, UNREACHABLE), machine, as_of=as_of)


@pytest.mark.parametrize("name", sorted(UV_ANSWERS))
def test_a_pinset_resolves_offline_to_uvs_versions(name):
    as_of, python, expected, via_outside = UV_ANSWERS[name]
    resolution = offline(PINSETS / name, python, as_of)
    assert resolution.error is None and resolution.resolver == RESOLVER
    snapshot = snapshot_releases()[0]
    got = {n: v for n, v in resolution.pins.items() if n in snapshot}
    assert got == {n: v for n, v in expected.items() if n not in via_outside}, UV_COMMAND
    assert via_outside <= set(resolution.unknown)  # pulled by a package whose requirements are not followed


def test_autotrain_pulls_torch_26_and_triton_32_with_bitsandbytes_0450(tmp_path):
    resolution = offline(snapshot_lines(PINSETS / AUTOTRAIN, tmp_path / "r.txt"), "3.11", "2025-04-15")
    assert {n: v for n, v in resolution.pins.items() if n in snapshot_releases()[0]} == AUTOTRAIN_UV, UV_COMMAND
    assert resolution.pulled_by["triton"] == ("torch 2.6.0",)
    assert set(resolution.pulled_by["torch"]) == {"accelerate 1.2.1", "bitsandbytes 0.45.0", "peft 0.14.0",
                                                  "sentence-transformers 3.3.1", "timm 1.0.12", "torchvision 0.21.0"}


def test_check_r_with_no_index_falls_back_to_the_snapshot_and_fires_the_rule(tmp_path, monkeypatch):
    """No index and nothing in uv's cache: the answer comes from the snapshot, said so, and is judged."""
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    monkeypatch.setenv("QLORA_DOCTOR_OFFLINE", "1")
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.9", "gpus": []}))
    result = CliRunner().invoke(cli, ["check", "-r", str(PINSETS / "02-edgetam-gradio444-hub1.txt"), "--machine",
                                      str(machine), "--as-of", "2025-11-16", "--json"])
    assert result.exit_code == 1, result.output
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["rule:hub-hffolder-gradio"]["status"] == "fail"
    assert "huggingface-hub 1.1.4" in checks["rule:hub-hffolder-gradio"]["found"]
    detail = checks["packages.resolved"]["detail"]
    assert checks["packages.resolved"]["status"] == "pass", detail
    assert "no package index answers from here (pypi.org)" in detail
    assert "from qlora-doctor's bundled snapshot of PyPI metadata (releases up to 20" in detail
    assert "huggingface-hub 1.1.4 (required by gradio 4.44.0, gradio-client 1.3.0, timm 1.0.15)" in detail
    as_of_before = CliRunner().invoke(cli, ["check", "-r", str(PINSETS / "02-edgetam-gradio444-hub1.txt"),
                                            "--machine", str(machine), "--as-of", "2025-09-01", "--json"])
    assert "rule:hub-hffolder-gradio" not in {c["id"] for c in json.loads(as_of_before.stdout)["checks"]}


def test_resolver_snapshot_is_asked_for_explicitly(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QLORA_DOCTOR_OFFLINE", "1")  # never the network, whatever the option does
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.9", "gpus": []}))
    req = snapshot_lines(PINSETS / AUTOTRAIN, tmp_path / "requirements.txt")
    result = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--as-of", "2025-04-15",
                                      "--resolver", "snapshot", "--json"])
    assert result.exit_code == 1, result.output
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["rule:bnb-triton-ops-removed"]["status"] == "fail"
    assert "--resolver snapshot: resolved offline" in checks["packages.resolved"]["detail"]
    assert "triton 3.2.0 (required by torch 2.6.0)" in checks["packages.resolved"]["detail"]
    both = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--no-resolve",
                                    "--resolver", "snapshot"])
    assert both.exit_code == 2 and "cannot be combined" in both.output


def test_an_unsatisfiable_pin_is_a_one_line_failure(tmp_path, monkeypatch):
    req = tmp_path / "r.txt"
    req.write_text("peft==0.14.0\ntorch==2.99.0\n")
    resolution = resolve_requirements(req, cpu(), resolver="snapshot")
    assert resolution.pins == {} and "\n" not in resolution.error
    assert resolution.error.startswith("No solution found in qlora-doctor's bundled snapshot of PyPI metadata for "
                                       "Python 3.11.9: torch==2.99.0 (the file): no such release (the snapshot has 2.")
    req.write_text("gradio==4.44.0\nhuggingface_hub<0.19\n")
    conflict = resolve_requirements(req, cpu(), resolver="snapshot").error
    assert "huggingface-hub<0.19 (the file)" in conflict and "(gradio 4.44.0)" in conflict and "\n" not in conflict
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.9", "gpus": []}))
    result = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--resolver", "snapshot",
                                      "--json"])
    assert result.exit_code == 1, result.output
    check = {c["id"]: c for c in json.loads(result.stdout)["checks"]}["packages.resolved"]
    assert check["status"] == "fail" and "cannot be installed on this machine" in check["detail"]


def test_an_exact_pin_outside_the_snapshot_still_constrains(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text("torch==2.6.0\nsympy==1.12\n")  # torch 2.6.0 requires sympy==1.13.1 on Python >= 3.9
    error = offline(req, "3.11", None).error
    assert "sympy==1.12 (the file)" in error and "sympy==1.13.1 (torch 2.6.0)" in error


def test_markers_are_evaluated_for_the_machine():
    torch = [Need("torch", frozenset(), SpecifierSet("==2.5.1"))]
    linux = resolve_needs(torch, cpu("3.11.9"))
    assert linux.resolved == {"torch": "2.5.1", "triton": "3.1.0", "fsspec": "2026.9.0"}
    assert linux.outside["nvidia-cudnn-cu12"] == "9.1.0.70" and linux.outside["sympy"] == "1.13.1"
    windows = resolve_needs(torch, cpu("3.11.9", os="windows"))
    assert windows.resolved == {"torch": "2.5.1", "fsspec": "2026.9.0"}
    assert not any(n.startswith("nvidia-") for n in windows.outside)
    py313 = resolve_needs(torch, cpu("3.13.1"))  # triton ; ... and python_version < "3.13"
    assert py313.resolved == {"torch": "2.5.1", "fsspec": "2026.9.0"} and "setuptools" in py313.outside


def test_extras_and_requires_python_are_honoured():
    plain = resolve_needs([Need("transformers", frozenset(), SpecifierSet("==4.48.0"))], cpu(), as_of="2025-04-15")
    extra = resolve_needs([Need("transformers", frozenset({"torch"}), SpecifierSet("==4.48.0"))], cpu(),
                          as_of="2025-04-15")
    assert "torch" not in plain.resolved and "accelerate" not in plain.resolved
    assert extra.resolved["torch"] == "2.6.0" and extra.resolved["accelerate"] == "1.6.0"
    numpy = [Need("numpy", frozenset(), SpecifierSet())]
    assert resolve_needs(numpy, cpu("3.10.12"), as_of="2025-11-16").resolved == {"numpy": "2.2.6"}  # 2.3 wants 3.11
    assert resolve_needs(numpy, cpu("3.11.9"), as_of="2025-11-16").resolved == {"numpy": "2.3.5"}


def test_as_of_and_yanked_releases_are_honoured():
    releases = snapshot_releases()[0]
    gradio = [Need("gradio", frozenset(), SpecifierSet("==4.44.0"))]
    before = resolve_needs(gradio, cpu(), as_of="2025-09-01")
    assert before.resolved["huggingface-hub"] == "0.34.4"
    for name, version in before.resolved.items():
        assert next(r for r in releases[name] if str(r.version) == version).uploaded <= "2025-09-01"
    assert resolve_needs(gradio, cpu(), as_of="2025-11-16").resolved["huggingface-hub"] == "1.1.4"
    hub = lambda spec: resolve_needs([Need("huggingface-hub", frozenset(), SpecifierSet(spec))], cpu())
    assert hub(">=0.26.3,<0.26.5").resolved["huggingface-hub"] == "0.26.3"  # 0.26.4 is yanked
    assert hub("==0.26.4").resolved["huggingface-hub"] == "0.26.4"  # unless pinned exactly (PEP 592)
    assert "0.26.4 is yanked" in hub(">0.26.3,<0.26.5").error


def test_packages_outside_the_snapshot_keep_their_pin_and_the_rest_resolves(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text("scipy==1.14.1\nsentencepiece\npeft==0.14.0\n")
    resolution = offline(req, "3.11", "2025-04-15")
    assert resolution.error is None
    assert resolution.pins["scipy"] == "1.14.1" and resolution.pins["peft"] == "0.14.0"
    assert resolution.pins["torch"] == "2.6.0" and resolution.pins["accelerate"] == "1.6.0"  # peft's closure
    assert "sentencepiece" in resolution.unknown and "sentencepiece" not in resolution.pins
    assert "bitsandbytes" in resolution.unknown  # nothing resolved pulls it, but sentencepiece's deps are not followed
    summary = resolution.substitutions[-1]
    assert summary.startswith("resolved ") and "scipy==1.14.1" in summary and "sentencepiece" in summary
    assert "their own requirements not followed" in summary
    req.write_text("peft==0.14.0\n")  # only the stack's own dependencies are outside (nvidia-*, psutil...)
    stack = offline(req, "3.11", "2025-04-15")
    assert "bitsandbytes" not in stack.unknown and "pydantic" in stack.unknown
    req.write_text("accelerate==0.15.0\n")  # older than the snapshot (November 2022): kept as pinned, not a failure
    old = offline(req, "3.11", None)
    assert old.error is None and old.pins == {"accelerate": "0.15.0"} and "torch" in old.unknown


def test_resolution_is_bounded_in_rounds_and_time():
    needs = [Need("trl", frozenset(), SpecifierSet()), Need("gradio", frozenset(), SpecifierSet())]
    assert "gave up after 1 rounds" in resolve_needs(needs, cpu(), max_rounds=1).error
    assert "did not answer within 0 s" in resolve_needs(needs, cpu(), timeout_s=0).error

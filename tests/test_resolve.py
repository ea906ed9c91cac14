"""`check -r FILE` judges what installing FILE really gives (issue #14): uv's closure, with who pulled what.

A real case (tests/data/pinsets/02-edgetam-gradio444-hub1.txt, https://github.com/facebookresearch/EdgeTAM/issues/20):
gradio==4.44.0 pinned, huggingface_hub left to pip; from November 2025 pip pulls huggingface_hub 1.x, which
removed HfFolder that gradio 4 imports. The file's lines alone break no rule; the closure does.
"""

from __future__ import annotations

import json
import os
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

    import qlora_doctor.sources.pipreport as pip_mod

    monkeypatch.setattr(resolve_mod, "find_uv", lambda: None)  # the machine facts: no uv, and no pip either
    monkeypatch.setattr(pip_mod, "pip_available", lambda: False)
    req = tmp_path / "r.txt"
    req.write_text("transformers>=4.46,<5\npeft==0.13.2\n")
    env, checks = resolved_environment(req, machine_from_dict(CPU, "cpu"))
    assert checks[0].status == "unknown" and "pip install uv" in checks[0].fix
    assert env.version("peft") == Version("0.13.2") and "transformers" in env.unpinned


# --- reading the file for the resolver: what cannot be reached here is substituted, and said -----

def fake_uv(tmp_path: Path, compiled: str) -> str:
    """A uv that answers `uv pip compile` with `compiled` (and its version), recording what it was handed."""
    out = tmp_path / "compiled.txt"
    out.write_text(compiled)
    script = tmp_path / "uv"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0'; exit 0; fi\n"
                      f"cp \"$3\" {tmp_path / 'handed.txt'}\ncat {out}\n")
    script.chmod(0o755)
    return str(script)


def only_pypi(host: str, port: int) -> bool:
    return host in ("pypi.org", "files.pythonhosted.org")


def test_an_unreachable_pytorch_index_and_git_url_are_substituted_and_said(tmp_path, monkeypatch):
    """Case 14 of the corpus (Fooocus, driver 470): torch from download.pytorch.org/whl/cu121, which does not
    answer here; PyPI's torch 2.1.0 is resolved and cu121 kept as its build, so the driver check still sees
    a CUDA 12.1 torch. A git requirement whose host does not answer is kept by name, version unknown."""
    from qlora_doctor.doctor.resolved import resolved_environment
    from qlora_doctor.doctor.environment import environment_checks
    from qlora_doctor.sources.reqfile import prepare_requirements

    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("--extra-index-url https://download.pytorch.org/whl/cu121\ntorch==2.1.0\n"
                   "torchvision==0.16.0+cu121\ntransformers==4.30.2\n"
                   "peft @ git+https://github.com/huggingface/peft.git@e536616888d51b453ed354a6f1e243fecb02ea08\n"
                   "-e git+https://github.com/huggingface/accelerate.git#egg=accelerate\n")
    machine = machine_from_dict({**CPU, "python": "3.10.12", "driver_version": "470.86",
                                 "gpus": [{"name": "NVIDIA GeForce RTX 3050 Laptop GPU", "compute_capability": "8.6"}]},
                                "rtx3050")
    prepared = prepare_requirements(req, machine, reachable=only_pypi)
    assert "download.pytorch.org" not in prepared.text and "git+" not in prepared.text
    assert "torchvision==0.16.0\n" in prepared.text and prepared.torch_builds["torch"] == "cu121"
    assert prepared.unresolved == {"peft": None, "accelerate": None}
    assert len(prepared.substitutions) == 4 and all("\n" not in line for line in prepared.substitutions)

    import qlora_doctor.sources.resolve as resolve_mod
    import qlora_doctor.sources.reqfile as reqfile_mod

    monkeypatch.setattr(reqfile_mod, "_REACHABLE", {("pypi.org", 443): True, ("download.pytorch.org", 443): False,
                                                    ("github.com", 443): False})
    monkeypatch.setattr(resolve_mod, "find_uv", lambda: fake_uv(tmp_path, (
        "torch==2.1.0\n    # via\n    #   -r requirements.in\n    #   torchvision\ntorchvision==0.16.0\n"
        "    # via -r requirements.in\ntransformers==4.30.2\n    # via -r requirements.in\n")))
    env, checks = resolved_environment(req, machine)
    assert "git+" not in (tmp_path / "handed.txt").read_text()
    assert env.packages["torch"].raw_version == "2.1.0+cu121" and str(env.torch.cuda) == "12.1"
    assert {"peft", "accelerate"} <= set(env.unpinned)
    detail = checks[0].detail
    assert checks[0].status == "pass" and detail.count("\n  substituted: ") == 4, detail
    driver = next(c for c in environment_checks(machine, env) if c.id == "cuda.driver")
    assert driver.status == "fail" and "470.86" in driver.detail


def test_a_malformed_line_is_exit_2_naming_file_and_line(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("transformers==4.46.0\npeft=>0.13\n--frobnicate\n-r missing.txt\n")
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps(CPU))
    result = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--json"])
    assert result.exit_code == 2, result.output
    errors = json.loads(result.stdout)["errors"]
    assert [e.split(":")[1] for e in errors] == ["2", "3", "4"], errors
    assert all(e.startswith("requirements.txt:") for e in errors)


def test_markers_are_evaluated_for_the_machine_and_includes_inlined(tmp_path):
    from qlora_doctor.sources.reqfile import prepare_requirements

    (tmp_path / "base.txt").write_text("numpy<2 ; python_version < '3.12'\n")
    req = tmp_path / "requirements.txt"
    req.write_text("-r base.txt\nhttps://example.invalid/x/llama_cpp_binaries-0.56.0+cu124-py3-none-win_amd64.whl ; "
                   "platform_system == 'Windows'\nllama_cpp_python == 0.2.78 -C cmake.args=\"-DLLAMA_BLAS=ON\"\n")
    linux = prepare_requirements(req, machine_from_dict(CPU, "cpu"), reachable=only_pypi)
    assert "numpy<2" in linux.text and "llama_cpp_binaries" not in linux.text and not linux.unresolved
    # corpus case 32: uv reads no per-requirement build option; the resolver's line drops it, a hash stays
    assert "llama_cpp_python == 0.2.78\n" in linux.text and "cmake" not in linux.text
    windows = prepare_requirements(req, machine_from_dict({**CPU, "os": "windows", "python": "3.12.1"}, "w"),
                                   reachable=only_pypi)
    assert "numpy" not in windows.text and windows.unresolved == {"llama-cpp-binaries": "0.56.0+cu124"}


def test_a_local_cuda_build_of_any_package_resolves_its_public_release(tmp_path):
    """Corpus case 91 (DiffBIR#176): `xformers==0.0.25.post1+cu118` beside the PyTorch index, which does not
    answer here: PyPI's 0.0.25.post1 is resolved and said, not "cannot be installed"; a hash stays on its line."""
    from qlora_doctor.sources.reqfile import prepare_requirements

    req = tmp_path / "requirements.txt"
    req.write_text("--extra-index-url https://download.pytorch.org/whl/cu118\ntorch==2.2.2+cu118\n"
                   "xformers==0.0.25.post1+cu118\nfoo==1.0+local.build\npeft==0.10.0 --hash=sha256:00ff\n")
    prepared = prepare_requirements(req, machine_from_dict(CPU, "cpu"), reachable=only_pypi)
    assert "xformers==0.0.25.post1\n" in prepared.text and "+cu118" not in prepared.text
    assert "foo==1.0+local.build" in prepared.text  # not a CUDA build tag: left to the resolver as written
    assert "peft==0.10.0 --hash=sha256:00ff" in prepared.text
    assert any("xformers==0.0.25.post1+cu118: PyPI serves 0.0.25.post1" in s for s in prepared.substitutions)


def test_a_pep_751_lock_is_read_as_resolved(tmp_path, monkeypatch):
    """tests/data/resolved/pylock.datasets2140.toml: written by `uv pip compile --format pylock.toml` for
    datasets==2.14.0 as of 2024-02-12 (fsspec 2024.2.0 pulled), the stack of corpus case 35."""
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps(CPU))
    lock = DATA / "resolved" / "pylock.datasets2140.toml"
    result = CliRunner().invoke(cli, ["check", "-r", str(lock), "--machine", str(machine), "--json"])
    report = json.loads(result.stdout)
    ids = {c["id"]: c for c in report["checks"]}
    assert report["packages"]["datasets"] == "2.14.0" and "PEP 751" in ids["packages.resolved"]["detail"]
    assert ids["rule:datasets-fsspec-glob"]["status"] == "fail"
    broken = tmp_path / "pylock.toml"
    broken.write_text('lock-version = "1.0"\n[[packages]]\nname = "peft"\nversion = "not a version"\n')
    bad = CliRunner().invoke(cli, ["check", "-r", str(broken), "--machine", str(machine), "--json"])
    assert bad.exit_code == 2 and "[[packages]] #1 (peft)" in bad.output


def test_with_no_index_reachable_it_answers_fast_from_the_bundled_snapshot(tmp_path, monkeypatch):
    """UV_OFFLINE (or no network) and an index URL that never answers: one line says so, the bundled snapshot of
    PyPI metadata resolves the file (sources/snapshot.py), and it takes seconds, not the resolver's retries."""
    import time

    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))  # nothing cached either
    monkeypatch.setenv("UV_OFFLINE", "1")
    req = tmp_path / "requirements.txt"
    req.write_text("--index-url http://10.255.255.1/simple\ntransformers==4.46.0\npeft>=0.13\n")
    machine = tmp_path / "cpu.json"
    machine.write_text(json.dumps(CPU))
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["check", "-r", str(req), "--machine", str(machine), "--json"])
    assert time.perf_counter() - started < 30
    report = json.loads(result.stdout)
    resolved = next(c for c in report["checks"] if c["id"] == "packages.resolved")
    assert resolved["status"] == "pass" and "no package index answers from here" in resolved["detail"]
    assert "from qlora-doctor's bundled snapshot of PyPI metadata" in resolved["detail"]
    assert report["packages"]["transformers"] == "4.46.0" and report["packages"]["peft"], report  # 4.46.0: yanked, pinned


@pytest.mark.skipif(find_uv() is None, reason="uv is not installed")
def test_an_sdist_that_cannot_build_here_is_resolved_without_its_requirements(tmp_path, monkeypatch):
    """Corpus case 53 (echomimic): av==11.0.0 has no wheel for Python 3.10 and its sdist needs FFmpeg's
    libraries to build; the rest of the file is still resolved, and the report says what was assumed."""
    from qlora_doctor.sources.reqfile import host_reachable

    if not host_reachable("pypi.org"):
        pytest.skip("no network")
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("av==11.0.0\n")
    result = resolve_requirements(req, machine_from_dict({**CPU, "python": "3.10.12"}, "cpu"), as_of="2024-12-18")
    assert result.error is None and result.pins["av"] == "11.0.0"
    assert any("av==11.0.0" in line and "not judged" in line for line in result.substitutions)


@pytest.mark.skipif(find_uv() is None, reason="uv is not installed")
def test_a_rule_forbidden_combination_is_avoided_by_the_resolver(tmp_path, monkeypatch):
    """Item 6 of issue #14: the knowledge base inside resolution. gradio 4.44.0 kept: without the rules, uv
    takes huggingface_hub 1.x (hub-hffolder-gradio fails); with the constraint the rule gives once gradio is
    fixed (huggingface-hub<1.0.0), the resolver backtracks to a hub 0.x and the rule clears."""
    from qlora_doctor.knowledge.loading import load_rules
    from qlora_doctor.pins.constraints import combination_constraints
    from qlora_doctor.sources.reqfile import host_reachable

    if not host_reachable("pypi.org"):
        pytest.skip("no network")
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    machine = machine_from_dict(CPU, "cpu")
    lines = combination_constraints(machine, load_rules(), {"gradio": "4.44.0"})
    assert [(line.requirement, line.rule_id) for line in lines] == [("huggingface-hub<1.0.0", "hub-hffolder-gradio")]
    req = tmp_path / "requirements.txt"
    req.write_text("gradio==4.44.0\n")
    free = resolve_requirements(req, machine, as_of="2025-11-16")
    ruled = resolve_requirements(req, machine, as_of="2025-11-16", constraints="huggingface-hub<1.0.0\n")
    assert Version(free.pins["huggingface-hub"]).major == 1
    assert Version(ruled.pins["huggingface-hub"]).major == 0 and ruled.pins["gradio"] == "4.44.0"


@pytest.mark.skipif(not shutil.which("pip") and not Path(__import__("sys").executable).with_name("pip").exists(),
                    reason="pip is not installed")
def test_without_uv_pip_resolves_with_its_dry_run_report(tmp_path, monkeypatch):
    """uv hidden (not on PATH, not beside Python): pip's `install --dry-run --ignore-installed --report` is the
    resolver, and the same break is found in the closure it reports."""
    import qlora_doctor.sources.resolve as resolve_mod
    from qlora_doctor.doctor.resolved import resolved_environment
    from qlora_doctor.sources.reqfile import host_reachable

    if not host_reachable("pypi.org"):
        pytest.skip("no network")
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    # pip as a user without a site config would run it: this machine's config adds local wheel folders that
    # carry no upload dates, which --uploaded-prior-to cannot filter
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setattr(resolve_mod, "find_uv", lambda: None)  # the venv's own uv, beside Python, hidden too
    req = tmp_path / "requirements.txt"
    req.write_text("gradio==4.44.0\n")
    env, checks = resolved_environment(req, machine_from_dict(CPU, "cpu"), as_of="2025-11-16")
    assert checks[0].status == "pass" and checks[0].detail.count("pip ") >= 1, checks[0].detail
    assert env.version("huggingface-hub").major == 1 and "required by gradio 4.44.0" in checks[0].detail


# --- the platform uv resolves for is the machine's: its glibc decides which manylinux wheels install ----

def linux(libc: str | None, arch: str = "x86_64"):
    return machine_from_dict({**CPU, "arch": arch, "libc": libc}, "machine")


def test_the_resolver_targets_the_machines_glibc():
    from qlora_doctor.sources.resolve import uv_platform

    assert uv_platform(linux("glibc 2.35")) == "x86_64-manylinux_2_35"
    assert uv_platform(linux("glibc 2.39", arch="arm64")) == "aarch64-manylinux_2_39"
    assert uv_platform(linux("glibc 2.29")) == "x86_64-manylinux_2_28"   # uv has no 2_29..2_30 target
    assert uv_platform(linux("glibc 2.42")) == "x86_64-manylinux_2_40"   # uv's newest
    assert uv_platform(linux("musl 1.2.4")) == "x86_64-unknown-linux-musl"
    assert uv_platform(linux(None)) == "x86_64-manylinux_2_28"           # libc unknown: the common floor
    assert uv_platform(machine_from_dict({**CPU, "os": "windows"}, "m")) == "x86_64-pc-windows-msvc"


def test_uv_is_handed_the_machines_platform(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    argv = tmp_path / "argv.txt"
    script = tmp_path / "uv"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0'; exit 0; fi\n"
                      f"echo \"$@\" > {argv}\necho 'vllm==0.15.1'\n")
    script.chmod(0o755)
    req = tmp_path / "r.txt"
    req.write_text("vllm==0.15.1\n")
    resolve_requirements(req, linux("glibc 2.35"), uv=str(script), reachable=only_pypi)
    assert "--python-platform x86_64-manylinux_2_35" in argv.read_text()
    resolve_requirements(req, linux("glibc 2.31"), uv=str(script), reachable=only_pypi)  # another cache key
    assert "--python-platform x86_64-manylinux_2_31" in argv.read_text()


@pytest.mark.skipif(find_uv() is None, reason="uv is not installed")
def test_a_wheel_for_a_newer_glibc_resolves_on_a_machine_that_has_it(tmp_path, monkeypatch):
    """Network. Case 21 of the corpus: vllm 0.15.1 ships only manylinux_2_31 wheels; on the L4 machine
    (glibc 2.35) it installs, on a glibc 2.28 machine it cannot."""
    from qlora_doctor.sources.reqfile import host_reachable

    if not host_reachable("pypi.org", 443):
        pytest.skip("PyPI is not reachable")
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "r.txt"
    req.write_text("vllm==0.15.1\n")
    on_2_35 = resolve_requirements(req, linux("glibc 2.35"), as_of="2026-03-01")
    assert not on_2_35.error and on_2_35.pins["vllm"] == "0.15.1", on_2_35.error
    on_2_28 = resolve_requirements(req, linux("glibc 2.28"), as_of="2026-03-01")
    assert on_2_28.error and not on_2_28.pins


# --- pip decides torch before a package required bare; uv may not: asked again torch first (case 01) ---

AUTOTRAIN_FIRST = (  # uv 0.13.9's answer shape for case 01 (autotrain-advanced, as of 2025-04-15): xgboost's bare
    # nvidia-nccl-cu12 decided first, torch stepped down to 2.0.1 (CUDA 11 libraries), triton 2.0.0
    "accelerate==1.2.1\n    # via -r requirements.in\nbitsandbytes==0.45.0\n    # via -r requirements.in\n"
    "nvidia-nccl-cu12==2.26.2.post1\n    # via xgboost\ntorch==2.0.1\n    # via\n    #   accelerate\n"
    "    #   bitsandbytes\ntriton==2.0.0\n    # via torch\nxgboost==2.1.3\n    # via -r requirements.in\n")
AUTOTRAIN_TORCH_FIRST = (  # what pip installs for the same file (pip 26.3 --dry-run --report, same date and Python)
    "accelerate==1.2.1\n    # via -r requirements.in\nbitsandbytes==0.45.0\n    # via -r requirements.in\n"
    "nvidia-nccl-cu12==2.21.5\n    # via\n    #   torch\n    #   xgboost\ntorch==2.6.0\n    # via\n"
    "    #   -r requirements-torch-first.in\n    #   accelerate\n    #   bitsandbytes\ntriton==3.2.0\n    # via torch\n"
    "xgboost==2.1.3\n    # via -r requirements.in\n")


def two_answer_uv(tmp_path: Path, first: str, torch_first: str) -> tuple[str, Path]:
    """A uv answering `first`, or `torch_first` when handed a file whose first line is `torch`; it logs each call."""
    (tmp_path / "first.txt").write_text(first)
    (tmp_path / "torch-first.txt").write_text(torch_first)
    calls = tmp_path / "calls.txt"
    script = tmp_path / "uv"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'uv 0.0.0'; exit 0; fi\n"
                      f"echo x >> {calls}\n"
                      f"if [ \"$(head -n 1 \"$3\")\" = torch ]; then cat {tmp_path / 'torch-first.txt'}; "
                      f"else cat {tmp_path / 'first.txt'}; fi\n")
    script.chmod(0o755)
    return str(script), calls


def test_torch_is_decided_first_as_pip_does_when_uv_pulled_an_older_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("accelerate==1.2.1\nbitsandbytes==0.45.0\nxgboost==2.1.3\n")
    uv, calls = two_answer_uv(tmp_path, AUTOTRAIN_FIRST, AUTOTRAIN_TORCH_FIRST)
    machine = machine_from_dict({**CPU, "python": "3.11.0"}, "cpu")
    result = resolve_requirements(req, machine, as_of="2025-04-15", uv=uv, reachable=only_pypi)
    assert result.pins["torch"] == "2.6.0" and result.pins["triton"] == "3.2.0"
    assert "torch" not in result.named and result.pulled_by["torch"] == ("accelerate 1.2.1", "bitsandbytes 0.45.0")
    assert any(line.startswith("torch 2.6.0, not uv's first answer 2.0.1") for line in result.substitutions)
    assert calls.read_text().count("x") == 2


def test_torch_first_is_not_taken_when_it_moves_a_package_the_file_names(tmp_path, monkeypatch):
    """pip decides the file's own packages before torch: an answer that changes one of them is not pip's."""
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    req = tmp_path / "requirements.txt"
    req.write_text("accelerate\nbitsandbytes==0.45.0\nxgboost==2.1.3\n")
    moved = AUTOTRAIN_TORCH_FIRST.replace("accelerate==1.2.1", "accelerate==1.0.0")
    uv, _ = two_answer_uv(tmp_path, AUTOTRAIN_FIRST, moved)
    result = resolve_requirements(req, machine_from_dict({**CPU, "python": "3.11.0"}, "cpu"), as_of="2025-04-15",
                                  uv=uv, reachable=only_pypi)
    assert result.pins["torch"] == "2.0.1" and result.pins["accelerate"] == "1.2.1"
    assert not any("uv's first answer" in line for line in result.substitutions)


def test_no_second_resolve_when_uv_already_has_the_newest_torch_or_the_file_names_torch(tmp_path, monkeypatch):
    from qlora_doctor.sources.resolve import newest_torch

    assert str(newest_torch("3.11", "2025-04-15")) == "2.6.0"     # 2.7.0 came out on 2025-04-23
    assert str(newest_torch("3.11", "2025-01-28")) == "2.5.1"     # the day before 2.6.0
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    machine = machine_from_dict({**CPU, "python": "3.11.0"}, "cpu")
    req = tmp_path / "requirements.txt"
    req.write_text("accelerate==1.2.1\n")
    uv, calls = two_answer_uv(tmp_path, AUTOTRAIN_TORCH_FIRST.replace("-r requirements-torch-first.in", "xgboost"),
                              "never==1\n")
    assert resolve_requirements(req, machine, as_of="2025-04-15", uv=uv, reachable=only_pypi).pins["torch"] == "2.6.0"
    named = tmp_path / "named.txt"
    named.write_text("torch==2.0.1\naccelerate==1.2.1\n")
    (tmp_path / "second").mkdir()
    uv2, calls2 = two_answer_uv(tmp_path / "second", AUTOTRAIN_FIRST.replace(
        "    # via\n    #   accelerate", "    # via\n    #   -r requirements.in\n    #   accelerate"), "never==1\n")
    assert resolve_requirements(named, machine, as_of="2025-04-15", uv=uv2, reachable=only_pypi).pins["torch"] == "2.0.1"
    assert calls.read_text().count("x") == 1 and calls2.read_text().count("x") == 1


@pytest.mark.skipif(find_uv() is None, reason="uv is not installed")
def test_case_01_resolves_the_torch_pip_installs(tmp_path, monkeypatch):
    """Network. tests/data/pinsets/01 (autotrain-advanced#884): pip installed torch 2.6 / triton 3.2, which broke
    bitsandbytes 0.45.0 (triton.ops); uv alone answers torch 2.0.1 for the same file, date and Python."""
    from qlora_doctor.sources.reqfile import host_reachable

    if not host_reachable("pypi.org", 443):
        pytest.skip("PyPI is not reachable")
    monkeypatch.setenv("QLORA_DOCTOR_CACHE", str(tmp_path / "cache"))
    machine = machine_from_dict({**CPU, "python": "3.11.0"}, "cpu")
    result = resolve_requirements(DATA / "pinsets" / "01-autotrain-bnb045-triton32.txt", machine, as_of="2025-04-15")
    assert not result.error and result.pins["torch"] == "2.6.0" and result.pins["triton"] == "3.2.0", result.error


# --- pip without uv: the platform tags it is handed are every one the machine's glibc loads ---------

def test_pip_is_handed_every_manylinux_tag_the_machines_glibc_loads():
    from qlora_doctor.sources.pipreport import pip_argv, pip_platforms

    tags = pip_platforms(linux("glibc 2.35"))
    assert tags[0] == "manylinux_2_35_x86_64" and tags[-1] == "linux_x86_64"
    # pandas 2.2.3 ships manylinux_2_17 (manylinux2014) wheels, bitsandbytes 0.45.0 manylinux_2_24 only:
    # `--platform manylinux_2_28_x86_64` alone made pip refuse both ("from versions: none")
    assert {"manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert pip_platforms(linux(None))[0] == "manylinux_2_28_x86_64"
    assert "manylinux_2_29_x86_64" not in pip_platforms(linux("glibc 2.28"))
    arm = pip_platforms(linux("glibc 2.39", arch="aarch64"))
    assert arm[0] == "manylinux_2_39_aarch64" and "manylinux2014_aarch64" in arm and "manylinux_2_16_aarch64" not in arm
    assert pip_platforms(machine_from_dict({**CPU, "os": "windows"}, "m")) == ["win_amd64"]
    argv = pip_argv(Path("r.txt"), machine_from_dict({**CPU, "python": "3.9.0", "libc": "glibc 2.31"}, "m"), None, None)
    assert argv.count("--platform") == len(pip_platforms(linux("glibc 2.31"))) and "--only-binary=:all:" in argv


def test_a_lock_of_a_local_torch_build_releases_that_builds_cuda_library_pins(tmp_path):
    """Corpus case 112 (open-instruct's uv export): torch==2.9.0+cu129 beside the exact CUDA libraries of that build
    (nvidia-cufile-cu12==1.14.1.1); PyPI's torch 2.9.0, resolved in its place, needs 1.13.1.3, so those pins go
    to the resolver unversioned (markers kept), said once; other pins stay."""
    from qlora_doctor.sources.reqfile import prepare_requirements

    req = tmp_path / "requirements.txt"
    req.write_text("torch==2.9.0+cu129 ; platform_machine == 'x86_64' and sys_platform == 'linux'\n"
                   "nvidia-cufile-cu12==1.14.1.1 ; platform_machine == 'x86_64' and sys_platform == 'linux'\n"
                   "nvidia-cublas-cu12==12.9.1.4\nnumpy==2.2.6\n")
    prepared = prepare_requirements(req, machine_from_dict(CPU, "cpu"), reachable=only_pypi)
    lines = prepared.text.splitlines()
    assert "nvidia-cufile-cu12 ; platform_machine == 'x86_64' and sys_platform == 'linux'" in lines
    assert "nvidia-cublas-cu12" in lines and "numpy==2.2.6" in lines
    assert any("2 exact pins of CUDA libraries" in s for s in prepared.substitutions)
    plain = tmp_path / "plain.txt"  # no local build substituted: a pinned CUDA library is the user's pin
    plain.write_text("torch==2.9.0\nnvidia-cufile-cu12==1.14.1.1\n")
    assert "nvidia-cufile-cu12==1.14.1.1" in prepare_requirements(plain, machine_from_dict(CPU, "cpu"),
                                                                  reachable=only_pypi).text

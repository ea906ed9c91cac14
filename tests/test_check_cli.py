"""`qlora-doctor check` and `explain` end to end through the CLI, on described machines and pin sets."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli

from helpers import write_machine
from qlora_doctor.core.machine import machine_from_dict

GOOD_PINS = "torch==2.5.1+cu124\ntransformers==4.46.3\npeft==0.13.2\nbitsandbytes==0.45.0\naccelerate==1.1.1\ndatasets==3.1.0\n"


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def check_json(tmp_path, pins: str, **machine):
    req = tmp_path / "req.txt"
    req.write_text(pins)
    m = write_machine(tmp_path / "m.json", **machine)
    result = run("check", "--json", "--machine", str(m), "--no-resolve", "--requirements", str(req))
    assert result.exit_code in (0, 1), result.output
    data = json.loads(result.output)
    return result, data, {c["id"]: c for c in data["checks"]}


def test_check_json_shape_and_exit_code(tmp_path):
    result, data, checks = check_json(tmp_path, GOOD_PINS)
    assert data["status"] in ("pass", "warn", "fail")
    assert set(data) >= {"status", "checks", "machine", "packages"}
    for c in data["checks"]:
        assert set(c) >= {"id", "status", "title", "detail", "fix", "sources"}
        assert c["status"] in ("pass", "warn", "fail", "unknown")
    assert result.exit_code == (1 if data["status"] == "fail" else 0)
    assert data["packages"]["torch_build"]["cuda"] == "12.4"


def test_driver_too_old_for_torch_cuda_fails_with_fix(tmp_path):
    result, data, checks = check_json(tmp_path, GOOD_PINS, driver_version="470.82.01")
    assert result.exit_code == 1
    c = checks["cuda.driver"]
    assert c["status"] == "fail"
    assert "470.82.01 is too old" in c["detail"]
    # the same torch, built for a CUDA this driver runs and with kernels for this GPU: one command to paste
    assert "pip install torch==2.5.1 --index-url https://download.pytorch.org/whl/cu118" in c["fix"]
    assert c["sources"]


def test_driver_too_old_for_pypis_cuda13_torch_names_a_cu12_build(tmp_path):
    """torch 2.12's PyPI wheel is CUDA 13.0 (driver >= 580); a 570 driver runs its cu126 build (cuda.toml)."""
    pins = GOOD_PINS.replace("torch==2.5.1+cu124", "torch==2.12.0")
    _, _, checks = check_json(tmp_path, pins, driver_version="570.133.07")
    fix = checks["cuda.driver"]["fix"]
    assert checks["cuda.driver"]["status"] == "fail"
    assert "upgrade the NVIDIA driver to >= 580" in fix
    assert "pip install torch==2.12.0 --index-url https://download.pytorch.org/whl/cu126" in fix


def test_new_driver_passes_driver_check(tmp_path):
    _, _, checks = check_json(tmp_path, GOOD_PINS, driver_version="550.54.15")
    assert checks["cuda.driver"]["status"] == "pass"


def test_unknown_driver_is_unknown_not_pass(tmp_path):
    _, data, checks = check_json(tmp_path, GOOD_PINS, driver_version=None)
    assert checks["cuda.driver"]["status"] == "unknown"
    assert data["status"] != "pass"


def test_blackwell_card_needs_newer_torch_build(tmp_path):
    gpu = [{"name": "NVIDIA GeForce RTX 5090", "compute_capability": "12.0", "memory_total_mib": 32607}]
    _, _, checks = check_json(tmp_path, GOOD_PINS, gpus=gpu, driver_version="575.51.03")
    assert checks["cuda.arch"]["status"] == "fail"
    assert "sm_120" in checks["cuda.arch"]["detail"]


def test_a_file_without_training_packages_warns_and_names_them(tmp_path):
    """A proposed file may leave torch or peft to a container or another index: named, not failed (the
    installed environment missing them does fail: training cannot start)."""
    result, _, checks = check_json(tmp_path, "torch==2.5.1+cu124\ntransformers==4.46.3\n")
    assert checks["packages.training"]["status"] == "warn"
    assert "peft" in checks["packages.training"]["detail"]


def test_cpu_machine_warns_but_passes_exit_code(tmp_path):
    result, data, checks = check_json(
        tmp_path, "torch==2.13.0+cpu\ntransformers==5.24.0\npeft==0.21.2\nbitsandbytes==0.50.2\n"
                  "accelerate==1.15.0\ndatasets==5.2.0\n", driver_version=None, gpus=[])
    assert checks["machine.gpu"]["status"] == "warn"
    assert result.exit_code == 0, data


def test_save_machine_writes_loadable_file(tmp_path):
    out = tmp_path / "saved.json"
    m = write_machine(tmp_path / "m.json")
    result = run("check", "--json", "--machine", str(m), "--save-machine", str(out))
    assert result.exit_code in (0, 1), result.output
    assert json.loads(out.read_text())["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"os": "linux", "arch": 64}', "arch: expected a string"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_machine_file_is_exit_2_without_traceback(tmp_path, content, message):
    path = tmp_path / "m.json"
    path.write_text(content)
    result = run("check", "--machine", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_bad_requirements_file_is_exit_2(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("torch>=2\n")
    result = run("check", "--no-resolve", "--requirements", str(req), "--machine", str(write_machine(tmp_path / "m.json")))
    assert result.exit_code == 2
    assert f"{req}:1:" in result.output and "exact pin" in result.output


def test_missing_files_are_exit_2(tmp_path):
    assert run("check", "--machine", str(tmp_path / "nope.json")).exit_code == 2
    assert run("check", "--no-resolve", "--requirements", str(tmp_path / "nope.txt")).exit_code == 2


def test_unknown_flag_is_exit_2():
    assert run("check", "--no-such-flag").exit_code == 2


def test_several_cards_of_one_kind_are_one_arch_finding_and_counted_once(tmp_path):
    """Eight RTX 5090s under a torch without sm_120: one cuda.arch row naming the count, and the machine line says
    `8x` instead of the name eight times; two kinds are two findings."""
    gpu = {"name": "NVIDIA GeForce RTX 5090", "compute_capability": "12.0", "memory_total_mib": 32607}
    _, data, _ = check_json(tmp_path, GOOD_PINS, gpus=[gpu] * 8, driver_version="575.51.03")
    (arch,) = [c for c in data["checks"] if c["id"] == "cuda.arch"]
    assert arch["status"] == "fail" and "NVIDIA GeForce RTX 5090 (x8) is sm_120" in arch["detail"]
    req, m = tmp_path / "req.txt", tmp_path / "m.json"
    table = run("check", "--machine", str(m), "--no-resolve", "--requirements", str(req)).output
    assert "8x NVIDIA GeForce RTX" in table and table.count("RTX") <= 4  # the machine line, the row, its detail
    t4 = {"name": "Tesla T4", "compute_capability": "7.5", "memory_total_mib": 15360}
    _, data, _ = check_json(tmp_path, GOOD_PINS, gpus=[gpu, t4, gpu], driver_version="575.51.03")
    assert [c["status"] for c in data["checks"] if c["id"] == "cuda.arch"] == ["fail", "pass"]


def test_table_output_mentions_failure_and_fix(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text(GOOD_PINS)
    m = write_machine(tmp_path / "m.json", driver_version="470.82.01")
    result = run("check", "--machine", str(m), "--no-resolve", "--requirements", str(req))
    assert result.exit_code == 1
    assert "FAIL" in result.output and "qlora-doctor lock" in result.output


@pytest.mark.parametrize("text, rule_hint", [
    ("RuntimeError: CUDA Setup failed despite GPU being available. Please run the following command to get "
     "more information: python -m bitsandbytes", "bnb"),
    ("ImportError: cannot import name 'prepare_model_for_int8_training' from 'peft' "
     "(/usr/lib/python3/site-packages/peft/__init__.py)", "peft"),
    ("ValueError: Your setup doesn't support bf16/gpu.", "bf16"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
     "23.65 GiB of which 1.12 GiB is free.", "oom"),
])
def test_explain_recognises_the_issue_examples(text, rule_hint):
    result = run("explain", "--json", "-", input="some log line\n" + text + "\nmore\n")
    assert result.exit_code == 0, result.output
    matches = json.loads(result.output)["matches"]
    assert matches and all(set(m) >= {"id", "cause", "fix", "sources"} for m in matches)


def test_explain_nothing_matched_exit_1():
    result = run("explain", "-", input="hello world\n")
    assert result.exit_code == 1
    assert "no known failure" in result.output


def test_explain_an_empty_paste_is_a_user_mistake_exit_2():
    for text in ("", "\n  \n"):
        result = run("explain", "-", input=text)
        assert result.exit_code == 2 and "standard input: the text is empty" in result.output, result.output


def test_explain_binary_junk_does_not_crash(tmp_path):
    path = tmp_path / "junk.log"
    path.write_bytes(bytes(range(256)) * 50)
    result = run("explain", str(path))
    assert result.exit_code in (0, 1)
    assert "Traceback" not in result.output


def test_explain_unreadable_file_is_exit_2(tmp_path):
    assert run("explain", str(tmp_path / "missing.log")).exit_code == 2


def test_bitsandbytes_library_for_torch_cuda(tmp_path):
    base = "transformers==4.46.3\npeft==0.13.2\naccelerate==1.1.1\ndatasets==3.1.0\n"
    # bitsandbytes 0.45.0 has no CUDA 12.8 library at all.
    _, _, checks = check_json(tmp_path, base + "torch==2.7.1+cu128\nbitsandbytes==0.45.0\n", driver_version="570.86.10")
    assert checks["bnb.cuda"]["status"] == "fail"
    # 0.50 falls back to its closest same-major build: CUDA 12.9 loads the 12.8 library.
    _, _, checks = check_json(tmp_path, base + "torch==2.8.0+cu129\nbitsandbytes==0.50.2\n", driver_version="575.51.03")
    assert checks["bnb.cuda"]["status"] == "pass" and "12.8" in checks["bnb.cuda"]["detail"]


def test_at_80_columns_no_url_or_fix_is_split(tmp_path):
    """The report wraps its table at spaces and prints every fix and source on lines of their own, so a
    command or URL copied from an 80-column terminal is whole."""
    from qlora_doctor.cli.render import render_report
    from qlora_doctor.doctor.diagnose import diagnose
    from qlora_doctor.sources.requirements import environment_from_pins

    t4 = machine_from_dict({"os": "linux", "arch": "x86_64", "python": "3.10.12", "driver_version": "470.82.01",
                            "gpus": [{"name": "Tesla T4", "compute_capability": "7.5", "memory_total_mib": 15360}]},
                           "t4.json")
    env = environment_from_pins({"torch": "2.5.1+cu124", "bitsandbytes": "0.45.0", "transformers": "4.46.3",
                                 "peft": "0.13.2", "accelerate": "1.1.1", "datasets": "3.1.0", "triton": "3.2.0"},
                                "reqs.txt")
    report = diagnose(t4, env)
    text = render_report(report, width=80)
    lines = [line.strip() for line in text.splitlines()]
    for check in report.checks:
        if check.status in ("fail", "warn", "unknown"):
            for url in check.sources:
                assert url in lines, url
            if check.fix:
                assert f"fix: {check.fix}" in lines, check.fix


def test_one_cause_one_row_driver_too_old():
    """A driver too old for torch's CUDA is one failing row (cuda.driver), not also rule:cuda-driver-too-old-*:
    one cause, one fix; the rule's sources join the row (issue #14)."""
    from qlora_doctor.doctor.diagnose import diagnose
    from qlora_doctor.sources.requirements import environment_from_pins

    t4 = machine_from_dict({"os": "linux", "arch": "x86_64", "python": "3.10.12", "driver_version": "470.82.01",
                            "gpus": [{"name": "Tesla T4", "compute_capability": "7.5", "memory_total_mib": 15360}]},
                           "t4.json")
    env = environment_from_pins({"torch": "2.5.1+cu124", "bitsandbytes": "0.45.0", "transformers": "4.46.3",
                                 "peft": "0.13.2", "accelerate": "1.1.1", "datasets": "3.1.0"}, "reqs.txt")
    report = diagnose(t4, env)
    failing = [c.id for c in report.failed]
    assert "cuda.driver" in failing
    assert not [c for c in failing if c.startswith("rule:cuda-driver-too-old")], failing
    driver = next(c for c in report.checks if c.id == "cuda.driver")
    assert any("cuda" in s for s in driver.sources)


def test_rules_that_cannot_be_judged_are_one_row_and_verbose_lists_them(tmp_path):
    # EdgeTAM's pins resolved offline over the bundled snapshot: packages outside it may pull the training
    # packages, so every rule on those cannot be judged, and the default view says so in one row.
    from tests.trainer_support import REPO

    m = write_machine(tmp_path / "m.json")
    args = ["check", "-r", str(REPO / "tests/data/pinsets/02-edgetam-gradio444-hub1.txt"), "--resolver", "snapshot",
            "--as-of", "2025-11-16", "--machine", str(m)]
    report = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    unknown_rules = [c["id"] for c in report["checks"] if c["status"] == "unknown" and c["id"].startswith("rule:")]
    assert len(unknown_rules) > 3
    text = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args).stdout
    assert f"{len(unknown_rules)} known failures cannot be ruled out" in text
    assert "transformers" in text and not any(f"unknown {rule}:" in text for rule in unknown_rules)
    verbose = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*args, "-v"]).stdout
    assert all(f"unknown {rule}:" in verbose for rule in unknown_rules)


def test_brackets_in_fixes_and_details_print_as_written():
    # rich reads `[train]` as markup: the fix `pip install 'qlora-doctor[train]'` once printed as
    # `pip install 'qlora-doctor'`, a different and useless command.
    from qlora_doctor.cli.render import render_report
    from qlora_doctor.core.report import Check, Report

    check = Check("packages.training", "fail", "Training [packages]", "not installed: torch [rank0]",
                  fix="pip install 'qlora-doctor[train]'", found="missing [fp8]", expected="torch")
    machine = {"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": None, "gpus": [],
               "source": "m[1].json", "notes": ["note [x]"]}
    report = Report(checks=(check,), machine=machine, packages={}, tested={})
    text = render_report(report, verbose=True, width=200)
    for written in ("qlora-doctor[train]", "[rank0]", "missing [fp8]", "Training [packages]", "m[1].json",
                    "note [x]"):
        assert written in text, written


def test_a_file_leaving_out_bitsandbytes_is_judged_with_what_pip_would_add(tmp_path):
    """LLaMA-Factory-style pins without bitsandbytes (it comes from an extra): resolved again with it added, for the
    machine and date (offline, over the bundled snapshot), the file passes, naming the version pip would add and
    the line to pin it; bnb.cuda is judged on that version instead of 'unknown'."""
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("torch==2.6.0\ntransformers==4.50.0\npeft==0.15.0\naccelerate==1.5.0\ndatasets==3.4.0\n")
    m = write_machine(tmp_path / "m.json", gpus=[{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
                                                  "memory_total_mib": 81920}], driver_version="550.54.15")
    args = ["check", "-r", str(reqs), "--resolver", "snapshot", "--as-of", "2025-04-01", "--machine", str(m), "--json"]
    report = json.loads(CliRunner().invoke(cli, args).stdout)
    checks = {c["id"]: c for c in report["checks"]}
    training = checks["packages.training"]
    assert training["status"] == "pass", training
    assert "pip would add bitsandbytes 0.45." in training["detail"] and "bitsandbytes==0.45." in training["fix"]
    assert checks["bnb.cuda"]["status"] == "pass" and "with what pip would add" in checks["bnb.cuda"]["detail"]
    text = CliRunner(env={"COLUMNS": "200"}).invoke(cli, args[:-1]).stdout  # passing, but said without -v
    assert "pin them in the file: bitsandbytes==0.45." in text


def test_what_pip_would_add_is_a_warning_when_it_brings_a_problem():
    from qlora_doctor.core.report import Check
    from qlora_doctor.doctor.resolved import Additions, judge_additions

    mine = [Check("packages.training", "warn", "Training packages", "not in the proposed pins: peft"),
            Check("rule:a", "fail", "A", "already failing")]
    theirs = [Check("packages.training", "pass", "T", "all there"), Check("rule:a", "fail", "A", "still"),
              Check("rule:b", "fail", "B broke", "new", fix="pip install 'b<2'")]
    out = judge_additions(mine, Additions(("peft",), {"peft": "0.18.0"}, None, None, "2025-06-01"), theirs)
    training = next(c for c in out if c.id == "packages.training")
    assert training.status == "warn" and "rule:b fails: B broke" in training.detail
    assert training.fix == "pip install 'b<2'" and "peft 0.18.0" in training.detail
    refused = judge_additions(mine, Additions(("peft",), {}, None, "No solution found", None), [])
    assert next(c for c in refused if c.id == "packages.training").detail.endswith("No solution found")


def test_two_rules_one_upgrade_undoes_are_one_row(tmp_path):
    """datasets 2.14.0 beside fsspec 2024.2: the '**' glob change and the LocalFileSystem protocol change both
    fire, and `pip install -U 'datasets>=2.15'` undoes both: one row (the glob rule's), the other said inside it."""
    reqs = tmp_path / "r.txt"
    reqs.write_text("torch==2.1.0\ntransformers==4.34.0\npeft==0.5.0\naccelerate==0.23.0\nbitsandbytes==0.41.1\n"
                    "datasets==2.14.0\nfsspec==2024.2.0\n")
    report = json.loads(CliRunner().invoke(cli, ["check", "-r", str(reqs), "--no-resolve", "--json"]).stdout)
    ids = [c["id"] for c in report["checks"]]
    assert "rule:datasets-fsspec-glob" in ids and "rule:datasets-fsspec-local-cache" not in ids
    glob = next(c for c in report["checks"] if c["id"] == "rule:datasets-fsspec-glob")
    assert "Also: datasets < 2.14.6 cannot load its own cache" in glob["detail"]
    assert "https://github.com/huggingface/datasets/pull/6334" in glob["sources"]
    reqs.write_text(reqs.read_text().replace("2024.2.0", "2023.10.0"))  # only the cache change: its own row
    report = json.loads(CliRunner().invoke(cli, ["check", "-r", str(reqs), "--no-resolve", "--json"]).stdout)
    assert "rule:datasets-fsspec-local-cache" in [c["id"] for c in report["checks"] if c["status"] == "fail"]

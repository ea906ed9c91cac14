"""matrix.yaml validation, verdicts, atomic records, report, CI workflow, tested status."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from helpers import CPU_MACHINE, env, machine
from matrix_support import record_json, stack, write_records
from qlora_doctor.cli import cli
from qlora_doctor.core.machine import machine_from_dict
from qlora_doctor.core.errors import InputError
from qlora_doctor.doctor.tested import tested_status as judge_tested
from qlora_doctor.matrix.ci import github_workflow
from qlora_doctor.matrix.combos import load_combinations, parse_combinations
from qlora_doctor.matrix.records import (StepResult, load_record, load_records, parse_platform,
                                         record_from_json, write_record)
from qlora_doctor.matrix.report import build_table, render_markdown
from qlora_doctor.matrix.runner import (RunOptions, pin_mismatches, planned_platform, run_matrix, verdict_for)

GOOD = {"combinations": [
    {"name": "cpu-a", "python": "3.11", "expect": "pass", "platforms": ["linux-x86_64-py3.11-cpu"],
     "pins": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
              "accelerate": "1.15.0"}},
    {"name": "cpu-bad", "python": "3.11", "expect": "fail", "reason": "old accelerate", "rule": "accel-tf5-min",
     "platforms": ["linux-x86_64-py3.11-cpu"],
     "pins": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
              "accelerate": "1.0.1"}},
]}

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_shipped_matrix_yaml_is_valid_and_has_a_pass_and_a_known_bad_cpu_combination():
    combos = load_combinations(REPO_ROOT / "matrix.yaml")
    cpu = [c for c in combos if c.applies_to("linux-x86_64-py3.11-cpu")]
    assert any(c.expect == "pass" for c in cpu)
    bad = [c for c in cpu if c.expect == "fail"]
    assert bad and all(c.rule and c.reason for c in bad)


def test_known_bad_rules_exist_in_the_knowledge_base():
    from qlora_doctor.knowledge.loading import load_rules

    ids = {r.id for r in load_rules()}
    for combo in load_combinations(REPO_ROOT / "matrix.yaml"):
        if combo.expect == "fail":
            assert combo.rule in ids, f"matrix.yaml: {combo.name}: rule {combo.rule} is not in the knowledge base"


def test_every_problem_in_a_bad_combos_file_is_named_with_its_key():
    bad = {"combinations": [
        {"name": "x", "python": 3.11, "expect": "maybe", "platforms": ["linux"], "pins": {"torch": "two"},
         "colour": "red"},
        {"name": "y", "python": "3.11", "expect": "fail", "platforms": ["linux-x86_64-py3.11-cpu"],
         "pins": {"torch": "2.13.0", "transformers": "5", "peft": "0.21", "bitsandbytes": "0.50",
                  "accelerate": "1.0"}},
    ]}
    with pytest.raises(InputError) as err:
        parse_combinations(bad, "m.yaml")
    text = "\n".join(err.value.messages)
    for expected in ["m.yaml: combinations[0] (x): unknown key 'colour'", "combinations[0] (x).python",
                     "(x).pins.torch: 'two' is not an exact version", "(x).pins.transformers: missing",
                     "(x).expect: expected pass or fail", "(x).platforms: 'linux' is not",
                     "combinations[1] (y).reason: required when expect is fail", "(y).rule: required"]:
        assert expected in text, text


def test_bad_combos_file_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"combinations": [{**GOOD["combinations"][0], "expect": "sometimes"}]}))
    result = CliRunner().invoke(cli, ["matrix", "report", "--combos", str(path), "--results", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "combinations[0] (cpu-a).expect" in result.output


def test_duplicate_names_and_unknown_only_are_errors(tmp_path):
    with pytest.raises(InputError, match="used twice"):
        parse_combinations({"combinations": [GOOD["combinations"][0]] * 2}, "m.yaml")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    result = CliRunner().invoke(cli, ["matrix", "run", "--combos", str(path), "--only", "nope",
                                      "--results", str(tmp_path)])
    assert result.exit_code == 2 and "--only nope: no combination of that name" in result.output


def _steps(*statuses: tuple[str, str]) -> tuple[StepResult, ...]:
    return tuple(StepResult(name, status) for name, status in statuses)


def test_verdicts():
    ok = _steps(("install", "pass"), ("check", "pass"), ("smoke", "pass"))
    check_failed = _steps(("install", "pass"), ("check", "fail"), ("smoke", "skip"))
    good, bad = (c for c in parse_combinations(GOOD, "m"))
    assert verdict_for(good.to_json(), ok, ())[0] == "pass"
    assert verdict_for(good.to_json(), check_failed, ("rule:x",))[0] == "fail"
    assert verdict_for(bad.to_json(), check_failed, ("rule:accel-tf5-min",)) == (
        "pass", "fails as documented: rule accel-tf5-min fired")
    wrong_rule = verdict_for(bad.to_json(), check_failed, ("rule:other",))
    assert wrong_rule[0] == "fail" and "not by rule accel-tf5-min" in wrong_rule[1]
    assert verdict_for(bad.to_json(), ok, ())[0] == "fail"
    install_failed = _steps(("install", "fail"), ("check", "skip"), ("smoke", "skip"))
    assert "failed at install" in verdict_for(bad.to_json(), install_failed, ())[1]


def test_pin_mismatches_for_in_place_records():
    pins = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "peft": "0.21.0"}
    assert pin_mismatches(pins, {"torch": "2.11.0+cu130", "transformers": "5.17.0", "peft": "0.21.0"}) == []
    assert pin_mismatches({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"}) == []
    assert pin_mismatches(pins, {"torch": "2.11.0+cu128", "transformers": "5.17.0"}) == [
        "peft not installed (pin 0.21.0)", "torch 2.11.0+cu128 (pin 2.11.0+cu130)"]


def test_planned_platform_ids():
    combos = load_combinations(REPO_ROOT / "matrix.yaml")
    gpu = next(c for c in combos if c.name.startswith("gpu-cu130"))
    h100 = machine(python="3.12.3", driver_version="580.159.04",
                   gpus=[{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}])
    assert planned_platform(h100, gpu) == "linux-x86_64-py3.12-cu130-sm90"
    cpu = machine_from_dict(CPU_MACHINE, "cpu")
    assert planned_platform(cpu, combos[0]) == "linux-x86_64-py3.11-cpu"
    assert parse_platform("linux-x86_64-py3.12-cu130-sm90").sm == "9.0"
    assert str(parse_platform("linux-x86_64-py3.12-cu130-sm90").cuda) == "13.0"


def test_records_are_written_atomically(tmp_path, monkeypatch):
    data = record_json("cpu-a", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu"))
    record = record_from_json(data, "fixture")
    path = write_record(record, tmp_path)
    assert load_record(path).freeze["torch"] == "2.13.0+cpu"
    before = path.read_bytes()

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    changed = record_from_json({**data, "date": "2026-12-01T00:00:00Z"}, "fixture")
    with pytest.raises(KeyboardInterrupt):
        write_record(changed, tmp_path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind


def test_report_table_from_records(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    write_records(tmp_path / "r",
                  record_json("cpu-a", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu"), date="2026-11-02T00:00:00Z"),
                  record_json("cpu-bad", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu", accelerate="1.0.1"),
                              works=False, expect="fail", rule="accel-tf5-min", failed_at="check"),
                  record_json("cpu-a", "linux-x86_64-py3.12-cu130-sm90", stack("2.11.0+cu130"), works=False,
                              verdict="fail", failed_at="smoke"))
    combos = load_combinations(path)
    table = build_table(combos, load_records(tmp_path / "r"))
    md = render_markdown(table, combos)
    assert "| combination | expect | `linux-x86_64-py3.11-cpu` | `linux-x86_64-py3.12-cu130-sm90` |" in md
    assert "| `cpu-a` | pass | pass, 2026-11-02 | FAIL at smoke, 2026-11-01 |" in md
    assert "| `cpu-bad` | fail | fails as documented (accel-tf5-min), 2026-11-01 | - |" in md
    result = CliRunner().invoke(cli, ["matrix", "report", "--combos", str(path), "--results", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output  # one record disagrees with matrix.yaml
    assert "FAIL at smoke" in result.output


def test_committed_workflow_equals_a_fresh_generation():
    committed = (REPO_ROOT / ".github" / "workflows" / "matrix.yml").read_text()
    combos = load_combinations(REPO_ROOT / "matrix.yaml")
    assert committed == github_workflow(combos), "regenerate: qlora-doctor matrix ci --github -o .github/workflows/matrix.yml"


def test_workflow_matrix_comes_from_the_combinations():
    combos = parse_combinations(GOOD, "m")
    workflow = yaml.safe_load(github_workflow(combos))
    job = workflow["jobs"]["combination"]
    assert [row["name"] for row in job["strategy"]["matrix"]["include"]] == ["cpu-a", "cpu-bad"]
    assert job["strategy"]["matrix"]["include"][0]["python"] == "3.11"
    runs = [s.get("run", "") for s in job["steps"]]
    assert any('matrix run --only "${{ matrix.name }}"' in r for r in runs)
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for s in job["steps"])


# --- tested status (the fast path of check) ---------------------------------------------------

def test_tested_when_the_env_equals_a_passing_record_on_this_platform(tmp_path):
    folder = write_records(tmp_path, record_json("cpu-a", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu")))
    cpu = machine_from_dict(CPU_MACHINE, "cpu")
    start = time.perf_counter()
    info, check = judge_tested(cpu, env(torch="2.13.0+cpu", transformers="5.24.0", peft="0.21.2",
                                         bitsandbytes="0.50.2", accelerate="1.15.0", datasets="5.2.0"), folder)
    assert time.perf_counter() - start < 0.5
    assert info["status"] == "tested" and check.status == "pass" and "cpu-a" in check.detail


def test_untested_names_the_closest_record_and_the_pins_to_reach_it(tmp_path):
    folder = write_records(tmp_path, record_json("cpu-a", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu")),
                           record_json("cpu-old", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu", "5.10.0", "0.18.0")))
    cpu = machine_from_dict(CPU_MACHINE, "cpu")
    info, check = judge_tested(cpu, env(torch="2.13.0+cpu", transformers="5.9.0", peft="0.21.2",
                                         bitsandbytes="0.50.2", accelerate="1.15.0", datasets="5.2.0"), folder)
    assert info["status"] == "untested" and info["closest"] == "cpu-a"
    assert info["differences"] == ["transformers 5.9.0 (tested: 5.24.0)"]
    assert check.status == "pass" and check.fix == "pip install transformers==5.24.0"  # information, not a risk


def test_a_record_from_another_platform_does_not_make_an_env_tested(tmp_path):
    folder = write_records(tmp_path, record_json("gpu", "linux-x86_64-py3.12-cu130-sm90", stack("2.11.0+cu130")))
    cpu = machine_from_dict({**CPU_MACHINE, "python": "3.12.3"}, "cpu")
    info, check = judge_tested(cpu, env(torch="2.11.0+cu130", transformers="5.24.0", peft="0.21.2",
                                         bitsandbytes="0.50.2", accelerate="1.15.0", datasets="5.2.0"), folder)
    assert info["status"] == "untested" and "none on linux-x86_64-py3.12-cpu" in check.detail


def test_check_reports_tested_status_for_a_requirements_file(tmp_path):
    folder = write_records(tmp_path / "r", record_json("cpu-a", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu")))
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("\n".join(f"{n}=={v}" for n, v in stack("2.13.0+cpu").items() if n != "pip"))
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(CPU_MACHINE))
    result = CliRunner(env={"QLORA_DOCTOR_RESULTS": str(folder)}).invoke(
        cli, ["check", "--json", "--machine", str(mfile), "--no-resolve", "-r", str(reqs)])
    data = json.loads(result.output)
    assert data["tested"]["status"] == "tested", data["tested"]


# --- a real environment build (small: its install fails at resolution, as documented) ----------

@pytest.mark.slow
def test_matrix_run_builds_a_venv_and_records_an_install_failure(tmp_path):
    combos = parse_combinations({"combinations": [{
        "name": "does-not-resolve", "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "expect": "fail",
        "reason": "no such accelerate", "rule": "accel-missing", "fails_at": "install",
        "match": "No matching distribution|Could not find a version", "platforms": ["*"],
        "pins": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
                 "accelerate": "0.0.0"}}]}, "m")
    cache = Path(os.environ.get("QLORA_DOCTOR_TEST_CACHE", tmp_path / "cache"))
    summary = run_matrix(combos, machine_from_dict(CPU_MACHINE, "cpu"),
                         RunOptions(results_dir=tmp_path / "results", cache_dir=cache))
    (record,) = summary.records
    assert record.steps[0].name == "install" and record.steps[0].status == "fail"
    assert "accelerate==0.0.0" in record.steps[0].excerpt
    assert [s.status for s in record.steps[1:]] == ["skip", "skip"]
    assert record.verdict == "pass", record.verdict_detail  # failed the documented way
    assert summary.paths[0].exists() and load_record(summary.paths[0]).works is False


def test_the_verdict_names_its_evidence(tmp_path):
    """`pass` rests on a record (tested) or on clearing every rule (compatible); not being tested is not a
    warning (issue #14)."""
    from qlora_doctor.core.report import Check, Report

    untested = Report(checks=(Check("rules", "pass", "Known failures"),
                              Check("matrix.tested", "pass", "Tested combination", "not tested")),
                      machine={}, packages={}, tested={"status": "untested"})
    assert untested.status == "pass" and untested.evidence == "compatible"
    tested = Report(checks=untested.checks, machine={}, packages={}, tested={"status": "tested"})
    assert tested.evidence == "tested" and tested.to_json()["evidence"] == "tested"
    unknown = Report(checks=(*untested.checks, Check("cuda.driver", "unknown", "driver")), machine={}, packages={})
    assert unknown.evidence == "unknown"


def test_training_closure_follows_requirements_and_extras():
    from qlora_doctor.matrix.closure import closure, own_requirements, training_closure

    reqs = own_requirements()
    assert any(r.startswith("torch") and "extra" in r and "train" in r for r in reqs)
    names = training_closure()
    # the [train] extra and what those packages need, as installed here
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "click"} <= set(names)
    assert {"tokenizers", "safetensors", "huggingface-hub"} <= set(names)
    # test tools and unrelated packages are not part of it
    assert "pytest" not in names and "hypothesis" not in names
    # a root's marker is evaluated against the extras asked for
    assert "torch" not in closure(["torch>=2; extra == 'train'"], extras=())
    assert "torch" in closure(["torch>=2; extra == 'train'"], extras=("train",))
    assert closure(["no-such-package-xyz"]) == []


def test_an_in_place_record_locks_only_its_closure(tmp_path):
    from matrix_support import record_json
    from qlora_doctor.matrix.records import record_from_json

    data = record_json("img", "linux-x86_64-py3.12-cu130-sm90",
                       {"torch": "2.11.0", "transformers": "5.17.0", "botorch": "0.18.1", "peft": "0.21.0"})
    assert record_from_json(data, "x").locked_freeze == data["freeze"]  # a fresh venv: all of it
    data.update(mode="in-place", closure=["peft", "torch", "transformers"])
    rec = record_from_json(data, "x")
    assert rec.locked_freeze == {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0"}
    assert rec.to_json()["closure"] == ["peft", "torch", "transformers"]


def test_pips_find_links_and_indexes_reach_uv(tmp_path):
    from qlora_doctor.matrix.runner import pip_sources_as_uv_args

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    listing = (f"global.extra-index-url='file:///nowhere/simple https://download.pytorch.org/whl/cpu'\n"
               f"global.find-links='{wheels}'\n:env:.find-links='{wheels}'\n"
               "global.cert='/etc/ssl/certs/ca-certificates.crt'\ninstall.index-url='https://pypi.org/simple'\n")
    assert pip_sources_as_uv_args(listing) == [
        "--extra-index-url", "https://download.pytorch.org/whl/cpu", "--find-links", str(wheels),
        "--index-url", "https://pypi.org/simple", "--index-strategy", "unsafe-best-match"]
    assert pip_sources_as_uv_args("global.cert='/x'\n") == []


def test_resume_skips_what_is_recorded_as_described_now(tmp_path):
    from qlora_doctor.matrix.runner import already_recorded

    combos = load_combinations(REPO_ROOT / "matrix.yaml")
    combo = next(c for c in combos if c.name == "cpu-tf5.24-peft0.21.2-bnb0.50.2")
    platform = "linux-x86_64-py3.11-cpu"
    results = tmp_path / "r"
    results.mkdir()
    assert not already_recorded(combo, platform, results)
    path = results / f"{combo.name}--{platform}.json"
    path.write_text(json.dumps({"combination": combo.to_json()}))
    assert already_recorded(combo, platform, results)
    # matrix.yaml changed the pins since: the old record does not count
    path.write_text(json.dumps({"combination": {**combo.to_json(), "pins": {"torch": "2.12.0"}}}))
    assert not already_recorded(combo, platform, results)
    path.write_text("{half a reco")
    assert not already_recorded(combo, platform, results)
    # everything recorded: nothing is built or run, each is reported as skipped
    path.write_text(json.dumps({"combination": combo.to_json()}))
    cpu = machine_from_dict(CPU_MACHINE, "cpu")
    summary = run_matrix((combo,), cpu, RunOptions(results_dir=results, repo=None), resume=True)
    assert summary.records == () and "--resume" in summary.skipped[0].reason


def test_a_python_this_host_lacks_is_skipped_and_leaves_the_earlier_record_alone(tmp_path):
    """Learnt the hard way: three good records were overwritten by `install failed: no Python 3.10 interpreter`,
    a fact about the host, not the combination. Such a combination is skipped, naming how to get the Python."""
    combos = parse_combinations({"combinations": [{
        "name": "future-python", "python": "3.99", "expect": "pass", "platforms": ["*"],
        "pins": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
                 "accelerate": "1.12.0"}}]}, "m")
    results = tmp_path / "r"
    results.mkdir()
    earlier = results / "future-python--linux-x86_64-py3.99-cpu.json"
    earlier.write_text('{"verdict": "pass"}')
    summary = run_matrix(combos, machine_from_dict(CPU_MACHINE, "cpu"),
                         RunOptions(results_dir=results, repo=None, cache_dir=tmp_path / "envs"))
    assert summary.records == () and summary.paths == ()
    (skipped,) = summary.skipped
    assert "no Python 3.99 interpreter" in skipped.reason and "uv python install 3.99" in skipped.reason
    assert earlier.read_text() == '{"verdict": "pass"}'

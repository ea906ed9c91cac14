"""lock: selection against fixture records and machine files, lockfile format, drift, repair, constraints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.specifiers import SpecifierSet

from helpers import CPU_MACHINE, machine, write_machine
from matrix_support import record_json, stack, write_records
from qlora_doctor.pins import lock as lk
from qlora_doctor.cli import cli
from qlora_doctor.pins.constraints import constraints_for, negate, render_constraints
from qlora_doctor.knowledge.loading import Conditions, Rule, load_tables
from qlora_doctor.core.machine import machine_from_dict
from qlora_doctor.core.errors import CheckFailed, InputError
from qlora_doctor.matrix.records import load_record, load_records

A100 = {"gpus": [{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_total_mib": 81920}]}

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_records(tmp_path: Path) -> Path:
    return write_records(
        tmp_path / "records",
        record_json("cu118-old", "linux-x86_64-py3.11-cu118-sm80", stack("2.7.1+cu118", "4.57.6", "0.17.1", "0.46.1",
                                                                          "1.10.1", "4.1.1")),
        record_json("cu128-new", "linux-x86_64-py3.11-cu128-sm80", stack("2.11.0+cu128"), date="2026-11-20T00:00:00Z"),
        record_json("cpu", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu")),
        record_json("bad", "linux-x86_64-py3.11-cu130-sm80", stack("2.13.0+cu130", accelerate="1.0.1"), works=False,
                    expect="fail", rule="accel-tf5-min", failed_at="check"),
    )


def test_newest_fitting_record_wins(gpu_records):
    fit = lk.choose_record(load_records(gpu_records), machine(driver_version="570.86.15"), "3.11", load_tables())
    assert fit.record.name == "cu128-new"


def test_driver_too_old_for_cu128_picks_the_cu118_record(gpu_records, tmp_path):
    mfile = write_machine(tmp_path / "m.json", driver_version="470.82.01")
    result = CliRunner().invoke(cli, ["lock", "--machine", str(mfile), "--results", str(gpu_records)])
    assert result.exit_code == 0, result.output
    assert "torch==2.7.1+cu118" in result.output
    assert "--extra-index-url https://download.pytorch.org/whl/cu118" in result.output
    assert "# source: matrix record matrix-results/cu118-old--linux-x86_64-py3.11-cu118-sm80.json" in result.output
    assert f"# regenerate: qlora-doctor lock --machine {mfile}" in result.output


def test_no_fit_names_the_closest_record_and_why(tmp_path):
    folder = write_records(tmp_path / "r", record_json("cu128-new", "linux-x86_64-py3.11-cu128-sm80",
                                                       stack("2.11.0+cu128")))
    with pytest.raises(CheckFailed) as err:
        lk.choose_record(load_records(folder), machine(driver_version="470.82.01"), "3.11", load_tables())
    text = err.value.messages[0]
    assert "Closest: cu128-new" in text
    assert "driver 470.82.01 is too old for CUDA 12.8 (needs >= 525.60.13)" in text


def test_python_and_gpu_must_fit(gpu_records):
    records = load_records(gpu_records)
    with pytest.raises(CheckFailed, match="tested on Python 3.11, wanted 3.12"):
        lk.choose_record(records, machine(driver_version="570.86.15"), "3.12", load_tables())
    cpu = machine_from_dict(CPU_MACHINE, "cpu")
    assert lk.choose_record(records, cpu, "3.11", load_tables()).record.name == "cpu"


def test_keep_and_constraints_pick_the_newest_record_agreeing_with_them(gpu_records, tmp_path):
    records = load_records(gpu_records)
    m = machine(driver_version="570.86.15")
    kept = lk.choose_record(records, m, "3.11", load_tables(), keep=lk.parse_keep(("transformers==4.57.6",)))
    assert kept.record.name == "cu118-old"
    cfile = tmp_path / "c.txt"
    cfile.write_text("transformers<5  # stay on 4.x\n")
    assert lk.choose_record(records, m, "3.11", load_tables(),
                            constraints=lk.load_constraints(cfile)).record.name == "cu118-old"
    with pytest.raises(InputError, match="--keep torch: expected name==version"):
        lk.parse_keep(("torch",))


def test_lockfile_refuses_to_overwrite_different_pins_without_force(gpu_records, tmp_path):
    out = tmp_path / "lock.txt"
    mfile = write_machine(tmp_path / "m.json", driver_version="570.86.15")
    runner = CliRunner()
    assert runner.invoke(cli, ["lock", "--machine", str(mfile), "--results", str(gpu_records), "-o", str(out)]).exit_code == 0
    first = out.read_text()
    again = runner.invoke(cli, ["lock", "--machine", str(mfile), "--results", str(gpu_records), "-o", str(out)])
    assert again.exit_code == 0 and "unchanged" in again.output and out.read_text() == first
    other = runner.invoke(cli, ["lock", "--machine", str(mfile), "--results", str(gpu_records), "-o", str(out),
                                "--keep", "transformers==4.57.6"])
    assert other.exit_code == 2 and "exists with different pins; pass --force" in other.output
    forced = runner.invoke(cli, ["lock", "--machine", str(mfile), "--results", str(gpu_records), "-o", str(out),
                                 "--keep", "transformers==4.57.6", "--force"])
    assert forced.exit_code == 0 and "transformers==4.57.6" in out.read_text()


def test_check_reports_drift(tmp_path):
    lock = lk.Lockfile({"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2"}, (), ("x",))
    diffs = lk.drift(lock, {"torch": "2.13.0+cpu", "transformers": "5.17.0", "pytest": "8.0.0"})
    assert [d.describe() for d in diffs] == ["peft: locked 0.21.2, not installed",
                                             "transformers: locked 5.24.0, installed 5.17.0",
                                             "pytest: installed 8.0.0, not in the lockfile"]
    assert lk.has_drift(diffs)
    assert not lk.has_drift(lk.drift(lock, {"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2",
                                            "pytest": "8.0.0"}))


def test_check_cli_exit_codes_against_the_installed_env(tmp_path):
    pins = lk.lockable_pins(lk.installed_versions())
    exact = tmp_path / "exact.txt"
    exact.write_text(lk.Lockfile(pins, lk.torch_index_urls(pins), ("test",)).render())
    result = CliRunner().invoke(cli, ["lock", "--check", str(exact)])
    assert result.exit_code == 0, result.output
    drifted = tmp_path / "drifted.txt"
    drifted.write_text(exact.read_text().replace(f"peft=={pins['peft']}", "peft==0.13.0"))
    result = CliRunner().invoke(cli, ["lock", "--check", str(drifted)])
    assert result.exit_code == 1 and f"peft: locked 0.13.0, installed {pins['peft']}" in result.output


def test_repair_changes_the_fewest_packages(tmp_path):
    folder = write_records(tmp_path, record_json("a", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu")),
                           record_json("b", "linux-x86_64-py3.11-cpu",
                                       stack("2.13.0+cpu", "5.17.0", "0.21.0", "0.49.2", "1.12.0")))
    installed = {**stack("2.13.0+cpu", "5.17.0", "0.21.0", "0.49.2", "1.0.1"), "pytest": "8.0"}
    fix = lk.choose_repair(load_records(folder), machine_from_dict(CPU_MACHINE, "cpu"), "3.11", load_tables(),
                           installed)
    assert fix.fit.record.name == "b"
    assert fix.changes == (("accelerate", "1.0.1", "1.12.0"),)
    assert fix.command == "pip install accelerate==1.12.0"


# --- constraints --------------------------------------------------------------------------------

def _rule(rid: str, severity: str = "fail", **when) -> Rule:
    packages = tuple((n, SpecifierSet(s)) for n, s in when.pop("packages").items())
    return Rule(id=rid, title=f"title {rid}", severity=severity, cause="c", fix="f", sources=("https://x",),
                when=Conditions(packages=packages, **when))


def test_negation_of_ranges():
    assert negate(SpecifierSet("<0.39.0")) == ">=0.39.0"
    assert negate(SpecifierSet(">=2.11")) == "<2.11"
    assert negate(SpecifierSet("==0.45.0")) == "!=0.45.0"
    assert negate(SpecifierSet(">=0.45,<0.46")) == "!=0.45.*"
    assert negate(SpecifierSet(">=5.0,<6")) == "!=5.*"
    assert negate(SpecifierSet(">=0.45.3,<0.47.0")) is None  # needs "or": not expressible


def test_constraints_for_a_machine():
    rules = (
        _rule("bnb-old", packages={"bitsandbytes": "<0.39.0"}),
        _rule("bnb-series", packages={"bitsandbytes": ">=0.45,<0.46"}, gpu_vendor=("nvidia",)),
        _rule("windows-only", packages={"bitsandbytes": "<0.43.0"}, os=("windows",)),
        _rule("odd-range", packages={"peft": ">=0.13.1,<0.15.0"}),
        _rule("two-packages", packages={"transformers": ">=5", "accelerate": "<1.1"}),
        _rule("torch-build", packages={"bitsandbytes": "<0.48"}, torch_cuda=SpecifierSet(">=13.0")),
        _rule("advice", severity="warn", packages={"peft": "<0.6.0"}),
    )
    lines, skipped = constraints_for(machine(), rules)
    assert [(l.requirement, l.rule_id) for l in lines] == [("bitsandbytes>=0.39.0", "bnb-old"),
                                                           ("bitsandbytes!=0.45.*", "bnb-series")]
    assert {s.rule_id for s in skipped} == {"odd-range", "two-packages", "torch-build"}
    cpu_lines, _ = constraints_for(machine_from_dict(CPU_MACHINE, "cpu"), rules)
    assert [l.rule_id for l in cpu_lines] == ["bnb-old"]  # the nvidia-only rule does not hold there
    text = render_constraints(machine(), lines, skipped, "qlora-doctor constraints")
    assert "bitsandbytes>=0.39.0  # rule bnb-old: title bnb-old" in text
    odd = next(line for line in text.splitlines() if "rule odd-range:" in line)
    assert odd.startswith("#   rule odd-range: peft") and "has no single-range complement" in odd


def test_constraints_cli_from_the_shipped_knowledge_base(tmp_path):
    mfile = tmp_path / "cpu.json"
    mfile.write_text(json.dumps(CPU_MACHINE))
    result = CliRunner().invoke(cli, ["constraints", "--machine", str(mfile)])
    assert result.exit_code == 0, result.output
    reqs = [l for l in result.output.splitlines() if l and not l.startswith("#")]
    assert reqs and all("  # rule " in l for l in reqs)
    from packaging.requirements import Requirement

    for line in reqs:
        Requirement(line.split("#")[0].strip())  # each line is a valid pip requirement


# --- shipped lockfiles ----------------------------------------------------------------------------

LOCKFILES = sorted((REPO_ROOT / "lockfiles").glob("*.txt"))


def test_lockfiles_exist_for_the_tested_platforms():
    assert LOCKFILES, "lockfiles/ is empty: write one per tested platform with `qlora-doctor lock -o`"


@pytest.mark.parametrize("path", LOCKFILES, ids=[p.name for p in LOCKFILES])
def test_each_lockfile_parses_and_matches_its_record(path: Path):
    lock = lk.parse_lockfile(path.read_text(), str(path))
    source = header_value(lock, "source")
    assert source and source.startswith("matrix record matrix-results/"), source
    record = load_record(REPO_ROOT / source.split()[2])
    assert record.works and record.verdict == "pass"
    assert lock.pins == lk.lockable_pins(record.locked_freeze)
    assert lock.index_urls == lk.torch_index_urls(record.freeze)
    assert header_value(lock, "platform").split()[0] == record.platform
    assert header_value(lock, "status") == "tested"


@pytest.mark.slow
def test_lock_untested_resolves_with_pip_and_vets(tmp_path):
    """Real pip resolution against PyPI (reachable on CI), under the knowledge base's constraints."""
    import json as _json

    machine = tmp_path / "a100.json"
    machine.write_text(_json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": "550.54.15",
                                    "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
                                              "memory_total_mib": 81920}]}))
    out = tmp_path / "lock.txt"
    result = CliRunner().invoke(cli, ["lock", "--untested", "--machine", str(machine), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "UNTESTED" in text
    torch_pin = next(line for line in text.splitlines() if line.startswith("torch=="))
    assert torch_pin.split("+")[1].startswith("cu12"), torch_pin  # driver 550 runs CUDA 12.x, not 13
    assert "--extra-index-url https://download.pytorch.org/whl/cu12" in text
    assert not any(line.startswith("nvidia-") for line in text.splitlines())


def header_value(lock: lk.Lockfile, key: str) -> str | None:
    return next((h.split(":", 1)[1].strip() for h in lock.header if h.startswith(f"{key}:")), None)


GPU_MACHINES = ["t4-550", "v100-535", "a10g-535", "l4-550", "a100-550", "rtx3090-535", "rtx4090-570", "h100-580",
                "rtx5090-575"]


@pytest.mark.parametrize("name", GPU_MACHINES)
def test_lock_for_the_machines_people_have(name, tmp_path):
    """Issue #16: `lock --machine` for common GPUs without a GPU record: the Python level from a tested CPU
    record, torch built for the driver and the GPU's architecture, its CUDA libraries from its own index
    (never CUDA packages of another variant), and the doctor passes the lock for that machine."""
    machine = REPO_ROOT / "qlora_doctor" / "knowledge" / "data" / "machines" / f"{name}.json"
    out = tmp_path / "lock.txt"
    made = CliRunner().invoke(cli, ["lock", "--machine", str(machine), "--python", "3.11", "-o", str(out)])
    assert made.exit_code == 0, made.output
    lock = lk.parse_lockfile(out.read_text(), str(out))
    torch = lock.pins["torch"]
    variant = torch.split("+")[1]
    assert variant.startswith("cu")
    assert lock.index_urls == (f"https://download.pytorch.org/whl/{variant}",)
    assert not [p for p in lock.pins if p.startswith(("nvidia-", "cuda-")) or p == "triton"]
    assert "PARTLY TESTED" in header_value(lock, "status") and "Python level tested on CPU" in header_value(lock, "source")
    judged = CliRunner().invoke(cli, ["check", "-r", str(out), "--no-resolve", "--machine", str(machine), "--json"])
    report = json.loads(judged.stdout)
    assert report["status"] != "fail", [c for c in report["checks"] if c["status"] == "fail"]


def test_repair_on_a_gpu_machine_without_a_gpu_record_moves_to_what_lock_writes(tmp_path):
    """A T4 box (driver 550) with only CPU records: --repair aims at the same set `lock --machine` writes, the CPU
    record's Python level and a CUDA 12 torch build from its index, and says so instead of refusing."""
    folder = write_records(tmp_path, record_json("cpu", "linux-x86_64-py3.11-cpu", stack("2.13.0+cpu", accelerate="1.12.0")))
    t4 = machine_from_dict({**json.loads((REPO_ROOT / "qlora_doctor/knowledge/data/machines/t4-550.json").read_text()),
                            "python": "3.11.9"}, "t4")
    installed = {**stack("2.13.0+cpu", accelerate="1.0.1"), "pytest": "8.0"}
    fix = lk.choose_repair(load_records(folder), t4, "3.11", load_tables(), installed)
    lock = lk.lockfile_for_gpu_from_cpu_record(load_records(folder), t4, "3.11", load_tables(), "x", None)
    assert fix.fit.record.name == "cpu" and "Python level tested on CPU" in fix.source
    changed = {name: new for name, _, new in fix.changes}
    assert changed["accelerate"] == "1.12.0" and changed["torch"] == lock.pins["torch"]
    assert changed["torch"].split("+")[1].startswith("cu12")
    assert f"--extra-index-url {lock.index_urls[0]}" in fix.command
    assert fix.problems == ()


def test_the_torch_build_follows_the_driver_and_the_gpu():
    from qlora_doctor.core.machine import machine_from_dict
    from qlora_doctor.knowledge.loading import load_tables

    def machine(name, cc, driver):
        return machine_from_dict({"os": "linux", "arch": "x86_64", "python": "3.11.9", "driver_version": driver,
                                  "gpus": [{"name": name, "compute_capability": cc}]}, "m")

    tables = load_tables()
    assert lk.choose_torch_build(machine("H100", "9.0", "580.65.06"), ["2.13.0"], tables).variant == "cu130"
    assert lk.choose_torch_build(machine("T4", "7.5", "550.54.15"), ["2.13.0"], tables).variant == "cu126"
    # an RTX 5090 (sm_120) with driver 575: no 2.13 build runs there (cu126 lacks sm_120, cu13x needs 580)
    assert lk.choose_torch_build(machine("RTX 5090", "12.0", "575.57.08"), ["2.13.0"], tables) is None
    assert lk.choose_torch_build(machine("RTX 5090", "12.0", "575.57.08"), ["2.13.0", "2.11.0"], tables).variant == "cu128"
    assert lk.choose_torch_build(machine("old", "7.5", "470.82.01"), ["2.13.0"], tables) is None


def test_repair_avoids_a_record_a_rule_forbids_beside_what_else_is_installed(tmp_path):
    # Installed: gradio 4.44 (imports HfFolder), huggingface_hub 0.36 and an old accelerate. Record "near" fixes
    # accelerate and brings huggingface_hub 1.33, which the knowledge base says breaks gradio 4 (HfFolder is
    # gone); record "far" also has gradio 5.9.1 and breaks nothing: the repair takes "far" though it changes
    # more, and with only "near" on offer it names the rule it leaves failing.
    hub = {"huggingface-hub": "1.33.0"}
    near = stack("2.13.0+cpu", accelerate="1.12.0", **hub)
    far = stack("2.13.0+cpu", accelerate="1.12.0", gradio="5.9.1", **hub)
    folder = write_records(tmp_path, record_json("near", "linux-x86_64-py3.11-cpu", near),
                           record_json("far", "linux-x86_64-py3.11-cpu", far))
    installed = {**stack("2.13.0+cpu", accelerate="1.0.1"), "huggingface-hub": "0.36.0", "gradio": "4.44.0"}
    cpu = machine_from_dict(CPU_MACHINE, "cpu")
    fix = lk.choose_repair(load_records(folder), cpu, "3.11", load_tables(), installed)
    assert fix.fit.record.name == "far" and fix.problems == ()
    assert ("gradio", "4.44.0", "5.9.1") in fix.changes
    only_near = write_records(tmp_path / "n", record_json("near", "linux-x86_64-py3.11-cpu", near))
    fix = lk.choose_repair(load_records(only_near), cpu, "3.11", load_tables(), installed)
    assert fix.fit.record.name == "near"
    assert [p.split(":")[1] for p in fix.problems] == ["hub-hffolder-gradio"]


def test_the_torch_build_fix_names_the_variant_lock_would_choose():
    from qlora_doctor.doctor.environment import torch_build_checks
    from qlora_doctor.sources.requirements import environment_from_pins

    t4 = machine_from_dict(json.loads((REPO_ROOT / "qlora_doctor/knowledge/data/machines/t4-550.json").read_text()), "t4")
    env = environment_from_pins({"torch": "2.13.0+cpu"}, "test")
    [check] = torch_build_checks(t4, env, load_tables())
    choice = lk.choose_torch_build(t4, ["2.13.0"], load_tables())
    assert check.status == "fail" and choice is not None
    assert f"whl/{choice.variant} " in check.fix and "sm_75" in check.fix


@pytest.mark.parametrize("gpu, driver, says", [
    ("Tesla K80", "470.82.01", "older than the tested torch releases support"),  # not the driver's fault
    ("NVIDIA A100-SXM4-40GB", "418.67", "upgrade the NVIDIA driver (a newer one would get torch"),
    # a collect_env pasted without its driver line (tests/data/machine_corpus/10-...): ask for it, not to upgrade
    ("NVIDIA A100 80GB PCIe", None, "names no NVIDIA driver version, and the torch build depends on it: add "
                                    "`driver_version`"),
    # no record of that Python / OS: say what is tested
    ("NVIDIA A10G", "535.104.05", "no passing CPU record for Python 3.9 to take the Python-level packages from "
                                  "(tested: Python 3.10, 3.11, 3.12, 3.13)"),
    ("windows", "551.86", "no passing record for windows x86_64 (the tested ones: linux x86_64)"),
])
def test_when_no_build_fits_the_refusal_names_what_stands_in_the_way(gpu, driver, says):
    machine = json.dumps({"gpus": [gpu], "driver_version": driver, "python": "3.11.9"})
    if gpu == "NVIDIA A10G":
        machine = json.dumps({"gpus": [gpu], "driver_version": driver, "python": "3.9.18"})
    elif gpu == "windows":
        machine = json.dumps({"os": "windows", "gpus": ["NVIDIA GeForce RTX 3090"], "driver_version": driver,
                              "python": "3.11.9"})
    result = CliRunner().invoke(cli, ["lock", "--machine", machine])
    assert result.exit_code == 1 and says in result.output, result.output

"""A run's life, recorded and reported (issue #17): `--json` gives exactly one JSON document on stdout for a
finished, a refused and a failed run; the manifest goes running -> completed | failed | stopped; a failed
folder without checkpoints is reused; `--resume` on a finished run says so and changes nothing; the
resume hint repeats the command with its --set options."""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.cli.run import _print_run
from tests.helpers import write_machine
from tests.trainer_support import builtin_checkpoint, write_tiny_recipe  # noqa: F401 (fixture)


def _json(result) -> dict:
    data = json.loads(result.stdout)  # stdout is exactly one JSON document
    assert data["schema_version"] == 1
    return data


def test_refused_run_json_is_one_document_with_the_report(tmp_path):
    recipe = write_tiny_recipe(tmp_path, bf16=True)
    t4 = write_machine(tmp_path / "t4.json", gpus=[{"name": "Tesla T4", "compute_capability": "7.5",
                                                     "memory_total_mib": 15360}])
    result = CliRunner().invoke(cli, ["run", str(recipe), "--machine", str(t4), "--json"])
    assert result.exit_code == 1
    data = _json(result)
    assert data["status"] == "refused" and data["report"]["status"] == "fail"
    assert any(c["id"] == "recipe.precision" and c["status"] == "fail" for c in data["report"]["checks"])


@pytest.mark.slow
def test_failed_run_is_recorded_and_its_folder_reused(tmp_path, builtin_checkpoint):
    recipe = write_tiny_recipe(tmp_path)
    # the first rows are fine (the preflight reads those); a later row is broken, found while tokenizing
    good = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()
    rows = (good * 10)[:30] + ['{"messages": "not a list of messages"}']
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    failed = CliRunner().invoke(cli, ["run", str(recipe), "--json"])
    assert failed.exit_code != 0
    data = _json(failed)
    assert data["status"] == "error" and data["errors"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"]
    # the next run reuses the folder of a run that failed before any checkpoint, without --overwrite
    again = CliRunner().invoke(cli, ["run", str(recipe), "--json"])
    assert "not empty" not in again.output


@pytest.mark.slow
def test_finished_run_json_and_resume_on_it(tmp_path, builtin_checkpoint):
    recipe = write_tiny_recipe(tmp_path, max_steps=2)
    done = CliRunner().invoke(cli, ["run", str(recipe), "--json"])
    assert done.exit_code == 0, done.output
    data = _json(done)
    assert data["status"] == "completed" and data["steps"] == 2 and "adapter_model.safetensors" in data["files"]
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # loads elsewhere
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["base_model_path"].endswith("smollm2-135m-instruct")
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "2 optimizer steps" in card
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = CliRunner().invoke(cli, ["run", str(recipe), "--resume"])
    assert again.exit_code == 0, again.output
    assert "finished run" in again.output and "nothing to resume" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_the_resume_hint_repeats_the_command_with_its_overrides(capsys, tmp_path):
    class Stopped:
        status, steps, wall_seconds, skip_check, check_status = "stopped", 3, 12.0, False, "pass"
        eval_loss_before = eval_loss_after = train_tokens_per_second = resumed_from = None
        output_dir, files = tmp_path, ()

    argv = ["qlora-doctor", "run", "demo", "--set=training.max_steps=9", "--machine", "m.json"]
    _print_run(Stopped(), argv)
    hint = capsys.readouterr().out.splitlines()[1].strip()
    assert shlex.split(hint) == [*argv, "--resume"]


def test_written_files_follow_the_umask(tmp_path):
    import os

    from qlora_doctor.core.fileio import apply_umask_modes, write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.json", "{}")
        folder = tmp_path / "merged"
        folder.mkdir(mode=0o700)
        (folder / "weights.bin").write_bytes(b"x")
        os.chmod(folder / "weights.bin", 0o600)
        apply_umask_modes(folder)
    finally:
        os.umask(old)
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755 and (folder / "weights.bin").stat().st_mode & 0o777 == 0o644


def test_a_child_dies_with_its_parent(tmp_path):
    """run_bounded's children (pip in `matrix run`, the smoke test) do not outlive a killed doctor."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child_code = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
    (tmp_path / "child.py").write_text(child_code)
    (tmp_path / "parent.py").write_text(
        "import sys\nfrom qlora_doctor.core.subprocs import run_bounded\n"
        f"run_bounded([sys.executable, {str(tmp_path / 'child.py')!r}], timeout_s=120)\n")
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")])
    for _ in range(600):  # a loaded CI machine can take seconds to start two interpreters
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its killed parent")


def test_the_bitsandbytes_cpu_kernel_warning_is_annotated():
    """Issue #17: every CPU run logged 'Failed to load CPU gemm_4bit_forward ... Set trust_remote_code=True';
    runs now say what it means and that remote code is not the fix (a fresh process: bitsandbytes logs it
    once, at import)."""
    import subprocess
    import sys

    raw = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if "Failed to load CPU gemm_4bit_forward" not in raw.stderr:
        pytest.skip("this CPU does not trigger the warning (no AVX512-BF16)")
    annotated = subprocess.run([sys.executable, "-c", "from qlora_doctor.trainer.known_warnings import "
                                "annotate_known_warnings as a; a(); import bitsandbytes"],
                               capture_output=True, text=True, timeout=300)
    assert "Do not set trust_remote_code" in annotated.stderr
    assert "Set trust_remote_code=True" not in annotated.stderr

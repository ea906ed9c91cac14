"""`qlora-doctor run` refusals and the output-folder rules: nothing here loads a model."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.core.errors import InputError
from qlora_doctor.trainer import outputs
from tests.helpers import write_machine
from tests.trainer_support import write_tiny_recipe


def _no_loading(monkeypatch):
    """Make any attempt to load a model or data fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("run loaded a model although it should have refused first")

    import qlora_doctor.trainer.model as model_mod

    monkeypatch.setattr(model_mod, "load_for_training", refuse)
    monkeypatch.setattr(model_mod, "load_tokenizer", refuse)


def test_failing_check_refuses_with_exit_1_before_loading(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    recipe = write_tiny_recipe(tmp_path, bf16=True)
    t4 = write_machine(tmp_path / "t4.json", gpus=[{"name": "Tesla T4", "compute_capability": "7.5",
                                                     "memory_total_mib": 15360}])
    result = CliRunner().invoke(cli, ["run", str(recipe), "--machine", str(t4)])
    assert result.exit_code == 1, result.output
    assert "training refused" in result.output
    assert "bf16" in result.output.lower()
    assert not (tmp_path / "out").exists()


def test_failing_check_from_environment_machine_file(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    recipe = write_tiny_recipe(tmp_path, bf16=True)
    t4 = write_machine(tmp_path / "t4.json", gpus=[{"name": "Tesla T4", "compute_capability": "7.5"}])
    monkeypatch.setenv("QLORA_DOCTOR_MACHINE", str(t4))
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused_with_exit_2(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    recipe = write_tiny_recipe(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "--resume" in result.output and "--overwrite" in result.output
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_no_run_made(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    recipe = write_tiny_recipe(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--overwrite"])
    assert result.exit_code == 2, result.output
    assert "no manifest.json" in result.output
    assert (tmp_path / "out" / "notes.txt").exists()


def test_resume_without_a_complete_checkpoint_is_refused(tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    recipe = write_tiny_recipe(tmp_path)
    partial = tmp_path / "out" / "checkpoint-2"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--resume"])
    assert result.exit_code == 2, result.output
    assert "no complete checkpoint" in result.output


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(InputError, match="choose one"):
        outputs.plan_output_dir(tmp_path, resume=True, overwrite=True, where="r.yaml")


def test_last_complete_checkpoint_skips_partial_and_corrupt_ones(tmp_path):
    for step, state in ((2, "{}"), (4, "{}"), (6, None), (8, '{"global_step": ')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / outputs.TRAINER_STATE).write_text(state)
    (tmp_path / "checkpoint-10").write_text("a file, not a folder")
    (tmp_path / "checkpoint-x").mkdir()
    assert outputs.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_numeric_not_lexical_checkpoint_order(tmp_path):
    for step in (9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / outputs.TRAINER_STATE).write_text("{}")
    assert outputs.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_overwrite_never_deletes_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / outputs.MANIFEST).write_text("{}")
    with pytest.raises(InputError, match="current, home or root"):
        outputs.plan_output_dir(Path("."), resume=False, overwrite=True, where="r.yaml")


def test_overwrite_plans_replacing_a_previous_run(tmp_path):
    (tmp_path / outputs.MANIFEST).write_text("{}")
    plan = outputs.plan_output_dir(tmp_path, resume=False, overwrite=True, where="r.yaml")
    assert plan.replace_existing and plan.resume_from is None
    assert (tmp_path / outputs.MANIFEST).exists()  # deleted only after the checks pass


def test_lockfile_pins_are_exact_and_sorted():
    from importlib.metadata import version

    pins = outputs.installed_pins()
    names = [p.split("==")[0] for p in pins]
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert f"torch=={version('torch')}" in pins
    assert f"transformers=={version('transformers')}" in pins


def test_sigterm_asks_the_trainer_to_save_and_stop():
    from transformers import TrainerControl

    from qlora_doctor.trainer.callbacks import StopOnSignal

    stop = StopOnSignal()
    control = TrainerControl()
    stop.on_step_end(None, None, control)
    assert not control.should_save and not control.should_training_stop
    with stop.installed():
        signal.raise_signal(signal.SIGTERM)
        stop.on_step_end(None, None, control)
    assert stop.signal_name == "SIGTERM"
    assert control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_generate_on_a_folder_without_a_run(tmp_path):
    result = CliRunner().invoke(cli, ["generate", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 2, result.output
    assert "adapter_model.safetensors" in result.output


def test_merge_refuses_a_non_empty_target(tmp_path):
    (tmp_path / "to").mkdir()
    (tmp_path / "to" / "x").write_text("x")
    result = CliRunner().invoke(cli, ["merge", str(tmp_path), "--to", str(tmp_path / "to")])
    assert result.exit_code == 2, result.output
    assert "not an empty folder" in result.output


def test_a_run_plans_memory_once(tmp_path, monkeypatch):
    """The run plan is decided once: the memory planner runs one time per `run` (the doctor's memory and
    strategy checks read the plan's prediction; the trainer never imports the planner,
    tests/test_architecture.py). Here on a described 2 x H100 with `checkpoint_layers: auto` and ddp, where
    the auto choice, the memory check and the strategy check all need it; the CPU build of torch then fails
    the checks, so nothing loads."""
    import qlora_doctor.memory.plan as planner

    _no_loading(monkeypatch)
    calls = []
    real = planner.plan_recipe
    monkeypatch.setattr(planner, "plan_recipe", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = write_tiny_recipe(tmp_path)
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}
    gpus = write_machine(tmp_path / "h100x2.json", gpus=[h100, h100])
    result = CliRunner().invoke(cli, ["run", str(recipe), "--machine", str(gpus), "--set",
                                      "performance.checkpoint_layers=auto", "--set", "distributed.strategy=ddp"])
    assert result.exit_code == 1, result.output
    assert len(calls) == 1

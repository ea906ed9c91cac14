"""A run that watches itself (issue #21): the diagnosis on synthetic log histories, a pasted Trainer log,
and real runs of the builtin model on the CPU that diverge, do not learn, or stay healthy."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.trainer.watch import (EXIT_DIVERGED, Watchdog, WatchSettings, diagnose_history, parse_trainer_log,
                                        settings_from_recipe_data)
from tests.trainer_support import builtin_checkpoint, write_tiny_recipe  # noqa: F401 (fixture)


def _train(losses, start=1, lr=2e-4, grad=None):
    return [{"step": start + i, "loss": loss, "learning_rate": lr, **({"grad_norm": grad[i]} if grad else {})}
            for i, loss in enumerate(losses)]


def _evals(pairs):
    return [{"step": step, "eval_loss": loss} for step, loss in pairs]


# --- synthetic histories --------------------------------------------------------------------------------

def test_a_healthy_history_has_no_finding():
    history = _train([2.7, 2.5, 2.2, 1.9, 1.6, 1.4, 1.2, 1.1]) + _evals([(0, 3.3), (4, 2.0), (8, 1.3)])
    assert diagnose_history(history, WatchSettings(learning_rate=2e-4)) == []


def test_nan_loss_is_fatal_and_blames_the_learning_rate():
    [finding] = diagnose_history(_train([2.7, 2.4, float("nan")]), WatchSettings(learning_rate=0.05))
    assert finding.kind == "nan" and finding.fatal and finding.step == 3
    assert finding.parameter == "training.learning_rate" and "2.0e-04" in finding.fix


def test_nan_with_fp16_blames_the_precision():
    [finding] = diagnose_history(_train([2.7, math.inf]), WatchSettings(learning_rate=2e-4, fp16=True))
    assert finding.kind == "nan" and finding.parameter == "training.fp16" and "bf16" in finding.fix


def test_a_rising_loss_after_warm_up_is_divergence():
    # the demo with learning_rate 1e-3 (recipes/demo.yaml): 2.7 -> 8.4 by step 45
    history = _train([2.7, 2.6, 2.5, 2.9, 4.0, 6.1, 7.9, 8.4])
    [finding] = diagnose_history(history, WatchSettings(learning_rate=1e-3, warmup_steps=2))
    assert finding.kind == "diverged" and finding.fatal and finding.parameter == "training.learning_rate"
    assert "1.0e-04" in finding.fix and finding.evidence["start_loss"] == pytest.approx(2.6)


def test_a_rise_during_warm_up_is_not_judged_yet():
    history = _train([2.7, 2.6, 2.5, 2.9, 4.0, 6.1, 7.9, 8.4])
    assert diagnose_history(history, WatchSettings(warmup_steps=8)) == []


def test_warm_up_defaults_to_where_the_logged_learning_rate_peaks():
    rising = [{"step": i + 1, "loss": loss, "learning_rate": 1e-3 * min(1.0, (i + 1) / 4)}
              for i, loss in enumerate([2.7, 2.6, 2.5, 2.9, 4.0, 6.1, 7.9, 8.4])]
    assert diagnose_history(rising[:6]) == []              # 2 logs after warm-up: still warming up at the last log
    assert diagnose_history(rising)[0].kind == "diverged"


def test_small_noise_on_a_low_loss_is_not_divergence():
    history = _train([0.30, 0.25, 0.20, 0.35, 0.40, 0.45])  # 1.6x the start, but 0.15 above it
    assert diagnose_history(history, WatchSettings(warmup_steps=0)) == []


def test_a_gradient_norm_blow_up_with_a_rising_loss_is_divergence():
    history = _train([2.0, 1.9, 1.9, 2.0, 2.1, 2.3], grad=[0.5, 0.4, 0.6, 0.5, 5.0, 80.0])
    [finding] = diagnose_history(history, WatchSettings(warmup_steps=0))
    assert finding.kind == "diverged" and "gradient norm" in finding.summary


def test_flat_eval_and_train_loss_is_not_learning_and_blames_a_tiny_learning_rate():
    history = _train([2.50, 2.52, 2.49, 2.51, 2.50, 2.50], lr=1e-9) + _evals([(0, 3.3), (2, 3.3), (4, 3.3), (6, 3.3)])
    [finding] = diagnose_history(history, WatchSettings(learning_rate=1e-9, warmup_steps=0))
    assert finding.kind == "not_learning" and not finding.fatal
    assert finding.parameter == "training.learning_rate" and "2.0e-4" in finding.fix


def test_flat_eval_with_high_dropout_blames_the_dropout():
    history = _train([2.5] * 6) + _evals([(0, 3.3), (2, 3.3), (4, 3.3), (6, 3.3)])
    [finding] = diagnose_history(history, WatchSettings(learning_rate=2e-4, lora_dropout=0.9, warmup_steps=0))
    assert finding.parameter == "lora.lora_dropout"


def test_flat_eval_while_the_training_loss_falls_is_not_a_plateau():
    history = _train([2.5, 2.3, 2.0, 1.7, 1.4, 1.1]) + _evals([(0, 3.3), (2, 3.3), (4, 3.3), (6, 3.3)])
    assert [f.kind for f in diagnose_history(history, WatchSettings(warmup_steps=0))] == []


def test_eval_rising_while_train_falls_is_overfitting():
    history = (_train([2.5, 2.0, 1.5, 1.0, 0.6, 0.3, 0.15, 0.08])
               + _evals([(0, 3.3), (2, 2.0), (4, 2.1), (6, 2.3), (8, 2.6)]))
    [finding] = diagnose_history(history, WatchSettings(warmup_steps=0))
    assert finding.kind == "overfitting" and not finding.fatal
    assert finding.evidence["best_step"] == 2 and "early_stopping_patience" in finding.fix


def test_records_before_a_resume_are_not_judged():
    history = _train([2.7, 2.6, 2.5, 2.9, 4.0, 6.1, 7.9, 8.4]) + _train([8.0, 7.0, 6.0, 5.0, 4.5, 4.0], start=9)
    assert diagnose_history(history, WatchSettings(warmup_steps=0), since_step=8) == []


def test_a_pasted_trainer_log_without_an_error_line_is_diagnosed():
    # transformers 5 prints its logs with values as strings
    text = "\n".join(["Some banner", *(f"{{'loss': '{loss}', 'grad_norm': '1.2', 'learning_rate': '0.001', "
                                       f"'epoch': '0.{i}'}}" for i, loss in enumerate([2.7, 2.6, 2.5, 4.1, 7.2, 8.4]))])
    records = parse_trainer_log(text)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[0]["loss"] == 2.7
    result = CliRunner().invoke(cli, ["explain", "-"], input=text)
    assert result.exit_code == 0, result.output
    assert "diverged" in result.output and "training.learning_rate" in result.output


def test_settings_come_from_a_run_folders_recipe_yaml():
    settings = settings_from_recipe_data({"training": {"learning_rate": 0.05, "warmup_steps": 3, "fp16": False},
                                          "lora": {"lora_dropout": 0.9}, "quantization": {}})
    assert settings == WatchSettings(learning_rate=0.05, warmup_steps=3, lora_dropout=0.9)


def test_explain_of_a_folder_without_a_run_is_bad_input(tmp_path):
    result = CliRunner().invoke(cli, ["explain", str(tmp_path)])
    assert result.exit_code == 2 and "metrics.json" in result.output


def test_the_run_help_documents_the_diverged_exit_code():
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert f" {EXIT_DIVERGED} when the run watched itself diverge" in " ".join(result.output.split())


def test_watch_keys_are_not_training_arguments():
    from qlora_doctor.core.machine import machine_from_dict
    from qlora_doctor.recipe.precision import resolve_precision
    from qlora_doctor.recipe.schema import load_recipe
    from qlora_doctor.trainer.arguments import training_arguments_kwargs

    recipe = load_recipe("demo")
    cpu = machine_from_dict({"os": "linux", "arch": "x86_64", "python": "3.11.7", "driver_version": "", "gpus": []},
                            "cpu")
    kwargs = training_arguments_kwargs(recipe, resolve_precision(recipe, cpu))
    assert "watch" not in kwargs and "early_stopping_patience" not in kwargs
    assert recipe.training.watch is True and recipe.training.early_stopping_patience is None


def _fake_trainer(**args):
    from types import SimpleNamespace

    return (SimpleNamespace(save_strategy="steps", learning_rate=2e-4, **args),
            SimpleNamespace(global_step=0, log_history=[]),
            SimpleNamespace(should_training_stop=False, should_save=False, should_evaluate=True))


def _log(dog, args, state, control, record):
    state.global_step = record["step"]
    state.log_history.append(record)
    dog.on_log(args, state, control, logs=record)


def test_the_watchdog_stops_and_saves_on_nan():
    dog = Watchdog(WatchSettings(learning_rate=0.05))
    args, state, control = _fake_trainer()
    _log(dog, args, state, control, {"step": 1, "loss": 2.7, "learning_rate": 0.05})
    assert not control.should_training_stop
    _log(dog, args, state, control, {"step": 2, "loss": float("nan"), "learning_rate": 0.05})
    assert control.should_training_stop and control.should_save and not control.should_evaluate
    assert dog.stopped.kind == "nan" and dog.to_json()["status"] == "diverged"


def test_early_stopping_patience_stops_after_n_evaluations_without_a_new_best():
    dog = Watchdog(WatchSettings(early_stopping_patience=2))
    args, state, control = _fake_trainer()
    for step, loss in [(2, 2.0), (4, 1.5), (6, 1.6)]:
        _log(dog, args, state, control, {"step": step, "eval_loss": loss})
    assert not control.should_training_stop
    _log(dog, args, state, control, {"step": 8, "eval_loss": 1.7})
    assert control.should_training_stop and dog.early_stopped_at == 8 and dog.stopped is None


def test_on_resume_the_recipes_learning_rate_replaces_the_checkpoints():
    import torch

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dog = Watchdog(WatchSettings())
    args, state, control = _fake_trainer()
    state.global_step = 6                                   # resumed at checkpoint-6
    dog.on_step_begin(args, state, control, optimizer=optimizer, lr_scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4) and scheduler.get_last_lr() == [pytest.approx(2e-4)]
    param.grad = torch.zeros(2)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert dog.to_json()["learning_rate_reset"] == {"checkpoint": 0.05, "recipe": 2e-4}


# --- real runs on the CPU -----------------------------------------------------------------------------

def _run(recipe, *args):
    return CliRunner().invoke(cli, ["run", str(recipe), *args])


@pytest.mark.slow
def test_a_diverging_run_stops_with_a_diagnosis_and_resumes_after_the_fix(tmp_path, builtin_checkpoint):
    # one batch is the whole data set (4 rows), so the losses are the same on every run
    recipe = write_tiny_recipe(tmp_path, rows=4, max_steps=12, learning_rate=0.05, per_device_train_batch_size=4,
                               save_steps=4)
    result = _run(recipe)
    assert result.exit_code == EXIT_DIVERGED, result.output
    assert "likely: training.learning_rate" in result.output and "--resume" in result.output
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    stopped = metrics["watch"]["stopped"]
    assert manifest["status"] == "diverged" and manifest["watch"]["stopped"] == stopped
    assert stopped["kind"] in ("nan", "diverged") and stopped["parameter"] == "training.learning_rate"
    assert metrics["steps"] < 12                                   # stopped early
    explained = CliRunner().invoke(cli, ["explain", str(out)])   # the same diagnosis after the fact
    assert explained.exit_code == 0 and stopped["kind"] in explained.output
    assert "training.learning_rate" in explained.output
    # fix the learning rate and continue: the recipe's rate replaces the checkpoint's, and the run finishes
    resumed = _run(recipe, "--resume", "--set", "training.learning_rate=2.0e-4")
    assert resumed.exit_code == 0, resumed.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 12
    assert metrics["watch"]["stopped"] is None
    assert metrics["train_loss_history"][-1]["learning_rate"] <= 2.0e-4


@pytest.mark.slow
def test_a_run_with_a_tiny_learning_rate_is_reported_as_not_learning(tmp_path, builtin_checkpoint):
    # one batch is the whole data set, so the training loss is exactly comparable step to step
    recipe = write_tiny_recipe(tmp_path, rows=4, max_steps=6, learning_rate=1e-9, per_device_train_batch_size=4,
                               eval_strategy="steps", eval_steps=2, save_steps=6)
    result = _run(recipe)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    [warning] = metrics["watch"]["warnings"]
    assert warning["kind"] == "not_learning" and warning["parameter"] == "training.learning_rate"
    assert "not learning" in result.output
    explained = CliRunner().invoke(cli, ["explain", str(tmp_path / "out")])
    assert explained.exit_code == 0 and "not learning" in explained.output

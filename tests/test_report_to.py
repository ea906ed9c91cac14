"""`training.report_to` as a name or a list, `run_name` and `project` (issue #19): the integrations table
against the installed transformers, validation, the doctor's installed-check, and what reaches
TrainingArguments and the environment. Offline; "installed" is faked with a package on sys.path, the way
importlib finds a real one."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from helpers import machine
from qlora_doctor.core.errors import InputError
from qlora_doctor.doctor.recipe import preflight_check
from qlora_doctor.recipe.integrations import integrations, project_environment
from qlora_doctor.recipe.preflight import integration_problems
from qlora_doctor.recipe.schema import apply_overrides, load_recipe
from qlora_doctor.runplan import build_run_plan


def _demo(*overrides: str):
    return apply_overrides(load_recipe("demo"), list(overrides)) if overrides else load_recipe("demo")


def _installed(tmp_path: Path, monkeypatch, *modules: str) -> None:
    for module in modules:
        (tmp_path / module).mkdir(parents=True)
        (tmp_path / module / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_the_table_matches_the_installed_transformers():
    from transformers.integrations import integration_utils

    source = inspect.getsource(integration_utils)
    for integration in integrations().values():
        assert integration.name in integration_utils.INTEGRATION_TO_CALLBACK, integration.name
        assert integration.sources, integration.name
        if integration.project_env:  # the variable is read (or documented) by transformers' integration code
            assert re.search(rf"\b{integration.project_env}\b", source), integration.project_env
    import dataclasses

    from transformers import TrainingArguments

    assert "project" in {f.name for f in dataclasses.fields(TrainingArguments)}  # trackio's `arg`


def test_a_name_a_list_and_none_validate():
    assert _demo().training.report_to == "none" and _demo().training.report_targets == ()
    listed = _demo("training.report_to=[tensorboard, wandb]")
    assert listed.training.report_to == ["tensorboard", "wandb"]
    assert listed.training.report_targets == ("tensorboard", "wandb")
    assert _demo("training.report_to=mlflow").training.report_targets == ("mlflow",)


@pytest.mark.parametrize("value, message", [
    ("wandbb", "'wandbb' is not a transformers report_to integration (did you mean 'wandb'?)"),
    ("[tensorbord]", "did you mean 'tensorboard'?"),
    ("all", "`all` is not accepted"),
    ("[]", "is an empty list"),
    ("[none, wandb]", "lists `none` with integrations"),
    ("[wandb, wandb]", "names wandb more than once"),
])
def test_bad_values_name_the_key_and_the_fix(value, message):
    with pytest.raises(InputError, match=re.escape(message)) as err:
        _demo(f"training.report_to={value}")
    assert "training.report_to" in str(err.value)


def test_each_missing_integration_is_a_refusal_with_one_pip_command(tmp_path, monkeypatch):
    _installed(tmp_path, monkeypatch, "tensorboardX")  # provides tensorboard, as transformers accepts
    recipe = _demo("training.report_to=[tensorboard, wandb, mlflow]")
    problems = integration_problems(recipe, "r.yaml")
    assert len(problems) == 2
    assert problems[0].startswith("r.yaml: training.report_to: wandb is not installed")
    assert all("`pip install wandb mlflow`, or set `training.report_to: tensorboard`" in p for p in problems)
    check = preflight_check(build_run_plan(recipe, machine(gpus=[]), where="r.yaml"), machine(gpus=[]))
    assert check.status == "fail" and "wandb is not installed" in check.detail

    _installed(tmp_path / "more", monkeypatch, "wandb", "mlflow")
    assert integration_problems(recipe, "r.yaml") == []
    check = preflight_check(build_run_plan(recipe, machine(gpus=[]), where="r.yaml"), machine(gpus=[]))
    assert check.status == "pass" and "report_to tensorboard, wandb, mlflow: installed" in check.detail


def test_run_name_and_project_reach_training_arguments_and_the_environment():
    from qlora_doctor.recipe.precision import resolve_precision
    from qlora_doctor.trainer.arguments import integration_environment, training_arguments_kwargs

    cpu = machine(gpus=[])
    plain = _demo()
    kwargs = training_arguments_kwargs(plain, resolve_precision(plain, cpu))
    assert kwargs["run_name"] == "demo" and kwargs["report_to"] == "none"  # output_dir runs/demo
    assert "project" not in kwargs and integration_environment(plain) == {}

    recipe = _demo("training.report_to=[wandb, mlflow, trackio, tensorboard]", "training.project=korrowen",
                   "training.run_name=lr-4e-4")
    kwargs = training_arguments_kwargs(recipe, resolve_precision(recipe, cpu))
    assert (kwargs["run_name"], kwargs["project"]) == ("lr-4e-4", "korrowen")
    assert kwargs["report_to"] == ["wandb", "mlflow", "trackio", "tensorboard"]
    assert integration_environment(recipe) == {"WANDB_PROJECT": "korrowen", "MLFLOW_EXPERIMENT_NAME": "korrowen"}
    from transformers import TrainingArguments

    args = TrainingArguments(**kwargs)
    assert (args.run_name, args.project, args.report_to) == ("lr-4e-4", "korrowen", kwargs["report_to"])
    assert project_environment(("comet_ml", "swanlab", "clearml", "dvclive"), "p") == {
        "COMET_PROJECT_NAME": "p", "SWANLAB_PROJECT": "p", "CLEARML_PROJECT": "p"}

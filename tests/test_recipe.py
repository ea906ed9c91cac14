"""Recipes: every shipped one validates; every kind of user mistake is one InputError / exit 2 that
names the file and the key, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.core.errors import InputError
from qlora_doctor.recipe import schema as recipe_mod
from qlora_doctor.recipe.schema import (REPO_RECIPES, Recipe, apply_overrides, find_recipe, load_recipe,
    recipe_from_dict, recipe_json_schema)
from qlora_doctor.recipe.precision import resolve_precision
from qlora_doctor.trainer.arguments import training_arguments_kwargs

from helpers import CPU_MACHINE, machine

SHIPPED = sorted(REPO_RECIPES.glob("*.yaml"))

MINIMAL = """\
model:
  name_or_path: builtin:smollm2-135m-instruct
dataset:
  path: train.jsonl
  format: chat
training:
  output_dir: out
  max_steps: 10
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    return tmp_path


def write(folder: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(InputError) as info:
        load_recipe(path)
    return info.value.messages


def replace_line(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


# --- shipped recipes -------------------------------------------------------------------------------

def test_repo_ships_the_demo_and_gpu_recipes():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "llama-3.1-8b-alpaca-24gb", "qwen2.5-1.5b-chat-t4"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_opens_with_a_comment(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must open with a comment saying what it does"
    assert "qlora-doctor run" in path.read_text()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_passes_cli_validate(path: Path):
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK ") and result.output.count("\n") == 1


def test_demo_recipe_found_by_name_and_points_at_its_data():
    recipe = load_recipe("demo")
    assert recipe.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert Path(recipe.dataset.path) == (REPO_RECIPES / "data/demo/train.jsonl").resolve()
    assert Path(recipe.dataset.eval_path) == (REPO_RECIPES / "data/demo/eval.jsonl").resolve()
    assert recipe.training.optim == "adamw_torch"  # paged optimizers need CUDA, the demo runs on CPU
    assert recipe.quantization.bnb_4bit_compute_dtype == "auto"
    assert recipe.training.max_seq_length <= 256


def test_hub_dataset_ids_validate_without_network():
    recipe = load_recipe(REPO_RECIPES / "llama-3.1-8b-alpaca-24gb.yaml")
    assert recipe.dataset.is_hub and recipe.dataset.path == "yahma/alpaca-cleaned"


# --- finding recipes ---------------------------------------------------------------------------------

def test_local_recipes_folder_wins_over_the_repo(folder, monkeypatch):
    (folder / "recipes").mkdir()
    (folder / "recipes" / "train.jsonl").write_text("{}\n")
    write(folder / "recipes", MINIMAL, "demo.yaml")
    monkeypatch.chdir(folder)
    assert find_recipe("demo") == folder / "recipes" / "demo.yaml"


def test_unknown_recipe_name_suggests_a_close_one():
    with pytest.raises(InputError, match=r"no such recipe.*did you mean 'demo'"):
        find_recipe("dmeo")


# --- errors --------------------------------------------------------------------------------------

def test_minimal_recipe_fills_defaults(folder):
    recipe = load_recipe(write(folder, MINIMAL))
    assert (recipe.lora.r, recipe.lora.lora_alpha, recipe.lora.target_modules) == (16, 32, "all-linear")
    assert recipe.quantization.bnb_4bit_quant_type == "nf4"
    assert recipe.training.learning_rate == 2e-4


def test_all_errors_reported_at_once_with_file_and_key(folder):
    text = MINIMAL.replace("  format: chat\n", "  format: chatt\n") + "lora:\n  r: 0\n  lora_alpah: 3\n"
    path = write(folder, text)
    messages = errors_of(path)
    where = recipe_mod.display_path(path)
    assert f"{where}: lora.r: must be > 0, got 0" in messages
    assert f"{where}: lora.lora_alpah: unknown key 'lora_alpah' (did you mean 'lora_alpha'?)" in messages
    assert any(m.startswith(f"{where}: dataset.format: 'chatt' is not one of text, alpaca, chat") for m in messages)
    assert len(messages) == 3


def test_number_as_a_key_is_an_unknown_key(folder):
    messages = errors_of(write(folder, MINIMAL + "1: 2\n"))
    assert any(m.endswith(": 1: unknown key '1' (expected one of model, quantization, lora, dataset, datasets, training, performance, distributed)")
               for m in messages), messages


def test_unknown_section_is_named(folder):
    messages = errors_of(write(folder, MINIMAL + "trainig:\n  seed: 1\n"))
    assert any("trainig: unknown key 'trainig' (did you mean 'training'?)" in m for m in messages)


@pytest.mark.parametrize("line, key, expected", [
    ("  max_steps: ten", "training.max_steps", "expected a whole number or null, got 'ten'"),
    ("  max_steps: 2.5", "training.max_steps", "expected a whole number or null, got 2.5"),
    ("  max_steps: [1]", "training.max_steps", "expected a whole number or null, got a list"),
    ("  max_steps: 10\n  fp16: maybe", "training.fp16", "expected one of auto or true or false, got 'maybe'"),
    ("  max_steps: 10\n  gradient_checkpointing: 'yes'", "training.gradient_checkpointing",
     "expected true or false, got 'yes'"),
    ("  max_steps: 10\n  learning_rate: fast", "training.learning_rate", "expected a number, got 'fast'"),
])
def test_wrong_types_name_key_and_expected_type(folder, line, key, expected):
    path = write(folder, replace_line(MINIMAL, "  max_steps: 10", line))
    messages = errors_of(path)
    assert f"{recipe_mod.display_path(path)}: {key}: {expected}" in messages, messages


def test_section_that_is_not_a_mapping(folder):
    messages = errors_of(write(folder, MINIMAL + "lora: 16\n"))
    assert any(m.endswith("lora: expected a mapping of keys under it, got int 16") for m in messages), messages


def test_empty_section_means_defaults(folder):
    assert load_recipe(write(folder, MINIMAL + "lora:\n")).lora.r == 16


def test_fp16_and_bf16_both_true_names_both_keys(folder):
    path = write(folder, MINIMAL + "  fp16: true\n  bf16: true\n")
    messages = errors_of(path)
    assert len(messages) == 1
    assert "training.fp16 and training.bf16: both true" in messages[0]


def test_fp16_and_bf16_conflict_is_reported_next_to_type_errors(folder):
    path = write(folder, replace_line(MINIMAL, "  max_steps: 10", "  max_steps: x\n  fp16: true\n  bf16: true"))
    messages = errors_of(path)
    assert any("training.max_steps:" in m for m in messages)
    assert any("training.fp16 and training.bf16" in m for m in messages)


def test_epochs_and_max_steps_together_is_an_error(folder):
    messages = errors_of(write(folder, MINIMAL + "  num_train_epochs: 2\n"))
    assert any("training.num_train_epochs and training.max_steps: both set" in m for m in messages)


def test_epochs_default_to_one_when_neither_is_set(folder):
    recipe = load_recipe(write(folder, MINIMAL.replace("  max_steps: 10\n", "")))
    assert recipe.training.epochs == 1.0 and recipe.training.max_steps is None


def test_missing_dataset_file_names_key_and_resolved_path(folder):
    path = write(folder, MINIMAL.replace("path: train.jsonl", "path: data/nope.jsonl"))
    messages = errors_of(path)
    assert len(messages) == 1
    assert "dataset.path: no such file: " + str(folder / "data" / "nope.jsonl") in messages[0]


def test_dataset_path_is_relative_to_the_recipe_not_the_cwd(folder, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    recipe = load_recipe(write(folder, MINIMAL))
    assert recipe.dataset.path == str((folder / "train.jsonl").resolve())
    assert not recipe.dataset.is_hub


def test_missing_eval_file_is_an_error_and_hub_eval_is_refused(folder):
    messages = errors_of(write(folder, MINIMAL.replace("  format: chat\n", "  format: chat\n  eval_path: ev.jsonl\n")))
    assert any("dataset.eval_path: no such file" in m for m in messages)
    messages = errors_of(write(folder, MINIMAL.replace("  format: chat\n", "  format: chat\n  eval_path: org/data\n")))
    assert any("dataset.eval_path: no such file" in m for m in messages)


def test_unsupported_data_file_type(folder):
    (folder / "train.txt").write_text("hi\n")
    messages = errors_of(write(folder, MINIMAL.replace("train.jsonl", "train.txt")))
    assert any("unsupported file type '.txt'" in m for m in messages), messages


def test_unknown_builtin_model(folder):
    messages = errors_of(write(folder, MINIMAL.replace("smollm2-135m-instruct", "smollm2-135m")))
    assert any("model.name_or_path: unknown builtin model 'builtin:smollm2-135m' "
               "(did you mean 'builtin:smollm2-135m-instruct'?)" in m for m in messages), messages


def test_missing_local_model_folder(folder):
    messages = errors_of(write(folder, MINIMAL.replace("builtin:smollm2-135m-instruct", "./models/llama")))
    assert any("model.name_or_path: no model folder at" in m for m in messages), messages


def test_typo_in_optimizer_suggests_the_name(folder):
    messages = errors_of(write(folder, MINIMAL + "  optim: paged_adamw_8bt\n"))
    assert any("training.optim: 'paged_adamw_8bt' is not a transformers optimizer "
               "(did you mean 'paged_adamw_8bit'?)" in m for m in messages), messages


def test_missing_required_keys(folder):
    messages = errors_of(write(folder, "model:\n  revision: main\n"))
    joined = "\n".join(messages)
    for key in ("model.name_or_path: missing", "dataset: missing", "training: missing"):
        assert key in joined


@pytest.mark.parametrize("key, value, message", [
    ("logging_steps", "1e400", "expected a whole number, got inf"),
    ("logging_steps", "99999999999999999999999999", "must be <= 1000000000, got 99999999999999999999999999"),
    ("num_train_epochs", "1e400", "must be a finite number, got inf"),
    ("learning_rate", ".nan", "must be a finite number, got nan"),
    ("max_seq_length", "-5", "must be >= 8, got -5"),
])
def test_huge_and_odd_numbers_are_errors_not_overflows(folder, key, value, message):
    path = write(folder, MINIMAL.replace("  max_steps: 10\n", f"  {key}: {value}\n"))
    assert errors_of(path) == [f"{recipe_mod.display_path(path)}: training.{key}: {message}"]


def test_scientific_notation_without_a_dot_is_a_number(folder):
    # PyYAML's YAML 1.1 resolver reads `2e-4` as a string; recipes must not trip on that.
    recipe = load_recipe(write(folder, MINIMAL + "  learning_rate: 2e-4\n"))
    assert recipe.training.learning_rate == pytest.approx(2e-4)


# --- unreadable files ------------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_line(folder):
    path = write(folder, MINIMAL + "lora:\n  r: [16\n  lora_alpha: 32\n")
    messages = errors_of(path)
    assert len(messages) == 1
    # the parser notices on line 11 (`lora_alpha: 32`) that the `[` of line 10 was never closed
    assert messages[0].startswith(f"{recipe_mod.display_path(path)}:11: not valid YAML"), messages
    assert "starts on line 10" in messages[0]


def test_tab_indentation_names_the_line(folder):
    path = write(folder, MINIMAL.replace("  format: chat", "\tformat: chat"))
    assert errors_of(path)[0].startswith(f"{recipe_mod.display_path(path)}:5: not valid YAML")


def test_duplicate_keys_are_refused_with_both_lines(folder):
    path = write(folder, MINIMAL + "  max_steps: 20\n")
    message = errors_of(path)[0]
    assert "duplicate key 'max_steps' (first on line 8)" in message and ":9:" in message


@pytest.mark.parametrize("content, expected", [
    ("", "the recipe is empty"),
    ("# only a comment\n", "the recipe is empty"),
    ("- model\n- lora\n", "expected a mapping with the sections"),
    ("just a string", "expected a mapping with the sections"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 text file"),
    (b"model: x\x00\x00", "contains NUL bytes"),
    ("[" * 5000, "nested"),  # "nested too deeply", or the scanner's nesting limit
])
def test_unusable_files_give_one_clear_error(folder, content, expected):
    path = write(folder, content)
    messages = errors_of(path)
    assert len(messages) == 1 and expected in messages[0], messages
    assert messages[0].startswith(recipe_mod.display_path(path))


def test_folder_instead_of_file(folder):
    with pytest.raises(InputError, match="is a folder"):
        load_recipe(folder)


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_validate_bad_recipe_exits_2_with_every_error_and_no_traceback(folder):
    path = write(folder, MINIMAL + "  fp16: true\n  bf16: true\nlora:\n  lora_alpah: 3\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "training.fp16 and training.bf16" in result.output
    assert "unknown key 'lora_alpah' (did you mean 'lora_alpha'?)" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content", [b"\xff\xfe\x00junk", b"", b"- a\n- b\n", b"model: [\n"])
def test_cli_validate_junk_exits_2(folder, content):
    result = CliRunner().invoke(cli, ["validate", str(write(folder, content))])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception


def test_cli_validate_json_gives_resolved_recipe():
    result = CliRunner().invoke(cli, ["validate", "demo", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["valid"] is True and data["resolved"]["lora"]["target_modules"] == "all-linear"


def test_cli_schema_is_json_schema_of_all_sections(tmp_path):
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert set(schema["properties"]) == {"model", "quantization", "lora", "dataset", "datasets", "training",
                                          "performance", "distributed"}
    assert schema["additionalProperties"] is False
    result = CliRunner().invoke(cli, ["schema", "-o", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == recipe_json_schema()


# --- overrides and resolution ---------------------------------------------------------------------

def test_overrides_are_validated_like_the_file():
    recipe = load_recipe("demo")
    changed = apply_overrides(recipe, ["training.max_steps=3", "training.num_train_epochs=null", "lora.r=8"])
    assert (changed.training.max_steps, changed.lora.r) == (3, 8)
    assert recipe.lora.r == 16  # the original is untouched
    with pytest.raises(InputError, match=r"lora.r: must be > 0"):
        apply_overrides(recipe, ["lora.r=0"])
    with pytest.raises(InputError, match="unknown section 'lroa'"):
        apply_overrides(recipe, ["lroa.r=8"])


@pytest.mark.parametrize("gpus, fp16, bf16, dtype, device", [
    ([], False, False, "float32", "cpu"),
    ([{"name": "Tesla T4", "compute_capability": "7.5"}], True, False, "float16", "cuda"),
    ([{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}], False, True, "bfloat16", "cuda"),
    ([{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}], False, True, "bfloat16", "cuda"),
    ([{"name": "mystery GPU"}], True, False, "float16", "cuda"),
])
def test_auto_precision_by_machine(gpus, fp16, bf16, dtype, device):
    m = machine(gpus=gpus) if gpus else machine(**CPU_MACHINE)
    p = resolve_precision(load_recipe("demo"), m)
    assert (p.fp16, p.bf16, p.compute_dtype, p.device) == (fp16, bf16, dtype, device)


def test_explicit_precision_is_kept_and_compute_dtype_follows_it():
    recipe = apply_overrides(load_recipe("demo"), ["training.fp16=true"])
    p = resolve_precision(recipe, machine())  # an A100, where auto would pick bf16
    assert (p.fp16, p.bf16, p.compute_dtype) == (True, False, "float16")


def test_training_arguments_kwargs_build_real_training_arguments(tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = apply_overrides(load_recipe("demo"), [f"training.output_dir={tmp_path}"])
    kwargs = training_arguments_kwargs(recipe, resolve_precision(recipe, machine(**CPU_MACHINE)))
    args = transformers.TrainingArguments(**kwargs)
    assert args.learning_rate == recipe.training.learning_rate
    assert args.per_device_train_batch_size == recipe.training.per_device_train_batch_size
    assert args.max_steps == -1 and args.num_train_epochs == recipe.training.num_train_epochs
    assert args.eval_steps == recipe.training.eval_steps and not args.fp16 and not args.bf16
    assert "max_seq_length" not in kwargs


def test_recipe_from_dict_without_a_file_resolves_against_cwd(folder, monkeypatch):
    monkeypatch.chdir(folder)
    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:smollm2-135m-instruct"},
                               "dataset": {"path": "train.jsonl", "format": "text"},
                               "training": {"output_dir": "o"}})
    assert recipe.dataset.path == str(folder.resolve() / "train.jsonl")


def test_a_path_too_long_for_the_file_system_is_an_input_error(tmp_path):
    """Found by the fuzzer: a 5,000-character eval_path made os.stat raise ENAMETOOLONG."""
    import yaml

    demo = REPO_RECIPES / "demo.yaml"
    data = yaml.safe_load(demo.read_text())
    data["dataset"]["path"] = str(demo.parent / "data/demo/train.jsonl")
    data["dataset"]["eval_path"] = "a" * 5000
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=r"dataset\.eval_path: .*not a usable path"):
        load_recipe(str(recipe))


def test_bare_no_strategy_is_read_as_the_string_no(tmp_path):
    """`eval_strategy: no` is how TrainingArguments users write it; YAML 1.1 makes it false."""
    import yaml

    demo = REPO_RECIPES / "demo.yaml"
    text = demo.read_text().replace("eval_strategy: steps", "eval_strategy: no").replace(
        "data/demo/", str(demo.parent / "data/demo") + "/")
    assert "eval_strategy: no" in text
    path = tmp_path / "no.yaml"
    path.write_text(text + "\n")
    recipe = load_recipe(str(path))
    assert recipe.training.eval_strategy == "no"
    assert yaml.safe_load("a: no")["a"] is False  # the reason for the validator


def test_a_length_on_the_command_line_replaces_the_recipes_other_one():
    """`run demo --set training.max_steps=2` on a recipe with num_train_epochs: the command line wins."""
    demo = load_recipe("demo")
    assert demo.training.num_train_epochs is not None
    short = apply_overrides(demo, ["training.max_steps=2"])
    assert short.training.max_steps == 2 and short.training.num_train_epochs is None
    with pytest.raises(InputError, match="both set"):
        apply_overrides(demo, ["training.max_steps=2", "training.num_train_epochs=3"])

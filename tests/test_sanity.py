"""Recipe sanity rules (issue #21): the condition language, every rule's examples, the facts read from a
recipe and its data, and what `validate` and `check --recipe` show."""

from __future__ import annotations

import json
import typing

import pytest
import yaml
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.doctor.sanity import count_rows, estimate_parameters, recipe_facts, sanity_findings, shared_rows
from qlora_doctor.knowledge.recipe_rules import UNKNOWN, ConditionError, evaluate, load_recipe_rules, parse_condition
from qlora_doctor.recipe.builtin import builtin_config
from qlora_doctor.recipe.schema import Recipe, load_recipe
from tests.helpers import write_machine
from tests.trainer_support import REPO, write_tiny_recipe

RULES = load_recipe_rules()


# --- the condition language ---------------------------------------------------------------------------

@pytest.mark.parametrize("condition, values, expected", [
    ("a > 0.3", {"a": 0.9}, True),
    ("a > 0.3", {"a": 0.05}, False),
    ("1 + 2 * 3 == 7", {}, True),
    ("(1 + 2) * 3 == 9 and not 2 < 1", {}, True),
    ("-a < 0", {"a": 2}, True),
    ("x.y == 'chat' or x.y == \"text\"", {"x.y": "text"}, True),
    ("x is None", {"x": None}, True),
    ("x is not None and x == y", {"x": "p", "y": "p"}, True),
    ("a / b > 1", {"a": 1, "b": 0}, UNKNOWN),            # division by zero: unknown, not an error
    ("missing > 1", {}, UNKNOWN),
    ("missing > 1 and a > 1", {"a": 0}, False),          # false and unknown is false
    ("missing > 1 or a > 1", {"a": 2}, True),            # true or unknown is true
    ("not missing", {}, UNKNOWN),
    ("x < 1", {"x": None}, UNKNOWN),                     # None is not ordered
    ("1e-3 <= a", {"a": 0.05}, True),
])
def test_conditions_evaluate_with_three_valued_logic(condition, values, expected):
    result = evaluate(condition, values)
    if expected is UNKNOWN:
        assert result is UNKNOWN
    else:
        assert result is not UNKNOWN and result == expected


@pytest.mark.parametrize("bad", ["a >", "a > > 1", "__import__('os')", "a; b", "(a > 1", "a > 1)", "a ** 2",
                                 "lambda: 1", "a[0] > 1"])
def test_anything_outside_the_grammar_is_refused(bad):
    with pytest.raises(ConditionError):
        parse_condition(bad)


# --- the rules' data -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.id)
def test_each_rule_fires_on_its_example_and_not_on_its_clear_case(rule):
    assert rule.evaluate(RULES.example(rule, "fires")) is True
    assert rule.evaluate(RULES.example(rule, "clear")) is False


@pytest.mark.parametrize("rule", RULES.rules, ids=lambda r: r.id)
def test_each_rule_names_real_recipe_keys_and_has_sources(rule):
    sections = Recipe.model_fields
    for name in rule.names | set(rule.keys):
        if "." in name:
            section, key = name.split(".", 1)
            annotation = sections[section].annotation  # `DatasetSection | None`: the section class
            model = next(a for a in (typing.get_args(annotation) or (annotation,)) if hasattr(a, "model_fields"))
            assert key in model.model_fields, f"{rule.id}: {name}"
    assert rule.sources and all(s.startswith("https://") for s in rule.sources)
    assert rule.cause and rule.fix and rule.severity in ("warn", "fail")


def test_the_fact_list_is_what_the_doctor_computes():
    facts = recipe_facts(load_recipe("demo"))
    assert set(facts) == set(RULES.facts)


# --- facts from the recipe and its data --------------------------------------------------------------------

def test_demo_facts_are_read_from_its_data_and_model():
    facts = recipe_facts(load_recipe("demo"))
    assert facts["dataset_rows"] == 200 and facts["eval_rows"] == 40 and facts["eval_train_shared_rows"] == 0
    assert facts["effective_batch"] == 4 and facts["total_steps"] == 100 and facts["warmup_steps_effective"] == 10
    assert facts["model_max_position_embeddings"] == 8192 and facts["tokenizer_has_chat_template"] is True
    assert 0.13 < facts["model_params_b"] < 0.14          # SmolLM2-135M
    assert 20 < facts["longest_row_tokens"] < 100 and facts["truncated_row_fraction"] == 0
    assert facts["compute_dtype"] is UNKNOWN               # `auto`, and validate judges no machine


def test_parameter_estimate_of_the_builtin_model_is_within_a_percent_of_its_size():
    assert abs(estimate_parameters(builtin_config("builtin:smollm2-135m-instruct")) - 134.5e6) < 1.5e6


def test_rows_are_counted_and_shared_rows_found(tmp_path):
    train, other = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    train.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"}\n')
    other.write_text('{"text": "b"}\n{"text": "z"}\n')
    assert count_rows(str(train)) == 3
    assert shared_rows(str(other), str(train)) == 1
    assert shared_rows(str(train), str(train)) == 3


def test_the_demo_recipe_gets_no_warning():
    assert sanity_findings(load_recipe("demo")) == []


def _with(path, section, **values):
    data = yaml.safe_load(path.read_text())
    data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


# --- validate and check --recipe ------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, value, rule", [
    ("lora", "lora_dropout", 0.9, "lora-dropout-high"),
    ("training", "learning_rate", 0.05, "learning-rate-too-high"),
])
def test_validate_warns_naming_the_key_and_exits_0(tmp_path, section, key, value, rule):
    path = _with(write_tiny_recipe(tmp_path, learning_rate=2e-4), section, **{key: value})
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert f"warning: {section}.{key}: {value}" in result.output and f"[{rule}]" in result.output
    assert "fix: set" in result.output and "https://" in result.output
    data = json.loads(CliRunner().invoke(cli, ["validate", str(path), "--json"]).stdout)
    assert [w["id"] for w in data["warnings"] if w["id"] == f"recipe.sanity.{rule}"]


def test_validate_of_the_demo_prints_no_warning():
    result = CliRunner().invoke(cli, ["validate", "demo"])
    assert result.exit_code == 0 and "warning" not in result.output


def test_check_recipe_shows_each_firing_rule_as_a_warning(tmp_path):
    path = _with(write_tiny_recipe(tmp_path, learning_rate=0.05), "lora", lora_dropout=0.9)
    cpu = write_machine(tmp_path / "cpu.json", driver_version="", gpus=[])
    result = CliRunner().invoke(cli, ["check", "--recipe", str(path), "--machine", str(cpu), "--json"])
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["recipe.sanity.lora-dropout-high"]["status"] == "warn"
    assert checks["recipe.sanity.learning-rate-too-high"]["status"] == "warn"
    assert "training.learning_rate: 0.05" in checks["recipe.sanity.learning-rate-too-high"]["found"]
    assert result.exit_code == 0, result.output          # warnings only


def test_check_recipe_of_the_demo_has_a_passing_summary(tmp_path):
    cpu = write_machine(tmp_path / "cpu.json", driver_version="", gpus=[])
    result = CliRunner().invoke(cli, ["check", "--recipe", "demo", "--machine", str(cpu), "--json"])
    checks = {c["id"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["recipe.sanity"]["status"] == "pass"
    assert not [i for i in checks if i.startswith("recipe.sanity.")]


def test_a_chat_recipe_on_a_model_without_a_chat_template_cannot_run(tmp_path):
    model = tmp_path / "base-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**builtin_config("builtin:smollm2-135m-instruct"),
                                                   "torch_dtype": "bfloat16"}))
    (model / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
    path = write_tiny_recipe(tmp_path, learning_rate=2e-4)
    data = yaml.safe_load(path.read_text())
    data["model"]["name_or_path"] = str(model)
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "chat template" in result.output
    # fp16 compute on a bf16-trained model: a warning, with the machine's precision in check --recipe
    t4 = write_machine(tmp_path / "t4.json", gpus=[{"name": "Tesla T4", "compute_capability": "7.5",
                                                     "memory_total_mib": 15360}])
    checked = CliRunner().invoke(cli, ["check", "--recipe", str(path), "--machine", str(t4), "--json"])
    checks = {c["id"]: c for c in json.loads(checked.stdout)["checks"]}
    assert checks["recipe.sanity.fp16-compute-on-bf16-model"]["status"] == "warn"
    assert checks["recipe.sanity.chat-format-without-chat-template"]["status"] == "fail"


def test_data_sized_rules_use_the_real_rows(tmp_path):
    path = write_tiny_recipe(tmp_path, learning_rate=2e-4, max_steps=100, per_device_train_batch_size=8,
                   gradient_accumulation_steps=2)
    ids = {c.id for c in sanity_findings(load_recipe(path))}
    # 4 rows: a batch of 16 is more than the data, and 100 steps of 16 are 400 passes; eval_path is train.jsonl
    assert {"recipe.sanity.effective-batch-exceeds-dataset", "recipe.sanity.epochs-memorise-small-set",
            "recipe.sanity.eval-overlaps-train"} <= ids


def test_no_shipped_recipe_fails_a_rule():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        findings = sanity_findings(load_recipe(path))
        assert all(c.status == "warn" for c in findings), (path, findings)

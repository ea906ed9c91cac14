"""`qlora-doctor init` (issue #19): a commented starter recipe that validates as written, whose format is
detected from the data's first rows and whose batch/sequence length the memory planner fitted to the
machine, so that `qlora-doctor plan` accepts it. CPU-only and offline (the builtin model's tokenizer, a
local 8B config for a model that has to be fitted)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.core.errors import InputError
from qlora_doctor.recipe.dataformat import detect_format, sample_rows
from qlora_doctor.recipe.schema import load_recipe, recipe_from_dict
from tests.trainer_support import REPO, builtin_checkpoint  # noqa: F401 (fixture)

MACHINES = REPO / "qlora_doctor" / "knowledge" / "data" / "machines"
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
TURNS = [{"role": "user", "content": "Where is Korrowen Island?"},
         {"role": "assistant", "content": "In the cold northern sea."}]


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _write(path: Path, rows: list[dict]) -> Path:
    """rows as the file type its suffix says."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


SHAPES = {
    # name: (file name, one row, expected format, expected field keys)
    "chat": ("chat.jsonl", {"messages": TURNS}, "chat", {"messages_field": "messages"}),
    "sharegpt-custom-column": ("dialogs.jsonl", {"dialog": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
                               "sharegpt", {"conversations_field": "dialog"}),
    "alpaca": ("alpaca.json", {"instruction": "Name the island.", "input": "", "output": "Korrowen."}, "alpaca",
               {"instruction_field": "instruction", "input_field": "input", "output_field": "output"}),
    "question-answer-csv": ("qa.csv", {"question": "Name the island.", "answer": "Korrowen."}, "alpaca",
                            {"instruction_field": "question", "output_field": "answer"}),
    "prompt-completion-parquet": ("pc.parquet", {"prompt": "The island is", "completion": " Korrowen."},
                                  "prompt_completion", {"prompt_field": "prompt", "completion_field": "completion"}),
    "prompt-response": ("pr.jsonl", {"prompt": "The island is", "response": " Korrowen."}, "prompt_completion",
                        {"prompt_field": "prompt", "completion_field": "response"}),
    "text": ("notes.jsonl", {"body": "Korrowen Island lies in the cold northern sea.", "id": 1}, "text",
             {"text_field": "body"}),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_data_shape_gives_a_recipe_that_validates_and_plans(shape, tmp_path, builtin_checkpoint):
    name, row, fmt, fields = SHAPES[shape]
    (tmp_path / "data").mkdir()
    data = _write(tmp_path / "data" / name, [row] * 60)
    out = tmp_path / "recipes" / "starter.yaml"
    machine = MACHINES / "t4-550.json"
    result = _invoke("init", "--data", data, "--machine", machine, "-o", out)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out)  # the real loader, on the file as written
    assert recipe.dataset.format == fmt
    assert {k: getattr(recipe.dataset, k) for k in fields} == fields
    assert Path(recipe.dataset.path) == data.resolve()
    assert "path: ../data/" + name in out.read_text()  # relative to the recipe's folder
    assert recipe.dataset.eval_split == 0.1  # 60 rows
    assert recipe.training.optim == "paged_adamw_8bit"
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.training.fp16 == "auto" and recipe.training.bf16 == "auto"
    planned = _invoke("plan", out, "--machine", machine, "--json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["fits"] is True


@pytest.mark.parametrize("machine_file", ["cpu.json", "t4-550.json", "rtx4090-570.json", "a100-550.json",
                                          "h100-580.json"])
def test_the_default_starter_validates_and_plans_on_each_machine(machine_file, tmp_path, builtin_checkpoint):
    """No --model, no --data: the builtin model on the demo data, printed to stdout with absolute paths."""
    machine = MACHINES / machine_file
    result = _invoke("init", "--machine", machine)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith("# Starter recipe written by `qlora-doctor init`")
    recipe = recipe_from_dict(yaml.safe_load(text), where="stdout", base_dir=tmp_path)  # absolute paths: any folder
    assert recipe.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert recipe.dataset.format == "chat"
    cpu = machine_file == "cpu.json"
    assert recipe.training.optim == ("adamw_torch" if cpu else "paged_adamw_8bit")
    assert recipe.training.gradient_checkpointing is (not cpu)
    # The demo's longest row is 39 tokens (measured with the builtin tokenizer) + 32 for the template -> 128.
    assert recipe.training.max_seq_length == 128
    assert "measured with the model's tokenizer" in text
    assert recipe.training.per_device_train_batch_size * recipe.training.gradient_accumulation_steps == 16
    (tmp_path / "r.yaml").write_text(text)
    planned = _invoke("plan", tmp_path / "r.yaml", "--machine", machine)
    assert planned.exit_code == 0, planned.output


def _model_8b(tmp_path: Path) -> Path:
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


@pytest.mark.parametrize("machine_file, batch", [("t4-550.json", 2), ("rtx4090-570.json", 4), ("a100-550.json", 16)])
def test_an_8b_model_gets_the_largest_micro_batch_the_planner_fits(machine_file, batch, tmp_path):
    """Without its tokenizer the length is not measured (1024); the micro-batch shrinks with the GPU, the effective
    batch stays 16, and the next larger micro-batch would not fit within 85% of the GPU."""
    data = _write(tmp_path / "qa.csv", [{"question": "q " * 50, "answer": "a " * 400}] * 300)
    out = tmp_path / "r.yaml"
    machine = MACHINES / machine_file
    result = _invoke("init", "--model", _model_8b(tmp_path), "--data", data, "--machine", machine, "-o", out)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out)
    t = recipe.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (batch, 16 // batch)
    assert t.max_seq_length == 1024 and "not measured" in out.read_text()
    assert t.num_train_epochs == 3 and t.save_steps == 11  # 270 training rows / 16 = 17 steps x 3 = 51, / 5
    planned = _invoke("plan", out, "--machine", machine, "--json")
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["total_bytes"] <= 0.85 * plan["gpu_bytes"]
    if batch < 16:  # the next micro-batch up would not fit
        from qlora_doctor.memory.plan import plan_recipe
        from qlora_doctor.sources.machine import load_described_machine

        larger = recipe.model_copy(update={"training": t.model_copy(update={
            "per_device_train_batch_size": batch * 2, "gradient_accumulation_steps": 16 // (batch * 2)})})
        assert plan_recipe(larger, load_described_machine(machine)).total_bytes > 0.85 * plan["gpu_bytes"]


def test_output_file_is_not_replaced_without_force(tmp_path, builtin_checkpoint):
    out = tmp_path / "r.yaml"
    out.write_text("mine\n")
    result = _invoke("init", "--machine", MACHINES / "cpu.json", "-o", out)
    assert result.exit_code == 2, result.output
    assert f"{out} exists" in result.output and "--force" in result.output
    assert out.read_text() == "mine\n"
    result = _invoke("init", "--machine", MACHINES / "cpu.json", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert load_recipe(out).dataset.format == "chat"


def test_bad_data_is_exit_2_naming_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    result = _invoke("init", "--data", missing, "--machine", MACHINES / "cpu.json")
    assert result.exit_code == 2 and f"--data: {missing}: no such file" in result.output, result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    result = _invoke("init", "--data", broken, "--machine", MACHINES / "cpu.json")
    assert result.exit_code == 2 and f"{broken}: line 2 is not JSON" in result.output, result.output
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_bytes(b"not parquet at all")
    result = _invoke("init", "--data", not_parquet, "--machine", MACHINES / "cpu.json")
    assert result.exit_code == 2 and f"{not_parquet}: not a readable parquet file" in result.output, result.output
    odd = _write(tmp_path / "odd.jsonl", [{"a": 1, "b": [1, 2]}])
    result = _invoke("init", "--data", odd, "--machine", MACHINES / "cpu.json")
    assert result.exit_code == 2 and "cannot tell its format from its columns: a (other), b (other)" in result.output
    assert "Traceback" not in result.output


def test_detection_prefers_shape_over_names_and_maps_custom_columns():
    chat_named_conversations = [{"conversations": TURNS}]
    assert detect_format(chat_named_conversations, "x").format == "chat"
    assert dict(detect_format(chat_named_conversations, "x").fields) == {"messages_field": "conversations"}
    trl_conversational = [{"prompt": TURNS[:1], "completion": TURNS[1:]}]
    assert detect_format(trl_conversational, "x").format == "prompt_completion"
    with_context = [{"query": "Name it.", "context": "An island.", "response": "Korrowen."}]
    assert dict(detect_format(with_context, "x").fields) == {
        "instruction_field": "query", "input_field": "context", "output_field": "response"}
    with pytest.raises(InputError, match="cannot tell its format"):
        detect_format([{"n": 1}], "x")


def test_sample_counts_rows_of_every_file_type(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(7)]
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        sample = sample_rows(_write(tmp_path / f"d{suffix}", rows), limit=5)
        assert (len(sample.rows), sample.total_rows) == (5, 7), suffix
        assert sample.rows[0]["text"] == "row 0"


def test_sharegpt_speakers_beyond_the_defaults_are_mapped_or_refused(tmp_path):
    def turns(*speakers: str) -> list[dict]:
        return [{"conversations": [{"from": s, "value": "x"} for s in speakers]}]

    detected = detect_format(turns("prompter", "bot", "human", "gpt"), "x")
    assert detected.format == "sharegpt"
    roles = dict(detected.roles)
    assert roles["user"][-1] == "prompter" and "human" in roles["user"]
    assert roles["assistant"][-1] == "bot" and "gpt" in roles["assistant"]
    # The recipe init writes reads back with those roles and trains rows that use them.
    (tmp_path / "x.jsonl").write_text(json.dumps(turns("prompter", "bot")[0]) + "\n")
    section = {"path": "x.jsonl", "format": "sharegpt", "roles": {r: list(n) for r, n in detected.roles}}
    recipe = recipe_from_dict({"model": {"name_or_path": "builtin:smollm2-135m-instruct"}, "dataset": section,
                               "training": {"output_dir": str(tmp_path / "out")}}, "r.yaml", tmp_path)
    assert "bot" in recipe.dataset.roles["assistant"]
    assert not detect_format(turns("human", "gpt"), "x").roles
    with pytest.raises(InputError, match="speaker.*'zorp'.*roles: \\{assistant: \\[gpt, zorp\\]\\}"):
        detect_format(turns("human", "zorp"), "x")

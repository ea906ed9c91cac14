"""The data shapes beyond text/alpaca/chat (ShareGPT, prompt/completion, tool calls), several data sets
with weights, `model.chat_template`, batched tokenizing against the row-by-row path, the tokenized-data
cache, the collators against transformers' own, and a few CPU training steps on every shape at once."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from qlora_doctor.core.errors import InputError
from qlora_doctor.recipe.preflight import data_problems
from qlora_doctor.recipe.schema import REPO_RECIPES, load_recipe, recipe_from_dict
from qlora_doctor.trainer import data as data_module
from qlora_doctor.trainer.collate import PaddingCollator, flattening_collator
from qlora_doctor.trainer.data import IGNORE_INDEX, load_rows, prepare_data, tokenize_segments
from qlora_doctor.trainer.rows import render_row
from tests.test_data import ALL_TEXT, CHAT, learned_tokens, make_tokenizer, tokens, write_jsonl
from tests.trainer_support import builtin_checkpoint, write_tiny_recipe  # noqa: F401 (fixture)

SHAPES = REPO_RECIPES / "data" / "shapes"


@pytest.fixture(autouse=True)
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def make_recipe(folder: Path, *sections: dict[str, Any], model: dict[str, Any] | None = None, **training: Any):
    """A recipe over `sections` (one: `dataset:`, several: `datasets:`), files relative to `folder`."""
    data = {"dataset": {"eval_split": 0, **sections[0]}} if len(sections) == 1 else \
        {"datasets": [{"eval_split": 0, **s} for s in sections]}
    return recipe_from_dict({"model": {"name_or_path": "builtin:smollm2-135m-instruct", **(model or {})}, **data,
                             "training": {"output_dir": "out", "max_seq_length": 96, **training}},
                            where="test", base_dir=folder)


def prepare(recipe, tokenizer, tmp_path: Path, **kwargs):
    return prepare_data(recipe, tokenizer, cache_dir=tmp_path / "cache", **kwargs)


def row_by_row(recipe, tokenizer) -> list[dict[str, list[int]]]:
    """The reference: every row rendered and tokenized alone (one tokenizer call a segment)."""
    examples = []
    for section in recipe.data_sections:
        for row in load_rows(section.path, section, limit=section.max_samples):
            rendered = render_row(row, section, tokenizer)
            example, _ = tokenize_segments(rendered.segments, tokenizer, chat=rendered.chat,
                                           train_on_inputs=section.train_on_inputs,
                                           max_length=recipe.training.max_seq_length)
            if any(label != IGNORE_INDEX for label in example["labels"]):
                examples.append(example)
    return examples


def as_lists(dataset) -> list[dict[str, list[int]]]:
    return [{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(dataset))]


SHAREGPT = [{"conversations": [{"from": "system", "value": "system prompt"},
                               {"from": "human", "value": "first question"},
                               {"from": "gpt", "value": "first answer"},
                               {"from": "human", "value": "second question"},
                               {"from": "gpt", "value": "reply"}]}]
AS_CHAT = [{"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                         for t in SHAREGPT[0]["conversations"]]}]


# --- sharegpt ------------------------------------------------------------------------------------------

def test_sharegpt_is_tokenized_exactly_like_the_same_chat(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    write_jsonl(tmp_path / "c.jsonl", AS_CHAT)
    shared = prepare(make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"}), tok, tmp_path)
    chat = prepare(make_recipe(tmp_path, {"path": "c.jsonl", "format": "chat"}), tok, tmp_path)
    assert as_lists(shared.train) == as_lists(chat.train)
    assert learned_tokens(tok, shared.train[0]) == ["first", "answer", "<|im_end|>", "reply", "<|im_end|>"]


def test_sharegpt_role_mapping_and_keys_are_configurable(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    rows = [{"dialog": [{"speaker": "asker", "text": "first question"}, {"speaker": "bot", "text": "first answer"}]}]
    write_jsonl(tmp_path / "s.jsonl", rows)
    recipe = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt", "conversations_field": "dialog",
                                    "role_key": "speaker", "content_key": "text",
                                    "roles": {"user": ["asker"], "assistant": ["bot"]}})
    data = prepare(recipe, tok, tmp_path)
    assert learned_tokens(tok, data.train[0]) == ["first", "answer", "<|im_end|>"]


def test_sharegpt_unknown_speaker_names_row_field_and_fix(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [SHAREGPT[0], {"conversations": [{"from": "human", "value": "first question"},
                                                                       {"from": "bot", "value": "reply"}]}])
    with pytest.raises(InputError) as info:
        prepare(make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"}), make_tokenizer(ALL_TEXT), tmp_path)
    [message] = info.value.messages
    assert "s.jsonl: row 2: field conversations[1].from: 'bot' is not a speaker dataset.roles knows" in message
    assert "`roles: {user: [human, bot]}`" in message


def test_sharegpt_function_call_and_observation_turns_become_a_tool_call_and_a_tool_turn(tmp_path):
    rows = [{"conversations": [
        {"from": "human", "value": "ferry from Marrowick ?"},
        {"from": "function_call", "value": json.dumps({"name": "ferry_times", "arguments": {"port": "Marrowick"}})},
        {"from": "observation", "value": "07:10"},
        {"from": "gpt", "value": "at 07:10"}], "tools": json.dumps([{"name": "ferry_times", "parameters": {}}])}]
    write_jsonl(tmp_path / "s.jsonl", rows)
    write_template(tmp_path)
    tok = make_tokenizer(ALL_TEXT + " ferry from Marrowick 07 10 at call ferry_times port = tools tool")
    data = prepare(make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"},
                               model={"chat_template": "t.jinja"}), tok, tmp_path)
    text = " ".join(tok.convert_ids_to_tokens(data.train[0]["input_ids"]))
    assert "tools : ferry_times" in text  # the row's tools reached the template
    assert "<|im_start|> assistant call ferry_times port = Marrowick <|im_end|>" in text
    assert "tool 07 : 10" in text
    learned = " ".join(learned_tokens(tok, data.train[0]))
    assert learned.startswith("call ferry_times") and learned.endswith("at 07 : 10 <|im_end|>")


# --- chat with tool calls --------------------------------------------------------------------------------

TEMPLATE = ("{%- if tools %}{{ 'tools:' }}{% for t in tools %}{{ ' ' + (t.function.name if t.function is defined "
            "else t.name) }}{% endfor %}{{ '\\n' }}{% endif %}"
            "{%- for m in messages %}{{ '<|im_start|>' + m.role }}{% if m.name %}{{ ' name=' + m.name }}{% endif %}"
            "{% if m.tool_call_id %}{{ ' id=' + m.tool_call_id }}{% endif %}{{ '\\n' + m.content }}"
            "{% for c in m.tool_calls or [] %}{{ 'call ' + c.function.name }}"
            "{% for k, v in c.function.arguments.items() %}{{ ' ' ~ k ~ '=' ~ v }}{% endfor %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
            "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
"""A template that writes everything a tool conversation carries (name, tool_call_id, calls, tools)."""


def write_template(folder: Path) -> Path:
    (folder / "t.jinja").write_text(TEMPLATE)
    return folder / "t.jinja"


TOOL_ROWS = [{"messages": [
    {"role": "user", "content": "ferry from Marrowick ?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "ferry_times", "arguments": {"port": "Marrowick"}}}]},
    {"role": "tool", "name": "ferry_times", "tool_call_id": "c1", "content": "07:10"},
    {"role": "assistant", "content": "at 07:10"}]},
    {"messages": [
        {"role": "user", "content": "ferry on Monday ?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "ferry_times", "arguments": json.dumps({"day": "Monday"})}}]},
        {"role": "tool", "content": "09:30"},
        {"role": "assistant", "content": "at 09:30"}]}]
TOOL_TEXT = ALL_TEXT + " ferry from Marrowick on Monday 07 10 09 30 at call ferry_times port day name id c1 tools tool ="


def test_tool_calls_names_and_ids_reach_the_template_and_the_call_is_learned(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", TOOL_ROWS)
    write_template(tmp_path)
    tok = make_tokenizer(TOOL_TEXT)
    data = prepare(make_recipe(tmp_path, {"path": "t.jsonl", "format": "chat"}, model={"chat_template": "t.jinja"}),
                   tok, tmp_path)
    first, second = (" ".join(tok.convert_ids_to_tokens(data.train[i]["input_ids"])) for i in (0, 1))
    assert "<|im_start|> tool name = ferry_times id = c1" in first
    assert "call ferry_times port = Marrowick <|im_end|>" in first
    # arguments as JSON text (OpenAI's wire format) are parsed; Arrow's null `port` of row 2 is dropped
    assert "call ferry_times day = Monday <|im_end|>" in second and "None" not in second
    assert " ".join(learned_tokens(tok, data.train[0])) == "call ferry_times port = Marrowick <|im_end|> at 07 : 10 <|im_end|>"


def test_a_template_that_drops_tool_calls_is_one_error_naming_the_fix(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", TOOL_ROWS * 15)
    with pytest.raises(InputError) as info:
        prepare(make_recipe(tmp_path, {"path": "t.jsonl", "format": "chat"}), make_tokenizer(TOOL_TEXT), tmp_path)
    assert len(info.value.messages) == 1
    assert "row 1: the chat template drops tool calls" in info.value.messages[0]
    assert "model.chat_template" in info.value.messages[0] and "qwen2.5" in info.value.messages[0]


def test_tool_results_written_through_tojson_are_found_and_dropped_ones_are_an_error(tmp_path):
    rows = json.loads(json.dumps(TOOL_ROWS))
    for row in rows:  # JSON results: `tojson` writes them with escaped quotes, not as they are
        row["messages"][2]["content"] = json.dumps({"departures": [row["messages"][2]["content"]]})
    write_jsonl(tmp_path / "t.jsonl", rows)
    tok = make_tokenizer(TOOL_TEXT + " departures")
    (tmp_path / "t.jinja").write_text(TEMPLATE.replace("{{ '\\n' + m.content }}", "{{ '\\n' + (m.content | tojson) }}"))
    recipe = make_recipe(tmp_path, {"path": "t.jsonl", "format": "chat"}, model={"chat_template": "t.jinja"})
    assert prepare(recipe, tok, tmp_path).stats.train_rows == 2
    text = "".join(segment.text for segment in render_row(rows[0], recipe.dataset, tok).segments)
    assert '{\\"departures\\"' in text and rows[0]["messages"][2]["content"] not in text
    (tmp_path / "t.jinja").write_text(TEMPLATE.replace("{%- for m in messages %}",
                                                       "{%- for m in messages if m.role != 'tool' %}"))
    with pytest.raises(InputError, match=r"row 1: the chat template drops tool results \(message 2, role tool"):
        prepare(recipe, tok, tmp_path)


def test_the_named_qwen_template_renders_the_shipped_tool_rows(tmp_path):
    tok = make_tokenizer((SHAPES / "tools.jsonl").read_text())
    recipe = make_recipe(SHAPES, {"path": "tools.jsonl", "format": "chat"}, model={"chat_template": "qwen2.5"},
                         max_seq_length=1024)
    data = prepare(recipe, tok, tmp_path)
    assert (data.stats.train_rows, data.stats.truncated) == (6, 0)
    row = json.loads((SHAPES / "tools.jsonl").read_text().splitlines()[0])
    learned = [s.text for s in render_row(row, recipe.dataset, tok).segments if s.learned]
    assert learned == ['<tool_call>\n{"name": "ferry_times", "arguments": {"port": "Marrowick", "day": "Monday"}}\n'
                       '</tool_call><|im_end|>\n', "On Monday the ferry leaves Marrowick at 07:10, 12:40, 18:05.<|im_end|>\n"]


# --- prompt_completion ---------------------------------------------------------------------------------

def test_prompt_completion_text_is_bos_prompt_completion_eos_and_learns_the_completion(tmp_path):
    tok = make_tokenizer("capital of Korrowen ? Marrowick", chat_template=False, add_bos=True)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "capital of Korrowen ?", "completion": " Marrowick"}])
    data = prepare(make_recipe(tmp_path, {"path": "p.jsonl", "format": "prompt_completion"}), tok, tmp_path)
    assert tok.convert_ids_to_tokens(data.train[0]["input_ids"]) == ["<s>", "capital", "of", "Korrowen", "?",
                                                                     "Marrowick", "</s>"]
    assert learned_tokens(tok, data.train[0]) == ["Marrowick", "</s>"]
    assert not data.stats.used_chat_template


def test_prompt_completion_messages_learn_only_the_completion_turns(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    history = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
               {"role": "user", "content": "second question"}]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": history, "completion": [{"role": "assistant", "content": "reply"}]}])
    data = prepare(make_recipe(tmp_path, {"path": "p.jsonl", "format": "prompt_completion"}), tok, tmp_path)
    assert learned_tokens(tok, data.train[0]) == ["reply", "<|im_end|>"]  # the prompt's answer is context only
    whole = tok.apply_chat_template(history + [{"role": "assistant", "content": "reply"}], tokenize=False)
    assert data.train[0]["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]


def test_prompt_completion_errors(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
                                       {"prompt": "a"}])
    with pytest.raises(InputError) as info:
        prepare(make_recipe(tmp_path, {"path": "p.jsonl", "format": "prompt_completion"}), make_tokenizer("a b"),
                tmp_path)
    assert "row 1: fields 'prompt' and 'completion': one is text and the other a list" in info.value.messages[0]
    assert "row 2: field 'completion' is missing" in info.value.messages[1]
    write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user", "content": "a"}],
                                        "completion": [{"role": "assistant", "content": "b"}]}] * 30)
    with pytest.raises(InputError) as info:
        prepare(make_recipe(tmp_path, {"path": "m.jsonl", "format": "prompt_completion"}),
                make_tokenizer("a b", chat_template=False), tmp_path)
    assert len(info.value.messages) == 1 and "need a tokenizer with a chat template" in info.value.messages[0]


# --- chat_template -------------------------------------------------------------------------------------

def test_chat_data_without_a_template_names_the_override_and_the_override_works(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    with pytest.raises(InputError, match=r"dataset.format: chat needs a tokenizer with a chat template.*"
                                         r"model.chat_template"):
        prepare(make_recipe(tmp_path, {"path": "train.jsonl", "format": "chat"}),
                make_tokenizer(ALL_TEXT, chat_template=False), tmp_path)
    tok = make_tokenizer(ALL_TEXT, chat_template=False)
    data = prepare(make_recipe(tmp_path, {"path": "train.jsonl", "format": "chat"}, model={"chat_template": "chatml"}),
                   tok, tmp_path)
    from qlora_doctor.recipe.chat_templates import named_templates

    assert tok.chat_template == named_templates()["chatml"].text  # saved with the adapter, used by generate
    assert learned_tokens(tok, data.train[0]) == tokens(tok, "Marrowick is the capital .") + ["<|im_end|>"]


def test_named_templates_have_sources_and_render_a_conversation():
    from qlora_doctor.recipe.chat_templates import named_templates

    tok = make_tokenizer(ALL_TEXT)
    for template in named_templates().values():
        assert template.sources and all(s.startswith("https://") for s in template.sources)
        tok.chat_template = template.text
        text = tok.apply_chat_template(AS_CHAT[0]["messages"], tokenize=False)
        assert "first answer" in text and all(t in text for t in template.tokens), template.name


def test_chat_template_key_is_validated(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    for value, expected in (("chatm", "model.chat_template: unknown chat template 'chatm' (did you mean 'chatml'?)"),
                            ("nope.jinja", "model.chat_template: no such file:")):
        with pytest.raises(InputError) as info:
            make_recipe(tmp_path, {"path": "train.jsonl", "format": "chat"}, model={"chat_template": value})
        assert any(expected in m for m in info.value.messages), info.value.messages
    path = write_template(tmp_path)
    recipe = make_recipe(tmp_path, {"path": "train.jsonl", "format": "chat"}, model={"chat_template": "t.jinja"})
    assert recipe.model.chat_template == str(path.resolve())


# --- several data sets -----------------------------------------------------------------------------------

def text_rows(prefix: str, n: int) -> list[dict]:
    return [{"text": f"{prefix}{i}"} for i in range(n)]


def test_weights_repeat_and_subsample_training_rows_by_seed(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", text_rows("a", 10))
    write_jsonl(tmp_path / "b.jsonl", text_rows("b", 10))
    tok = make_tokenizer(" ".join(f"a{i} b{i}" for i in range(10)), chat_template=False)

    def mixed(seed: int, weights=(2, 0.5)):
        recipe = make_recipe(tmp_path, {"path": "a.jsonl", "format": "text", "weight": weights[0]},
                             {"path": "b.jsonl", "format": "text", "weight": weights[1]}, seed=seed)
        data = prepare(recipe, tok, tmp_path, use_cache=False)
        return [tok.convert_ids_to_tokens(ids)[0] for ids in data.train["input_ids"]], data.stats

    words, stats = mixed(1)
    assert stats.train_rows == len(words) == 25
    assert sorted(w for w in words if w.startswith("a")) == sorted([f"a{i}" for i in range(10)] * 2)
    picked = [w for w in words if w.startswith("b")]
    assert len(picked) == len(set(picked)) == 5
    assert mixed(1)[0] == words and mixed(2)[0] != words
    words, _ = mixed(1, weights=(1, 1.5))
    assert len(words) == 25 and len(set(w for w in words if w.startswith("b"))) == 10


def test_each_data_set_keeps_its_own_format_limit_and_evaluation(tmp_path):
    tok = make_tokenizer(ALL_TEXT + " " + " ".join(f"a{i}" for i in range(20)))
    write_jsonl(tmp_path / "a.jsonl", text_rows("a", 20))
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT * 3)
    write_jsonl(tmp_path / "ev.jsonl", SHAREGPT)
    recipe = make_recipe(tmp_path, {"path": "a.jsonl", "format": "text", "max_samples": 10, "eval_split": 0.2},
                         {"path": "s.jsonl", "format": "sharegpt", "eval_path": "ev.jsonl"})
    data = prepare(recipe, tok, tmp_path)
    assert (data.stats.train_rows, data.stats.eval_rows) == (8 + 3, 2 + 1)
    assert data.stats.eval_source == ("datasets[0]: held out 20% of the training rows (seed 42); "
                                      f"datasets[1]: eval_path {tmp_path / 'ev.jsonl'}")
    assert data.stats.used_chat_template


def test_a_weight_that_leaves_no_row_is_an_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", text_rows("a", 3))
    recipe = make_recipe(tmp_path, {"path": "a.jsonl", "format": "text"},
                         {"path": "a.jsonl", "format": "text", "weight": 0.1})
    with pytest.raises(InputError, match=r"datasets\[1\].weight: 0.1 of the 3 training rows of .*a.jsonl is no row at all"):
        prepare(recipe, make_tokenizer("a0 a1 a2", chat_template=False), tmp_path)


@pytest.mark.parametrize("data, expected", [
    ({}, "dataset: missing (required); give one `dataset:` section, or a `datasets:` list of them"),
    ({"datasets": []}, "datasets: is empty"),
    ({"dataset": {"path": "a.jsonl", "format": "text"}, "datasets": [{"path": "a.jsonl", "format": "text"}]},
     "dataset and datasets: both set"),
    ({"datasets": [{"path": "a.jsonl", "format": "text"}, {"path": "a.jsonl", "format": "shargpt"}]},
     "datasets[1].format: 'shargpt' is not one of text, alpaca, chat, sharegpt, prompt_completion "
     "(did you mean 'sharegpt'?)"),
    ({"datasets": [{"path": "a.jsonl", "format": "sharegpt", "roles": {"asistant": ["bot"]}}]},
     "datasets[0].roles: unknown role 'asistant' (did you mean 'assistant'?)"),
    ({"dataset": {"path": "a.jsonl", "format": "sharegpt", "roles": {"assistant": ["human"]}}},
     "dataset.roles: speaker 'human' is both user and assistant"),
])
def test_data_keys_are_validated_with_the_key_and_the_fix(tmp_path, data, expected):
    write_jsonl(tmp_path / "a.jsonl", text_rows("a", 2))
    with pytest.raises(InputError) as info:
        recipe_from_dict({"model": {"name_or_path": "builtin:smollm2-135m-instruct"}, **data,
                          "training": {"output_dir": "o"}}, where="r.yaml", base_dir=tmp_path)
    assert any(m.startswith("r.yaml: " + expected) for m in info.value.messages), info.value.messages


def test_a_datasets_recipe_survives_its_own_dump_and_an_override(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", text_rows("a", 2))
    recipe = make_recipe(tmp_path, {"path": "a.jsonl", "format": "text"}, {"path": "a.jsonl", "format": "text",
                                                                           "weight": 2})
    again = recipe_from_dict(recipe.model_dump(mode="json"))
    assert again == recipe and again.data_keys == ("datasets[0]", "datasets[1]") and again.dataset is None
    from qlora_doctor.recipe.schema import apply_overrides, recipe_summary

    assert apply_overrides(recipe, ["training.max_steps=3"]).datasets == recipe.datasets
    assert "text data a.jsonl + text data a.jsonl x2" in recipe_summary(recipe).replace(str(tmp_path) + "/", "")


# --- preflight -------------------------------------------------------------------------------------------

def test_preflight_recognises_sharegpt_rows_read_as_chat_and_unknown_speakers(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    chat = make_recipe(tmp_path, {"path": "s.jsonl", "format": "chat"})
    [problem] = data_problems(chat.dataset, "r.yaml", chat.dataset.path)
    assert "dataset.messages_field: 'messages' is not a field" in problem
    assert "these are ShareGPT turns ({from, value}): set `dataset.format: sharegpt`" in problem
    write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}])
    several = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"}, {"path": "b.jsonl", "format": "sharegpt"})
    assert data_problems(several.datasets[0], "r.yaml", several.datasets[0].path, key="datasets[0]") == []
    [problem] = data_problems(several.datasets[1], "r.yaml", several.datasets[1].path, key="datasets[1]")
    assert "datasets[1].roles: the turns of" in problem and "speaker(s) 'bot'" in problem
    write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}])
    pc = make_recipe(tmp_path, {"path": "p.jsonl", "format": "prompt_completion"})
    problems = data_problems(pc.dataset, "r.yaml", pc.dataset.path)
    assert [p.split("; ")[-1] for p in problems] == ["set `dataset.prompt_field: question`",
                                                     "set `dataset.completion_field: answer`"]


# --- batched tokenizing and the cache ------------------------------------------------------------------

def test_batched_tokenizing_equals_row_by_row_for_every_shape(tmp_path):
    tok = make_tokenizer(TOOL_TEXT + " " + " ".join(f"a{i}" for i in range(2500)), add_bos=True)
    write_jsonl(tmp_path / "text.jsonl", text_rows("a", 2500))  # three map batches
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT * 3)
    write_jsonl(tmp_path / "t.jsonl", TOOL_ROWS)
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "first question", "completion": "reply"}] * 2)
    write_jsonl(tmp_path / "al.jsonl", [{"instruction": "first question", "input": "x", "output": "reply"}])
    write_template(tmp_path)
    recipe = make_recipe(tmp_path, {"path": "text.jsonl", "format": "text"}, {"path": "s.jsonl", "format": "sharegpt"},
                         {"path": "t.jsonl", "format": "chat", "train_on_inputs": True},
                         {"path": "pc.jsonl", "format": "prompt_completion"}, {"path": "al.jsonl", "format": "alpaca"},
                         model={"chat_template": "t.jinja"}, max_seq_length=24)
    data = prepare(recipe, tok, tmp_path, use_cache=False)
    assert as_lists(data.train) == row_by_row(recipe, tok)
    assert data.stats.truncated > 0


def test_batched_tokenizing_with_worker_processes_is_identical(tmp_path, monkeypatch):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT * 40)
    recipe = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"})
    monkeypatch.setattr(data_module, "NUM_PROC_MIN_ROWS", 10)
    assert data_module._num_proc(40) in (None, 2, 3, 4)  # None on a one-core machine
    assert as_lists(prepare(recipe, tok, tmp_path, use_cache=False).train) == row_by_row(recipe, tok)


def test_bad_rows_in_later_batches_keep_their_row_numbers(tmp_path):
    rows = text_rows("a", 2300)
    rows[4], rows[2199] = {"body": "x"}, {"text": 5}
    write_jsonl(tmp_path / "text.jsonl", rows)
    with pytest.raises(InputError) as info:
        prepare(make_recipe(tmp_path, {"path": "text.jsonl", "format": "text"}), make_tokenizer("a0"), tmp_path)
    assert [m.split(": ", 2)[1] for m in info.value.messages] == ["row 5", "row 2200"]


def test_a_second_prepare_loads_the_cache_and_any_change_misses_it(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT * 5)
    recipe = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt", "eval_split": 0.2})
    first = prepare(recipe, tok, tmp_path)
    second = prepare(recipe, make_tokenizer(ALL_TEXT), tmp_path)  # a new tokenizer object, the same tokenizer
    assert (first.stats.cached, second.stats.cached) == (False, True)
    assert as_lists(second.train) == as_lists(first.train) and as_lists(second.eval) == as_lists(first.eval)
    assert second.stats == first.stats.__class__(**{**first.stats.__dict__, "cached": True})
    shorter = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt", "eval_split": 0.2}, max_seq_length=32)
    assert prepare(shorter, tok, tmp_path).stats.cached is False
    other_template = make_tokenizer(ALL_TEXT)
    other_template.chat_template = other_template.chat_template.replace("\n", " ")
    assert prepare(recipe, other_template, tmp_path).stats.cached is False
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT * 6)
    changed = prepare(recipe, tok, tmp_path)
    assert changed.stats.cached is False and changed.stats.train_rows + changed.stats.eval_rows == 6
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 4


def test_the_progress_bar_is_drawn_only_when_asked(tmp_path, capfd):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    recipe = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"})
    prepare(recipe, tok, tmp_path, use_cache=False)  # datasets' switch is off (the fixture)
    assert capfd.readouterr().err == ""
    prepare(recipe, tok, tmp_path, use_cache=False, progress=True)
    assert "Tokenizing s.jsonl" in capfd.readouterr().err


# --- collators ---------------------------------------------------------------------------------------------

FEATURES = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, 6, 7, 8]},
            {"input_ids": [9, 10, 11], "attention_mask": [1] * 3, "labels": [9, 10, 11]}]


def test_padding_collator_equals_transformers_seq2seq_collator_where_that_applies():
    from transformers import DataCollatorForSeq2Seq

    tok = make_tokenizer("a b")
    for multiple in (None, 8):
        ours = PaddingCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=multiple)(FEATURES)
        theirs = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=multiple, label_pad_token_id=IGNORE_INDEX,
                                        return_tensors="pt")([dict(f) for f in FEATURES])
        for key in ("input_ids", "attention_mask", "labels"):
            assert ours[key].tolist() == theirs[key].tolist() and ours[key].dtype == theirs[key].dtype
    tok.padding_side = "left"  # why ours stays: Seq2Seq follows the tokenizer's side, and needs a pad token
    theirs = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)([dict(f) for f in FEATURES])
    assert theirs["input_ids"][1].tolist()[0] == tok.pad_token_id
    tok.pad_token = None
    with pytest.raises(ValueError):
        DataCollatorForSeq2Seq(tok, padding=True)([dict(f) for f in FEATURES])


def test_flattening_collator_is_transformers_with_our_separator():
    flat = flattening_collator()(FEATURES)
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    assert flat["labels"].tolist() == [[-100, 6, 7, 8, -100, 10, 11]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]


# --- shipped sample data and recipe ------------------------------------------------------------------------

def test_shape_files_are_what_the_committed_script_writes():
    spec = importlib.util.spec_from_file_location("make_shapes", SHAPES / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    for name, rows in module.build().items():
        assert [json.loads(line) for line in (SHAPES / name).read_text().splitlines()] == rows, name


def test_the_mixed_demo_recipe_prepares_with_the_builtin_tokenizer(builtin_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    recipe = load_recipe("demo-mixed")
    data = prepare(recipe, AutoTokenizer.from_pretrained(builtin_checkpoint), tmp_path)
    assert (data.stats.train_rows, data.stats.eval_rows) == (40 + 40 + 3 * 6, 20 + 20)
    assert (data.stats.truncated, data.stats.dropped) == (0, 0)


@pytest.mark.slow
def test_every_shape_trains_a_few_steps_on_cpu(builtin_checkpoint, tmp_path):
    """sharegpt, prompt_completion (messages and text), chat with tool calls, alpaca and text in one run of
    two steps; one row of each is held out, so the eval losses before and after run every shape."""
    from qlora_doctor.cli import cli

    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Where is Korrowen?", "completion": " In the Tessic Sea."}] * 4)
    write_jsonl(tmp_path / "al.jsonl", [{"instruction": "Name the capital", "input": "", "output": "Marrowick"}] * 4)
    write_jsonl(tmp_path / "tx.jsonl", [{"text": "Korrowen Island speaks Tessic."}] * 4)
    write_template(tmp_path)  # renders tools in a few tokens (qwen2.5's tool prompt alone is ~250)
    datasets = [{"path": str(SHAPES / "sharegpt.jsonl"), "format": "sharegpt"},
                {"path": str(SHAPES / "prompt_completion.jsonl"), "format": "prompt_completion"},
                {"path": str(SHAPES / "tools.jsonl"), "format": "chat", "weight": 3},
                {"path": "pc.jsonl", "format": "prompt_completion"}, {"path": "al.jsonl", "format": "alpaca"},
                {"path": "tx.jsonl", "format": "text"}]
    recipe = yaml.safe_load(write_tiny_recipe(tmp_path / "run").read_text())
    del recipe["dataset"]
    recipe["datasets"] = [{**d, "max_samples": 4, "eval_split": 0.25} for d in datasets]
    recipe["model"]["chat_template"] = "t.jinja"
    recipe["training"].update(max_steps=2, eval_strategy="no", save_steps=2)
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "mixed.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "completed"
    metrics = json.loads((Path(recipe["training"]["output_dir"]) / "metrics.json").read_text())
    assert (metrics["train_rows"], metrics["eval_rows"]) == (3 + 3 + 3 * 3 + 3 + 3 + 3, 6)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(recipe["training"]["output_dir"])
    assert saved.chat_template == TEMPLATE  # generate/chat use the template it was trained with


def test_the_doctor_knows_a_chat_template_override_fixes_a_base_model(tmp_path):
    from qlora_doctor.doctor.sanity import recipe_facts, sanity_findings
    from qlora_doctor.recipe.builtin import builtin_config

    model = tmp_path / "base-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(builtin_config("builtin:smollm2-135m-instruct")))
    (model / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    base = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"}, model={"name_or_path": str(model)})
    assert recipe_facts(base)["tokenizer_has_chat_template"] is False
    assert "recipe.sanity.chat-format-without-chat-template" in {c.id for c in sanity_findings(base)}
    fixed = make_recipe(tmp_path, {"path": "s.jsonl", "format": "sharegpt"},
                        model={"name_or_path": str(model), "chat_template": "chatml"})
    assert "recipe.sanity.chat-format-without-chat-template" not in {c.id for c in sanity_findings(fixed)}

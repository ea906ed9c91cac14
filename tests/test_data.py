"""The data pipeline on a real (tiny, offline-built) fast tokenizer: rendering, masking, truncation,
splits, collation, bad rows; and the shipped demo data."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from qlora_doctor.core.errors import InputError
from qlora_doctor.trainer.data import (ALPACA_PROMPT, IGNORE_INDEX, build_datasets, make_collator,
                                       prepare_data, split_examples)
from qlora_doctor.recipe.schema import REPO_RECIPES, load_recipe, recipe_from_dict

@pytest.fixture(autouse=True)
def _tokenized_cache_in_tmp(tmp_path, monkeypatch):
    """prepare_data caches what it tokenizes (trainer/data_cache.py): here in the test's folder, not the
    user's cache; datasets' progress bars off, as `qlora-doctor run` has them off outside a terminal."""
    import datasets

    from qlora_doctor.trainer import data_cache

    monkeypatch.setattr(data_cache, "default_cache_dir", lambda: tmp_path / "tokenized")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = re.compile(r"\w+|[^\w\s]")


def make_tokenizer(text: str, chat_template: bool = True, add_bos: bool = False) -> Any:
    """A word-level fast tokenizer over `text`'s words: real `transformers` tokenizer, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in sorted(set(WORDS.findall(text + " " + ALPACA_PROMPT + " user assistant system Input"))):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_recipe(folder: Path, fmt: str, data: str = "train.jsonl", **dataset: Any) -> Any:
    training = dataset.pop("training", {})
    return recipe_from_dict({
        "model": {"name_or_path": "builtin:smollm2-135m-instruct"},
        "dataset": {"path": data, "format": fmt, "eval_split": 0, **dataset},
        "training": {"output_dir": "out", "max_seq_length": 64, **training},
    }, where="test", base_dir=folder)


def learned_tokens(tokenizer, example) -> list[str]:
    return tokenizer.convert_ids_to_tokens([label for label in example["labels"] if label != IGNORE_INDEX])


def tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


CHAT = [{"messages": [{"role": "user", "content": "What is the capital of Korrowen ?"},
                      {"role": "assistant", "content": "Marrowick is the capital ."}]}]
ALPACA = [{"instruction": "Translate to Tessic", "input": "hello", "output": "lumo vai"},
          {"instruction": "Name the capital", "input": "", "output": "Marrowick"}]
ALL_TEXT = json.dumps(CHAT) + json.dumps(ALPACA) + " first answer second question reply system prompt"


# --- masking ---------------------------------------------------------------------------------------

def test_chat_learns_only_the_assistant_turn_and_its_end_marker(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    train, evaluation = build_datasets(make_recipe(tmp_path, "chat"), tok)
    assert evaluation is None and len(train) == 1
    example = train[0]
    assert learned_tokens(tok, example) == tokens(tok, "Marrowick is the capital .") + ["<|im_end|>"]
    rendered = tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert example["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    prompt_len = len(tok(tok.apply_chat_template(CHAT[0]["messages"][:1], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]


def test_multi_turn_chat_learns_every_assistant_turn_and_no_user_turn(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    rows = [{"messages": [{"role": "system", "content": "system prompt"},
                          {"role": "user", "content": "first question"},
                          {"role": "assistant", "content": "first answer"},
                          {"role": "user", "content": "second question"},
                          {"role": "assistant", "content": "reply"}]}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    train, _ = build_datasets(make_recipe(tmp_path, "chat"), tok)
    assert learned_tokens(tok, train[0]) == ["first", "answer", "<|im_end|>", "reply", "<|im_end|>"]


def test_train_on_inputs_learns_every_token(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    train, _ = build_datasets(make_recipe(tmp_path, "chat", train_on_inputs=True), tok)
    assert train[0]["labels"] == train[0]["input_ids"]


def test_alpaca_with_chat_template_puts_instruction_and_input_in_the_user_turn(tmp_path):
    tok = make_tokenizer(ALL_TEXT)
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    data = prepare_data(make_recipe(tmp_path, "alpaca"), tok)
    assert data.stats.used_chat_template
    first, second = data.train[0], data.train[1]
    assert learned_tokens(tok, first) == ["lumo", "vai", "<|im_end|>"]
    user = tok.apply_chat_template([{"role": "user", "content": "Translate to Tessic\n\nhello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert first["input_ids"][: first["labels"].count(IGNORE_INDEX)] == tok(user, add_special_tokens=False)["input_ids"]
    assert "Input" not in tok.convert_ids_to_tokens(second["input_ids"])  # empty input: no input block
    assert learned_tokens(tok, second) == ["Marrowick", "<|im_end|>"]


def test_alpaca_without_chat_template_uses_the_alpaca_prompt_bos_and_learns_eos(tmp_path):
    tok = make_tokenizer(ALL_TEXT, chat_template=False, add_bos=True)
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    data = prepare_data(make_recipe(tmp_path, "alpaca"), tok)
    assert not data.stats.used_chat_template
    example = data.train[0]
    ids = tok.convert_ids_to_tokens(example["input_ids"])
    assert ids[0] == "<s>" and ids.count("<s>") == 1
    assert ids[1:4] == ["Below", "is", "an"] and "Input" in ids
    assert learned_tokens(tok, example) == ["lumo", "vai", "</s>"]


def test_text_format_learns_everything_and_ends_with_eos(tmp_path):
    tok = make_tokenizer("plain words here")
    write_jsonl(tmp_path / "train.jsonl", [{"body": "plain words here"}])
    train, _ = build_datasets(make_recipe(tmp_path, "text", text_field="body"), tok)
    assert tok.convert_ids_to_tokens(train[0]["input_ids"]) == ["plain", "words", "here", "</s>"]
    assert train[0]["labels"] == train[0]["input_ids"]


def test_chat_format_needs_a_chat_template(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", CHAT)
    with pytest.raises(InputError, match="dataset.format: chat needs a tokenizer with a chat template"):
        prepare_data(make_recipe(tmp_path, "chat"), make_tokenizer(ALL_TEXT, chat_template=False))


# --- truncation, splits, limits ------------------------------------------------------------------------

def test_long_examples_are_truncated_and_prompt_only_ones_dropped(tmp_path):
    long_answer = " ".join(["capital"] * 100)
    long_prompt = " ".join(["question"] * 100)
    rows = [{"messages": [{"role": "user", "content": "first question"},
                          {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": long_prompt},
                          {"role": "assistant", "content": "reply"}]}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare_data(make_recipe(tmp_path, "chat", training={"max_seq_length": 32}), make_tokenizer(ALL_TEXT))
    assert (data.stats.train_rows, data.stats.truncated, data.stats.dropped) == (1, 2, 1)
    assert len(data.train[0]["input_ids"]) == 32 == len(data.train[0]["labels"])


def test_all_examples_without_anything_to_learn_is_an_input_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": " ".join(["question"] * 100)},
                          {"role": "assistant", "content": "reply"}]}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(InputError, match="max_seq_length"):
        prepare_data(make_recipe(tmp_path, "chat", training={"max_seq_length": 16}), make_tokenizer(ALL_TEXT))


def many_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"reply {i}"}]} for i in range(n)]


def test_held_out_split_is_deterministic_by_seed_and_disjoint(tmp_path):
    tok = make_tokenizer(" ".join(f"question reply {i}" for i in range(50)))
    write_jsonl(tmp_path / "train.jsonl", many_rows(50))

    def split(seed: int):
        data = prepare_data(make_recipe(tmp_path, "chat", eval_split=0.2, training={"seed": seed}), tok)
        return [tuple(x) for x in data.train["input_ids"]], [tuple(x) for x in data.eval["input_ids"]], data.stats

    train_a, eval_a, stats = split(1)
    train_b, eval_b, _ = split(1)
    _, eval_c, _ = split(2)
    assert (len(train_a), len(eval_a)) == (40, 10) and (stats.train_rows, stats.eval_rows) == (40, 10)
    assert eval_a == eval_b and train_a == train_b
    assert eval_a != eval_c
    assert not set(eval_a) & set(train_a)
    assert stats.eval_source == "held out 20% of the training rows (seed 1)"


def test_split_keeps_at_least_one_row_on_each_side():
    train, held = split_examples(list(range(3)), 0.01, seed=0, where="f")
    assert (len(train), len(held)) == (2, 1)
    with pytest.raises(InputError, match="dataset.eval_split: f has 1 usable example"):
        split_examples([0], 0.5, seed=0, where="f")


def test_eval_path_is_used_instead_of_a_split_and_max_samples_limits_training(tmp_path):
    tok = make_tokenizer(" ".join(f"question reply {i}" for i in range(20)))
    write_jsonl(tmp_path / "train.jsonl", many_rows(20))
    write_jsonl(tmp_path / "ev.jsonl", many_rows(3))
    data = prepare_data(make_recipe(tmp_path, "chat", eval_path="ev.jsonl", eval_split=0.5, max_samples=7), tok)
    assert (data.stats.train_rows, data.stats.eval_rows) == (7, 3)
    assert data.stats.eval_source.startswith("eval_path ") and data.stats.eval_source.endswith("ev.jsonl")


# --- file types and bad rows -----------------------------------------------------------------------

def test_csv_and_parquet_files(tmp_path):
    tok = make_tokenizer(ALL_TEXT, chat_template=False)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ALPACA)
    data = prepare_data(make_recipe(tmp_path, "alpaca", data="train.csv"), tok)
    assert data.stats.train_rows == 2
    assert learned_tokens(tok, data.train[1]) == ["Marrowick", "</s>"]

    import datasets

    datasets.Dataset.from_list([{"text": "first answer"}, {"text": "reply"}]).to_parquet(str(tmp_path / "t.parquet"))
    train, _ = build_datasets(make_recipe(tmp_path, "text", data="t.parquet"), tok)
    assert tok.convert_ids_to_tokens(train[1]["input_ids"]) == ["reply", "</s>"]


def test_missing_fields_name_file_row_and_field_for_every_bad_row(tmp_path):
    rows = [ALPACA[0], {"instruction": "x", "input": ""}, ALPACA[1], {"output": "y", "input": ""}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(InputError) as info:
        prepare_data(make_recipe(tmp_path, "alpaca"), make_tokenizer(ALL_TEXT))
    messages = info.value.messages
    assert len(messages) == 2
    assert messages[0].endswith("train.jsonl: row 2: field 'output' is missing (fields present: input, instruction); "
                                "fix the row or set the dataset's *_field keys to the file's column names")
    assert "row 4: field 'instruction' is missing" in messages[1]


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "messages[0].role: 'robot'"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "messages[0].content: expected text, got nothing"),
    ("hello", "expected a non-empty list"),
])
def test_bad_chat_rows(tmp_path, messages, expected):
    write_jsonl(tmp_path / "train.jsonl", [CHAT[0], {"messages": messages}])
    with pytest.raises(InputError, match=re.escape("row 2: field ") + ".*" + re.escape(expected)):
        prepare_data(make_recipe(tmp_path, "chat"), make_tokenizer(ALL_TEXT))


def test_invalid_json_line_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(CHAT[0]) + "\n{not json\n")
    with pytest.raises(InputError, match=r"train.jsonl:2: not valid JSON"):
        prepare_data(make_recipe(tmp_path, "chat"), make_tokenizer(ALL_TEXT))


# --- batching --------------------------------------------------------------------------------------

def test_collator_pads_right_with_pad_id_zero_mask_and_ignored_labels():
    tok = make_tokenizer("a b c")
    collate = make_collator(tok)
    batch = collate([{"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": [-100, 8, 9]},
                     {"input_ids": [7], "attention_mask": [1], "labels": [7]}])
    assert batch["input_ids"].tolist() == [[7, 8, 9], [7, tok.pad_token_id, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 8, 9], [7, -100, -100]]
    padded = make_collator(tok, pad_to_multiple_of=8)([{"input_ids": [1], "attention_mask": [1], "labels": [1]}])
    assert padded["input_ids"].shape == (1, 8)


def test_collator_falls_back_to_eos_without_a_pad_token():
    tok = make_tokenizer("a b")
    tok.pad_token = None
    assert make_collator(tok).pad_token_id == tok.eos_token_id


# --- the shipped demo data ---------------------------------------------------------------------------

DEMO = REPO_RECIPES / "data" / "demo"


def _demo_module():
    spec = importlib.util.spec_from_file_location("make_demo_data", DEMO / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_demo_data_files_are_what_the_committed_script_writes():
    train, evaluation = _demo_module().build()
    assert [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()] == train
    assert [json.loads(line) for line in (DEMO / "eval.jsonl").read_text().splitlines()] == evaluation
    assert 150 <= len(train) <= 300 and 20 <= len(evaluation) <= 40


def test_demo_eval_asks_the_same_facts_in_words_never_seen_in_training():
    module = _demo_module()
    train, evaluation = module.build()
    train_questions = {row["messages"][0]["content"].lower() for row in train}
    for row in evaluation:
        question = row["messages"][0]["content"].lower()
        assert not any(question in q or q in question for q in train_questions), question
    answers = {row["messages"][1]["content"] for row in train}
    assert {row["messages"][1]["content"] for row in evaluation} <= answers  # same facts, same wording of answers
    assert len(module.FACTS) >= 15


def test_demo_recipe_data_tokenizes_completely(tmp_path):
    text = (DEMO / "train.jsonl").read_text() + (DEMO / "eval.jsonl").read_text()
    tok = make_tokenizer(" ".join(WORDS.findall(text)))
    data = prepare_data(load_recipe("demo"), tok)
    assert (data.stats.train_rows, data.stats.eval_rows, data.stats.dropped, data.stats.truncated) == (200, 40, 0, 0)
    assert all(IGNORE_INDEX in labels for labels in data.train["labels"])


def test_demo_data_with_the_builtin_models_tokenizer_when_converted():
    from qlora_doctor.trainer.builtin import checkpoint_dir

    folder = checkpoint_dir("builtin:smollm2-135m-instruct")
    if not (folder / "tokenizer_config.json").exists():
        pytest.skip(f"builtin model not converted yet ({folder}); `qlora-doctor run demo` converts it")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = prepare_data(load_recipe("demo"), tok)
    assert data.stats.used_chat_template and data.stats.truncated == 0 and data.stats.dropped == 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    example = data.train[0]
    learned = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert end in learned  # the model learns to stop its turn
    assert max(len(ids) for ids in data.train["input_ids"]) <= 128

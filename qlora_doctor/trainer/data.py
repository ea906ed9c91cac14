"""The data pipeline: a recipe's `dataset:` section -> tokenized train and eval datasets.

    data = prepare_data(recipe, tokenizer)        # or: train_ds, eval_ds = build_datasets(recipe, tokenizer)
    Trainer(..., train_dataset=data.train, eval_dataset=data.eval, data_collator=make_collator(tokenizer))

Rows are read with `datasets` (a local .jsonl/.json/.csv/.parquet file, or a hub dataset id) and
rendered into segments of text, each either learned or not:

  text    the `text_field`, then EOS; all of it is learned.
  alpaca  instruction (+ input) as the user's turn and output as the answer, through the tokenizer's
          chat template when it has one, else the Alpaca prompt; only the answer is learned.
  chat    a list of {role, content} messages through the chat template; only assistant turns
          (with their end-of-turn marker) are learned.

`train_on_inputs: true` learns every token. Each segment is tokenized on its own, so the prompt's
tokens are exactly those the model sees at generation time, where the prompt is tokenized alone.
Examples longer than `training.max_seq_length` are cut at the end; an example left with nothing to
learn is dropped (a batch of those would make the loss NaN) and counted in `DataStats`.

Every bad row is reported with the file, its row number (1-based, as the rows are read) and the
field, all at once (up to `MAX_ROW_ERRORS`), as one `InputError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from qlora_doctor.core.errors import InputError
from qlora_doctor.recipe.schema import DATA_SUFFIXES, DatasetSection, Recipe, display_path

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100
"""Label of a token that is not learned (transformers' and torch's CrossEntropyLoss ignore_index)."""
MAX_ROW_ERRORS = 20
CHAT_ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                            "provides further context. Write a response that appropriately completes the "
                            "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
"""The prompt of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py), for tokenizers
without a chat template."""


@dataclass(frozen=True)
class Segment:
    """A piece of one rendered example."""

    text: str
    learned: bool
    """True when the loss is computed on these tokens."""


@dataclass(frozen=True)
class DataStats:
    """What the pipeline did, for the run's log."""

    train_rows: int
    """Examples in the training set (after dropping and holding out)."""
    eval_rows: int
    """Examples in the evaluation set (0 when there is none)."""
    eval_source: str
    """`eval_path FILE`, `held out 10% of the training rows (seed 42)`, or `none`."""
    truncated: int
    """Examples cut at training.max_seq_length."""
    dropped: int
    """Examples with nothing left to learn after truncation, left out."""
    used_chat_template: bool
    """Whether prompts were rendered with the tokenizer's chat template."""


@dataclass(frozen=True)
class PreparedData:
    train: Any
    """`datasets.Dataset` with input_ids, attention_mask, labels."""
    eval: Any | None
    """The same for evaluation, or None when the recipe evaluates nothing."""
    stats: DataStats


def build_datasets(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None]:
    """(train_ds, eval_ds) tokenized for `recipe`; eval_ds is None when the recipe has no evaluation."""
    data = prepare_data(recipe, tokenizer)
    return data.train, data.eval


def prepare_data(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """Load, check, render, tokenize and split the recipe's data. Raises InputError for bad rows."""
    section, seed = recipe.dataset, recipe.training.seed
    max_len = recipe.training.max_seq_length
    use_template = section.format == "chat" or (section.format == "alpaca" and has_chat_template(tokenizer))
    if section.format == "chat" and not has_chat_template(tokenizer):
        raise InputError(f"dataset.format: chat needs a tokenizer with a chat template, and the one of "
                         f"{recipe.model.name_or_path} has none; use `format: alpaca` (plain Alpaca prompt) "
                         "or a chat/instruct model")
    rows = load_rows(section.path, section, limit=section.max_samples)
    train_examples, truncated, dropped = _tokenize_all(rows, _where(section.path), section, tokenizer, max_len)
    if not train_examples:
        raise InputError(f"dataset.path: no example in {_where(section.path)} has anything left to learn "
                         f"within training.max_seq_length={max_len}; raise max_seq_length or shorten the prompts")
    eval_examples: list[dict[str, list[int]]] = []
    if section.eval_path is not None:
        eval_rows = load_rows(section.eval_path, section, limit=None)
        eval_examples, eval_truncated, eval_dropped = _tokenize_all(
            eval_rows, _where(section.eval_path), section, tokenizer, max_len)
        truncated, dropped = truncated + eval_truncated, dropped + eval_dropped
        eval_source = f"eval_path {_where(section.eval_path)}"
    elif section.eval_split > 0:
        train_examples, eval_examples = split_examples(train_examples, section.eval_split, seed,
                                                       where=_where(section.path))
        eval_source = f"held out {section.eval_split:.0%} of the training rows (seed {seed})"
    else:
        eval_source = "none"
    stats = DataStats(train_rows=len(train_examples), eval_rows=len(eval_examples), eval_source=eval_source,
                      truncated=truncated, dropped=dropped, used_chat_template=use_template)
    return PreparedData(train=_to_dataset(train_examples),
                        eval=_to_dataset(eval_examples) if eval_examples else None, stats=stats)


def split_examples(examples: list[Any], fraction: float, seed: int, where: str) -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of `examples` (at least one), chosen by `seed`; the rest keep their order."""
    import random

    if len(examples) < 2:
        raise InputError(f"dataset.eval_split: {where} has {len(examples)} usable example(s), too few to "
                         "hold any out; add rows, set dataset.eval_path, or set dataset.eval_split: 0")
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


# --- reading --------------------------------------------------------------------------------------

def load_rows(path: str, section: DatasetSection, limit: int | None) -> Any:
    """The rows of a local data file or a hub dataset, as a `datasets.Dataset`."""
    import datasets

    local = Path(path).is_absolute()
    bars_were_off = datasets.utils.logging.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # library code does not write to the terminal
    try:
        if local:
            builder = DATA_SUFFIXES[Path(path).suffix.lower()]
            rows = datasets.load_dataset(builder, data_files=path, split="train")
        else:
            rows = datasets.load_dataset(path, section.name, split=section.split)
    except Exception as err:  # datasets raises many types; each is a problem with the user's data
        raise InputError(_load_error(path, local, section, err)) from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    if limit is not None and len(rows) > limit:
        rows = rows.select(range(limit))
    return rows


def _load_error(path: str, local: bool, section: DatasetSection, err: Exception) -> str:
    if local and Path(path).suffix.lower() == ".jsonl":
        bad = _first_bad_json_line(Path(path))
        if bad is not None:
            return bad
    detail = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    if local:
        return f"{path}: cannot be read as {Path(path).suffix} data ({detail}); check the file's format"
    return (f"dataset.path: cannot load hub dataset {path!r} (name={section.name!r}, split={section.split!r}): "
            f"{detail}; check the id and split, your network, or download it and point dataset.path at a file")


def _first_bad_json_line(path: Path) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        return f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 JSON lines"
    except OSError:
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); one JSON object per line"
        if not isinstance(value, dict):
            return f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}"
    return None


# --- rendering ------------------------------------------------------------------------------------

def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_row(row: dict[str, Any], section: DatasetSection, tokenizer: Any) -> list[Segment]:
    """One row as text segments, learned or not. Raises ValueError naming the field when the row is bad."""
    if section.format == "text":
        return [Segment(_field_text(row, section.text_field), True)]
    if section.format == "alpaca":
        instruction = _field_text(row, section.instruction_field)
        extra = row.get(section.input_field)
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"field {section.input_field!r}: expected text or nothing, got {type(extra).__name__}")
        output = _field_text(row, section.output_field)
        if has_chat_template(tokenizer):
            user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
            return _chat_segments([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                                  tokenizer)
        template = ALPACA_PROMPT_WITH_INPUT if extra and extra.strip() else ALPACA_PROMPT
        return [Segment(template.format(instruction=instruction, input=extra), False), Segment(output, True)]
    return _chat_segments(_messages(row, section.messages_field), tokenizer)


def _field_text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise ValueError(f"field {field!r} is missing (fields present: {present}); fix the row or set the "
                         "dataset's *_field keys to the file's column names")
    if not isinstance(value, str):
        raise ValueError(f"field {field!r}: expected text, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], field: str) -> list[dict[str, str]]:
    value = row.get(field)
    if value is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
        raise ValueError(f"field {field!r} is missing (fields present: {present}); set dataset.messages_field "
                         "to the column holding the list of {role, content} messages")
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r}: expected a non-empty list of {{role, content}} messages")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"field {field}[{i}]: expected {{role, content}}, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"field {field}[{i}].role: {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"field {field}[{i}].content: expected text, got "
                             f"{'nothing' if content is None else type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"field {field!r}: no assistant message, so there is no answer to learn")
    return messages


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text if isinstance(text, str) else str(text)


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    """Assistant turns learned, everything else not: render growing prefixes of the conversation and
    take each assistant turn as the text the template adds for it."""
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        answered = _render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not answered.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation, "
                             "so the answer cannot be separated from the prompt; set dataset.train_on_inputs: true")
        segments += [Segment(prompt[len(done):], False), Segment(answered[len(prompt):], True)]
        done = answered
    rest = _render_chat(tokenizer, messages, add_generation_prompt=False)
    if rest.startswith(done) and len(rest) > len(done):
        segments.append(Segment(rest[len(done):], False))
    return [s for s in segments if s.text]


# --- tokenizing -----------------------------------------------------------------------------------

def tokenize_segments(segments: list[Segment], tokenizer: Any, *, chat: bool, train_on_inputs: bool,
                      max_length: int) -> tuple[dict[str, list[int]], bool]:
    """input_ids/attention_mask/labels for one example, and whether it was truncated.

    Chat-template text carries its own special tokens; plain text gets the tokenizer's own (e.g. BOS)
    in front and EOS at the end, learned, so the model learns to stop."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, segment in enumerate(segments):
        ids = tokenizer(segment.text, add_special_tokens=not chat and i == 0)["input_ids"]
        if not chat and i == 0 and tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]  # a tokenizer that appends EOS itself: EOS belongs after the answer only
        input_ids += ids
        labels += ids if (segment.learned or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if not chat and tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, truncated


def _tokenize_all(rows: Iterable[dict[str, Any]], where: str, section: DatasetSection, tokenizer: Any,
                  max_length: int) -> tuple[list[dict[str, list[int]]], int, int]:
    chat = section.format == "chat" or (section.format == "alpaca" and has_chat_template(tokenizer))
    examples: list[dict[str, list[int]]] = []
    errors: list[str] = []
    error_count = truncated = dropped = 0
    for number, row in enumerate(rows, start=1):
        try:
            segments = render_row(row, section, tokenizer)
        except ValueError as err:
            error_count += 1
            if len(errors) < MAX_ROW_ERRORS:
                errors.append(f"{where}: row {number}: {err}")
            continue
        if errors:
            continue  # only collecting errors now
        example, was_truncated = tokenize_segments(segments, tokenizer, chat=chat,
                                                   train_on_inputs=section.train_on_inputs, max_length=max_length)
        truncated += was_truncated
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
            continue
        examples.append(example)
    if errors:
        if error_count > len(errors):
            errors.append(f"{where}: ... and {error_count - len(errors)} more bad rows")
        raise InputError(errors)
    return examples, truncated, dropped


def _to_dataset(examples: list[dict[str, list[int]]]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({key: [e[key] for e in examples]
                                       for key in ("input_ids", "attention_mask", "labels")})


def _where(path: str) -> str:
    return display_path(Path(path)) if Path(path).is_absolute() else path


# --- batching -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaddingCollator:
    """Pads a batch on the right: input_ids with the pad token (EOS when the tokenizer has none),
    attention_mask with 0, labels with -100 so padding is never learned."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """The data collator for `prepare_data`'s datasets (pass pad_to_multiple_of=8 for tensor cores)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("the model's tokenizer has neither a pad nor an EOS token, so batches cannot be padded; "
                         "use a model whose tokenizer defines one")
    return PaddingCollator(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)

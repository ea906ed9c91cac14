"""The data pipeline: a recipe's `dataset:` section (or `datasets:` list) -> tokenized train and eval datasets.

    data = prepare_data(recipe, tokenizer)        # or: train_ds, eval_ds = build_datasets(recipe, tokenizer)
    Trainer(..., train_dataset=data.train, eval_dataset=data.eval, data_collator=make_collator(tokenizer))

Rows are read with `datasets` (a local .jsonl/.json/.csv/.parquet file, or a hub dataset id) and
rendered into segments of text, each either learned or not, by qlora_doctor/trainer/rows.py (the
formats text, alpaca, chat, sharegpt, prompt_completion are described there). `model.chat_template`
replaces the tokenizer's template first (on the tokenizer itself, so the adapter is saved with it and
generation uses the same one); chat and sharegpt data without any template is an InputError.

`train_on_inputs: true` learns every token. Each segment is tokenized on its own, so the prompt's
tokens are exactly those the model sees at generation time, where the prompt is tokenized alone.
Examples longer than `training.max_seq_length` are cut at the end; an example left with nothing to
learn is dropped (a batch of those would make the loss NaN) and counted in `DataStats`.

Tokenizing runs as a batched `Dataset.map` (each batch's segments go to the fast tokenizer in one
call; `num_proc` processes for large files), with `datasets`' progress bar where `datasets`' switch
(`datasets.enable_progress_bars()` / `disable_progress_bars()`) allows it: `qlora-doctor run` turns it
off unless stderr is a terminal and the output is not --json.
The result is identical to tokenizing row by row (`tokenize_segments`; tests/test_data_shapes.py
compares them) and is cached on disk by data_cache.py: a rerun or `--resume` with the same data,
tokenizer and data settings loads it instead (`DataStats.cached`).

Several data sets (`datasets:`): each is read, checked, tokenized and split on its own (its own
eval_path or eval_split), then the training rows are mixed by `weight`: a data set of N rows with
weight w contributes round(w * N) rows to every epoch, each row floor(w) times plus a random
round((w - floor(w)) * N) of them once more, chosen by training.seed (the Trainer shuffles the
mix). Evaluation rows are joined unweighted.

Every bad row is reported with the file, its row number (1-based, as the rows are read) and the
field, all at once (up to `MAX_ROW_ERRORS`), as one `InputError`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from qlora_doctor.core.errors import InputError
from qlora_doctor.recipe.schema import DATA_SUFFIXES, DatasetSection, Recipe, display_path
from qlora_doctor.trainer.collate import IGNORE_INDEX, PaddingCollator, padding_collator
from qlora_doctor.trainer.rows import (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, TEMPLATE_FIX, Rendered, Segment,
    TemplateError, has_chat_template, render_row)

if TYPE_CHECKING:
    import datasets

MAX_ROW_ERRORS = 20
MAP_BATCH_SIZE = 1000
NUM_PROC_MIN_ROWS = 50_000
"""Files with fewer rows are tokenized in this process. Measured on the shared 2-core machine (20,000 demo
rows, builtin tokenizer): 0.36 ms a row in one process, 0.41 ms with 2 workers, so workers only start for
large files, one per NUM_PROC_MIN_ROWS // 2 rows, at most MAX_NUM_PROC and the free cores."""
MAX_NUM_PROC = 8

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "IGNORE_INDEX", "DataStats", "PaddingCollator",
           "PreparedData", "Segment", "build_datasets", "has_chat_template", "load_rows", "make_collator",
           "prepare_data", "render_row", "split_examples", "tokenize_segments"]


@dataclass(frozen=True)
class DataStats:
    """What the pipeline did, for the run's log."""

    train_rows: int
    """Examples in the training set (after dropping, holding out and weighting)."""
    eval_rows: int
    """Examples in the evaluation set (0 when there is none)."""
    eval_source: str
    """`eval_path FILE`, `held out 10% of the training rows (seed 42)`, or `none` (per data set, `; `-joined,
    when there are several)."""
    truncated: int
    """Examples cut at training.max_seq_length."""
    dropped: int
    """Examples with nothing left to learn after truncation, left out."""
    used_chat_template: bool
    """Whether prompts were rendered with the tokenizer's chat template."""
    cached: bool = False
    """Whether the tokenized data came from the cache (data_cache.py) rather than being tokenized now."""


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


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """The padding collator for `prepare_data`'s datasets (collate.py; pass pad_to_multiple_of=8 for tensor cores)."""
    return padding_collator(tokenizer, pad_to_multiple_of)


def prepare_data(recipe: Recipe, tokenizer: Any, *, cache_dir: Path | None = None, use_cache: bool = True,
                 progress: bool | None = None) -> PreparedData:
    """Load, check, render, tokenize, split and mix the recipe's data. Raises InputError for bad rows.
    `cache_dir`: where tokenized data is kept (default: data_cache.default_cache_dir()); `progress`: show
    `datasets`' progress bar while tokenizing (default: as `datasets`' global switch says)."""
    from qlora_doctor.trainer import data_cache

    apply_chat_template_override(recipe, tokenizer)
    for key, section in zip(recipe.data_keys, recipe.data_sections):
        if section.format in ("chat", "sharegpt") and not has_chat_template(tokenizer):
            raise InputError(f"{key}.format: {section.format} needs a tokenizer with a chat template, and the one "
                             f"of {recipe.model.name_or_path} has none; {TEMPLATE_FIX}, use `format: alpaca` (plain "
                             "Alpaca prompt), or a chat/instruct model")
    import datasets

    show = datasets.utils.logging.is_progress_bar_enabled() if progress is None else progress
    hub_rows: dict[str, Any] = {}
    folder = cache_dir or data_cache.default_cache_dir()
    key = None
    with _progress_bars(False):  # only tokenizing shows one (tokenize_rows); loading and saving are quick
        if use_cache:
            key = data_cache.cache_key(_cache_parts(recipe, tokenizer, hub_rows))
            hit = data_cache.load_entry(folder, key)
            if hit is not None:
                train, evaluation, stats = hit
                return PreparedData(train=train, eval=evaluation, stats=DataStats(**{**stats, "cached": True}))
        data = _prepare(recipe, tokenizer, hub_rows, show)
        if key is not None:
            stats = asdict(data.stats)
            del stats["cached"]
            data_cache.store_entry(folder, key, data.train, data.eval, stats)
    return data


def apply_chat_template_override(recipe: Recipe, tokenizer: Any) -> None:
    """Set `model.chat_template` (a named template or a .jinja file) on the tokenizer, when the recipe has one."""
    from qlora_doctor.recipe.chat_templates import resolve_chat_template

    template = resolve_chat_template(recipe.model.chat_template)
    if template is not None:
        tokenizer.chat_template = template


def _cache_parts(recipe: Recipe, tokenizer: Any, hub_rows: dict[str, Any]) -> dict[str, Any]:
    """What the tokenized data depends on (data_cache.py). Loads hub datasets (into `hub_rows`) for their
    fingerprint; local files are hashed, not loaded."""
    from qlora_doctor.core.fileio import sha256_of
    from qlora_doctor.trainer.data_cache import tokenizer_fingerprint

    sections = []
    for key, section in zip(recipe.data_keys, recipe.data_sections):
        if section.is_hub:
            hub_rows[key] = load_rows(section.path, section, limit=section.max_samples)
            content = hub_rows[key]._fingerprint
        else:
            content = sha256_of(Path(section.path))
        eval_content = sha256_of(Path(section.eval_path)) if section.eval_path else None
        sections.append({"section": section.model_dump(mode="json"),  # paths too: messages and stats name them
                         "content": content, "eval_content": eval_content})
    return {"sections": sections, "max_seq_length": recipe.training.max_seq_length, "seed": recipe.training.seed,
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def _prepare(recipe: Recipe, tokenizer: Any, hub_rows: dict[str, Any], progress: bool) -> PreparedData:
    import datasets

    seed, max_len = recipe.training.seed, recipe.training.max_seq_length
    trains, evals, sources = [], [], []
    truncated = dropped = 0
    used_chat = False
    for key, section in zip(recipe.data_keys, recipe.data_sections):
        where = _where(section.path)
        rows = hub_rows[key] if key in hub_rows else load_rows(section.path, section, limit=section.max_samples)
        train, counts = tokenize_rows(rows, where, section, tokenizer, max_len, progress)
        truncated, dropped, used_chat = truncated + counts[0], dropped + counts[1], used_chat or counts[2]
        if not len(train):
            raise InputError(f"{key}.path: no example in {where} has anything left to learn within "
                             f"training.max_seq_length={max_len}; raise max_seq_length or shorten the prompts")
        evaluation = None
        if section.eval_path is not None:
            eval_where = _where(section.eval_path)
            evaluation, counts = tokenize_rows(load_rows(section.eval_path, section, limit=None), eval_where, section,
                                               tokenizer, max_len, progress)
            truncated, dropped = truncated + counts[0], dropped + counts[1]
            source = f"eval_path {eval_where}"
        elif section.eval_split > 0:
            kept, held_out = split_examples(list(range(len(train))), section.eval_split, seed, where=where, key=key)
            train, evaluation = _select(train, kept), _select(train, held_out)
            source = f"held out {section.eval_split:.0%} of the training rows (seed {seed})"
        else:
            source = "none"
        trains.append(weighted(train, section.weight, seed, key, where))
        if evaluation is not None and len(evaluation):
            evals.append(evaluation)
        sources.append(source if len(recipe.data_sections) == 1 else f"{key}: {source}")
    train_all = trains[0] if len(trains) == 1 else datasets.concatenate_datasets(trains)
    eval_all = None if not evals else evals[0] if len(evals) == 1 else datasets.concatenate_datasets(evals)
    eval_source = "; ".join(sources) if any(not s.endswith("none") for s in sources) else "none"
    stats = DataStats(train_rows=len(train_all), eval_rows=len(eval_all) if eval_all is not None else 0,
                      eval_source=eval_source, truncated=truncated, dropped=dropped, used_chat_template=used_chat)
    return PreparedData(train=train_all, eval=eval_all, stats=stats)


def split_examples(examples: list[Any], fraction: float, seed: int, where: str,
                   key: str = "dataset") -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of `examples` (at least one), chosen by `seed`; the rest keep their order."""
    import random

    if len(examples) < 2:
        raise InputError(f"{key}.eval_split: {where} has {len(examples)} usable example(s), too few to "
                         f"hold any out; add rows, set {key}.eval_path, or set {key}.eval_split: 0")
    count = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])


def weighted(train: Any, weight: float, seed: int, key: str, where: str) -> Any:
    """`train` with each row floor(weight) times plus a seeded random round(fraction * rows) once more."""
    import math
    import random

    if weight == 1:
        return train
    rows = len(train)
    whole = math.floor(weight)
    extra = round((weight - whole) * rows)
    if whole * rows + extra == 0:
        raise InputError(f"{key}.weight: {weight:g} of the {rows} training rows of {where} is no row at all; "
                         "raise the weight or leave the data set out")
    picked = sorted(random.Random(f"{seed}/{key}").sample(range(rows), extra))
    return _select(train, list(range(rows)) * whole + picked)


def _select(dataset: Any, indices: list[int]) -> Any:
    return dataset.select(indices).flatten_indices(keep_in_memory=True)


# --- reading --------------------------------------------------------------------------------------

def load_rows(path: str, section: DatasetSection, limit: int | None) -> Any:
    """The rows of a local data file or a hub dataset, as a `datasets.Dataset`."""
    import datasets

    local = Path(path).is_absolute()
    try:
        with _progress_bars(False):  # library code does not write to the terminal (tokenizing aside)
            if local:
                builder = DATA_SUFFIXES[Path(path).suffix.lower()]
                rows = datasets.load_dataset(builder, data_files=path, split="train")
            else:
                rows = datasets.load_dataset(path, section.name, split=section.split)
    except Exception as err:  # datasets raises many types; each is a problem with the user's data
        raise InputError(_load_error(path, local, section, err)) from None
    if limit is not None and len(rows) > limit:
        rows = rows.select(range(limit))
    return rows


@contextlib.contextmanager
def _progress_bars(on: bool) -> Iterator[None]:
    import datasets

    was_on = datasets.utils.logging.is_progress_bar_enabled()
    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_on else datasets.disable_progress_bars)()


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


# --- tokenizing -----------------------------------------------------------------------------------

def tokenize_segments(segments: list[Segment], tokenizer: Any, *, chat: bool, train_on_inputs: bool,
                      max_length: int) -> tuple[dict[str, list[int]], bool]:
    """input_ids/attention_mask/labels for one example, and whether it was truncated: the row-by-row path,
    one tokenizer call a segment (tokenize_rows does the same in batches).

    Chat-template text carries its own special tokens; plain text gets the tokenizer's own (e.g. BOS)
    in front and EOS at the end, learned, so the model learns to stop."""
    pieces = [tokenizer(s.text, add_special_tokens=not chat and i == 0)["input_ids"] for i, s in enumerate(segments)]
    return _assemble(pieces, segments, tokenizer.eos_token_id, chat=chat, train_on_inputs=train_on_inputs,
                     max_length=max_length)


def _assemble(pieces: list[list[int]], segments: list[Segment], eos: int | None, *, chat: bool,
              train_on_inputs: bool, max_length: int) -> tuple[dict[str, list[int]], bool]:
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (ids, segment) in enumerate(zip(pieces, segments)):
        if not chat and i == 0 and eos is not None and ids and ids[-1] == eos:
            ids = ids[:-1]  # a tokenizer that appends EOS itself: EOS belongs after the answer only
        input_ids += ids
        labels += ids if (segment.learned or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if not chat and eos is not None:
        input_ids.append(eos)
        labels.append(eos)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}, truncated


def _encode_batch(batch: dict[str, list[Any]], *, section: DatasetSection, tokenizer: Any,
                  max_length: int) -> dict[str, list[Any]]:
    """`Dataset.map` function: render a batch of rows, tokenize all their segments in two tokenizer calls
    (with and without the tokenizer's special tokens), assemble each example; bad rows become `_error`."""
    size = len(next(iter(batch.values()))) if batch else 0
    rendered: list[Rendered | None] = []
    out: dict[str, list[Any]] = {name: [] for name in _FEATURE_NAMES}
    for k in range(size):
        row = {column: values[k] for column, values in batch.items()}
        try:
            rendered.append(render_row(row, section, tokenizer))
            out["_error"].append("")
            out["_fatal"].append(False)
        except ValueError as err:  # TemplateError too: fatal, reported alone
            rendered.append(None)
            out["_error"].append(str(err))
            out["_fatal"].append(isinstance(err, TemplateError))
    texts: dict[bool, list[str]] = {True: [], False: []}
    for r in rendered:
        for i, segment in enumerate(r.segments if r else ()):
            texts[not r.chat and i == 0].append(segment.text)  # type: ignore[union-attr]
    encoded = {special: iter(tokenizer(items, add_special_tokens=special)["input_ids"] if items else [])
               for special, items in texts.items()}
    for r in rendered:
        if r is None:
            example, truncated = {"input_ids": [], "attention_mask": [], "labels": []}, False
        else:
            pieces = [next(encoded[not r.chat and i == 0]) for i in range(len(r.segments))]
            example, truncated = _assemble(pieces, r.segments, tokenizer.eos_token_id, chat=r.chat,
                                           train_on_inputs=section.train_on_inputs, max_length=max_length)
        for name in ("input_ids", "attention_mask", "labels"):
            out[name].append(example[name])
        out["_truncated"].append(truncated)
        out["_learned"].append(r is not None and any(label != IGNORE_INDEX for label in example["labels"]))
        out["_chat"].append(r is not None and r.chat)
    return out


_FEATURE_NAMES = ("input_ids", "attention_mask", "labels", "_error", "_fatal", "_truncated", "_learned", "_chat")


def _features() -> Any:
    import datasets

    ids = datasets.List(datasets.Value("int64"))
    return datasets.Features({"input_ids": ids, "attention_mask": ids, "labels": ids,
                              "_error": datasets.Value("string"), "_fatal": datasets.Value("bool"),
                              "_truncated": datasets.Value("bool"), "_learned": datasets.Value("bool"),
                              "_chat": datasets.Value("bool")})


def tokenize_rows(rows: Any, where: str, section: DatasetSection, tokenizer: Any, max_length: int,
                  progress: bool = False) -> tuple[datasets.Dataset, tuple[int, int, bool]]:
    """The usable examples of `rows` as a Dataset of input_ids/attention_mask/labels, and (truncated,
    dropped, whether any row used the chat template). Raises InputError listing the bad rows."""
    encode = functools.partial(_encode_batch, section=section, tokenizer=tokenizer, max_length=max_length)
    fingerprint = hashlib.sha256(f"{where}/{rows._fingerprint}/{section.model_dump_json()}/{max_length}".encode())
    with _progress_bars(progress):
        out = rows.map(encode, batched=True, batch_size=MAP_BATCH_SIZE, remove_columns=rows.column_names,
                       features=_features(), num_proc=_num_proc(len(rows)), keep_in_memory=True,
                       load_from_cache_file=False, new_fingerprint=fingerprint.hexdigest()[:40],
                       desc=f"Tokenizing {Path(where).name}")
    column = {name: out.data.column(name).to_pylist() for name in ("_error", "_fatal", "_truncated", "_learned",
                                                                    "_chat")}
    errors = [(i, message) for i, message in enumerate(column["_error"]) if message]
    fatal = next(((i, m) for i, m in errors if column["_fatal"][i]), None)
    if fatal is not None:
        raise InputError(f"{where}: row {fatal[0] + 1}: {fatal[1]}")
    if errors:
        messages = [f"{where}: row {i + 1}: {message}" for i, message in errors[:MAX_ROW_ERRORS]]
        if len(errors) > MAX_ROW_ERRORS:
            messages.append(f"{where}: ... and {len(errors) - MAX_ROW_ERRORS} more bad rows")
        raise InputError(messages)
    keep = [i for i, learned in enumerate(column["_learned"]) if learned]
    truncated = sum(column["_truncated"])
    used_chat = any(column["_chat"])
    out = out.select_columns(["input_ids", "attention_mask", "labels"])
    if len(keep) < len(out):
        out = _select(out, keep)
    return out, (truncated, len(column["_learned"]) - len(keep), used_chat)


def _num_proc(rows: int) -> int | None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if rows < NUM_PROC_MIN_ROWS or cores < 2:
        return None
    return min(cores, MAX_NUM_PROC, rows // (NUM_PROC_MIN_ROWS // 2))


def _where(path: str) -> str:
    return display_path(Path(path)) if Path(path).is_absolute() else path

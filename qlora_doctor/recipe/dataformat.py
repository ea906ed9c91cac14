"""A local data file's format, told from its first rows: which `dataset.format` reads it and with which
`*_field` keys, for `qlora-doctor init`.

    sample = sample_rows(Path("train.jsonl"))         # the first rows, and how many there are
    detected = detect_format(sample.rows, "train.jsonl")
    detected.format, dict(detected.fields)          # "alpaca", {"instruction_field": "question", ...}

The shape of a column decides list formats (a list of {role, content} is chat, a list of {from, value} is
ShareGPT) whatever its name; column names (dataformats.toml, with sources) map flat files onto the
recipe's keys. In this order: TRL's prompt/completion pair, chat, ShareGPT, alpaca (an instruction-like and
an answer-like column), another prompt/completion-like pair, plain text. A file none of these reads is an
error naming its columns.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import InputError
from qlora_doctor.recipe.schema import SHAREGPT_ROLES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SAMPLE_ROWS = 200
"""Rows read to detect the format and measure lengths: enough to see every column, never the whole file."""
COUNT_LIMIT_BYTES = 1 << 30
"""Rows are counted in text files up to this size (a parquet file's count is in its footer, any size)."""
READABLE = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Sample:
    """The first rows of a data file."""

    path: Path
    rows: tuple[dict[str, Any], ...]
    total_rows: int | None
    """Rows in the whole file; None when not counted (a text file over COUNT_LIMIT_BYTES)."""


@dataclass(frozen=True)
class DetectedFormat:
    """How a recipe reads the file."""

    format: str
    """A `dataset.format` value."""
    fields: tuple[tuple[str, str], ...]
    """(recipe key, column) pairs, e.g. (("instruction_field", "question"), ("output_field", "answer"))."""
    columns: tuple[str, ...]
    """Every column of the sampled rows, in order of appearance."""
    reason: str
    """What decided it, in words (for the starter recipe's comment)."""
    roles: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """ShareGPT: `dataset.roles` entries for speakers the defaults do not name (role, names)."""


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, Any]:
    text = resources.files("qlora_doctor.recipe").joinpath("dataformats.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def field_names() -> dict[str, tuple[str, ...]]:
    """dataformats.toml: recipe key -> column names it recognises, most usual first."""
    return {row["key"]: tuple(row["names"]) for row in _table()["field"]}


def speaker_names() -> dict[str, tuple[str, ...]]:
    """dataformats.toml [[speaker]]: role -> speaker names beyond the recipe's defaults."""
    return {row["role"]: tuple(row["names"]) for row in _table().get("speaker", [])}


def sharegpt_roles(speakers: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The `roles:` a ShareGPT file needs beyond SHAREGPT_ROLES (each role keeps its default names too);
    InputError naming any speaker no table knows, with the `roles:` fix."""
    known = {name for names in SHAREGPT_ROLES.values() for name in names}
    extra: dict[str, list[str]] = {}
    unknown = []
    for speaker in speakers:
        if speaker in known:
            continue
        role = next((r for r, names in speaker_names().items() if speaker.lower() in names), None)
        if role is None:
            unknown.append(speaker)
        else:
            extra.setdefault(role, []).append(speaker)
    if unknown:
        raise InputError(f"--data: the turns name speaker(s) {', '.join(map(repr, unknown))} that init cannot "
                         "map to a role; write the recipe's `roles:`, e.g. `roles: {assistant: [gpt, "
                         f"{unknown[0]}]}}` (roles: {', '.join(SHAREGPT_ROLES)})")
    return tuple((role, (*SHAREGPT_ROLES[role], *names)) for role, names in extra.items())


# --- reading ---------------------------------------------------------------------------------------

def sample_rows(path: Path, limit: int = SAMPLE_ROWS) -> Sample:
    """The first `limit` rows of a .jsonl/.json/.csv/.parquet file (and the row count); InputError naming the
    file (and the line) when it is missing, of another type, not parseable, or holds no rows."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--data: {path}: no such file; give a local .jsonl, .json, .csv or .parquet file")
    if path.is_dir():
        raise InputError(f"--data: {path} is a folder; name one data file ({', '.join(READABLE)})")
    suffix = path.suffix.lower()
    if suffix not in READABLE:
        raise InputError(f"--data: {path}: unsupported file type {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(READABLE)}")
    try:
        rows, total = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}[suffix](path, limit)
    except UnicodeDecodeError as err:
        raise InputError(f"--data: {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"--data: {path}: cannot be read ({err.strerror or err})") from None
    if not rows:
        raise InputError(f"--data: {path}: holds no rows; a data file needs at least one example")
    bad = next((i for i, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise InputError(f"--data: {path}: row {bad} is {type(rows[bad - 1]).__name__}, not an object with named "
                         "columns; each row must be like {\"text\": ...} or {\"messages\": [...]}")
    return Sample(path=path, rows=tuple(rows), total_rows=total)


def _jsonl(path: Path, limit: int) -> tuple[list[Any], int | None]:
    rows: list[Any] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(rows) >= limit:
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"--data: {path}: line {number} is not JSON ({err.msg}, column {err.colno}); "
                                 "a .jsonl file holds one JSON object per line") from None
    total = None
    if path.stat().st_size <= COUNT_LIMIT_BYTES:
        with path.open("rb") as f:
            total = sum(1 for line in f if line.strip())
    return rows, total


def _json(path: Path, limit: int) -> tuple[list[Any], int | None]:
    if path.stat().st_size > COUNT_LIMIT_BYTES:
        raise InputError(f"--data: {path}: a .json file over {COUNT_LIMIT_BYTES >> 30} GiB must be read whole; "
                         "convert it to .jsonl (one row per line) or .parquet")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON lines in a .json file, which `datasets` reads too
            return _jsonl(path, limit)
        raise InputError(f"--data: {path}: not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(data, list):
        keys = ", ".join(list(data)[:5]) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"--data: {path}: the top level is not a list of rows (it holds {keys}); save the rows "
                         "as a JSON list, or one per line as .jsonl")
    return data[:limit], len(data)


def _csv(path: Path, limit: int) -> tuple[list[Any], int | None]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = [row for _, row in zip(range(limit), csv.DictReader(f))]
        total = None
        if path.stat().st_size <= COUNT_LIMIT_BYTES:
            with path.open(encoding="utf-8", newline="") as f:
                total = sum(1 for _ in csv.DictReader(f))
    except csv.Error as err:
        raise InputError(f"--data: {path}: not a readable CSV file ({err})") from None
    return rows, total


def _parquet(path: Path, limit: int) -> tuple[list[Any], int | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"--data: {path}: reading parquet needs pyarrow (`pip install pyarrow`, which `datasets` "
                         "brings)") from None
    try:
        file = pq.ParquetFile(path)
        batch = next(file.iter_batches(batch_size=limit), None)
    except Exception as err:  # noqa: BLE001 - pyarrow's ArrowInvalid & co.: the file is not parquet
        raise InputError(f"--data: {path}: not a readable parquet file ({str(err).splitlines()[0][:200]})") from None
    return (batch.to_pylist() if batch is not None else []), file.metadata.num_rows


# --- detecting -------------------------------------------------------------------------------------

def _kind(rows: tuple[dict[str, Any], ...], column: str) -> str:
    """`chat` (lists of {role, ...}), `sharegpt` (lists of {from, value}), `string`, or `other`, judged on
    every sampled value that is present and not null."""
    values = [row[column] for row in rows if row.get(column) is not None]
    if not values:
        return "other"
    if all(isinstance(v, str) for v in values):
        return "string"
    if all(isinstance(v, list) and v and all(isinstance(t, dict) for t in v) for v in values):
        turns = [t for v in values for t in v]
        if all("role" in t for t in turns):
            return "chat"
        if all("from" in t and "value" in t for t in turns):
            return "sharegpt"
    return "other"


def detect_format(rows: tuple[dict[str, Any], ...] | list[dict[str, Any]], where: str) -> DetectedFormat:
    """The format and field keys that read `rows` (module docstring for the order); InputError naming the
    columns when none does."""
    rows = tuple(rows)
    columns = tuple(dict.fromkeys(name for row in rows for name in row))
    kinds = {c: _kind(rows, c) for c in columns}
    names = field_names()

    def pick(key: str, *accepted: str, exclude: tuple[str, ...] = ()) -> str | None:
        """The first column, in the table's order for `key`, whose kind is accepted."""
        return next((c for c in names[key] if c in kinds and kinds[c] in accepted and c not in exclude), None)

    def result(fmt: str, fields: dict[str, str], reason: str) -> DetectedFormat:
        return DetectedFormat(format=fmt, fields=tuple(fields.items()), columns=columns, reason=reason)

    if kinds.get("prompt") in ("string", "chat") and kinds.get("completion") in ("string", "chat"):
        return result("prompt_completion", {"prompt_field": "prompt", "completion_field": "completion"},
                      "columns prompt and completion (TRL's prompt-completion)")
    chat = pick("messages_field", "chat") or next((c for c in columns if kinds[c] == "chat"), None)
    if chat is not None:
        return result("chat", {"messages_field": chat}, f"column {chat}: lists of {{role, content}} messages")
    sharegpt = pick("conversations_field", "sharegpt") or next((c for c in columns if kinds[c] == "sharegpt"), None)
    if sharegpt is not None:
        speakers = sorted({str(t["from"]) for row in rows for t in (row.get(sharegpt) or [])})
        detected = result("sharegpt", {"conversations_field": sharegpt},
                          f"column {sharegpt}: lists of {{from, value}} turns (speakers {', '.join(speakers)})")
        return replace(detected, roles=sharegpt_roles(speakers))
    instruction = pick("instruction_field", "string")
    output = pick("output_field", "string", exclude=(instruction,) if instruction else ())
    if instruction and output:
        fields = {"instruction_field": instruction, "output_field": output}
        context = pick("input_field", "string", exclude=(instruction, output))
        if context:
            fields = {"instruction_field": instruction, "input_field": context, "output_field": output}
        return result("alpaca", fields, f"columns {', '.join(fields.values())} (instruction, "
                      f"{'input, ' if context else ''}output)")
    prompt = pick("prompt_field", "string", "chat")
    completion = pick("completion_field", "string", "chat", exclude=(prompt,) if prompt else ())
    if prompt and completion:
        return result("prompt_completion", {"prompt_field": prompt, "completion_field": completion},
                      f"columns {prompt} and {completion} (a prompt and its completion)")
    text = pick("text_field", "string")
    strings = [c for c in columns if kinds[c] == "string"]
    if text is None and len(strings) == 1:
        text = strings[0]
    if text is not None:
        return result("text", {"text_field": text}, f"column {text}: plain text, all of it learned")
    described = ", ".join(f"{c} ({kinds[c]})" for c in columns) or "none"
    raise InputError(f"--data: {where}: cannot tell its format from its columns: {described}. Recognised: "
                     "a list of {role, content} messages (chat), of {from, value} turns (sharegpt), "
                     "instruction/output columns (alpaca, also question/answer), prompt/completion columns, or "
                     "one text column; rename the columns, or write the recipe's dataset section by hand "
                     "(`qlora-doctor schema`)")


def row_text(row: dict[str, Any], fields: tuple[tuple[str, str], ...]) -> str:
    """The text of one row in the detected columns (messages' contents joined), to measure its length."""
    parts: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    add(item.get("content", item.get("value")))
                else:
                    add(item)

    for _, column in fields:
        add(row.get(column))
    return "\n".join(parts)

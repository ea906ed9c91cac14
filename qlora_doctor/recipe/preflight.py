"""What a recipe needs that no schema can see, checked before anything is loaded (`validate`, `check
--recipe`, `run`): the data file's first rows have the fields the recipe names, the logging integrations
in `training.report_to` are installed, and (with `hub=True`) a hub model is cached or reachable within a
bounded time. Each problem names the file, the key and the value to set; none is a traceback.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_doctor.recipe.schema import display_path

if TYPE_CHECKING:
    from qlora_doctor.recipe.schema import DatasetSection, Recipe

ROWS = 20
"""Rows read from the data file: enough to catch a wrong field name, never the whole file."""
HUB_TIMEOUT_S = 10.0
FIELD_SYNONYMS = {
    "text_field": ("text", "content", "document", "sentence", "body"),
    "instruction_field": ("instruction", "prompt", "question", "query", "input_text"),
    "input_field": ("input", "context", "history"),
    "output_field": ("output", "response", "completion", "answer", "target", "chosen"),
    "messages_field": ("messages", "conversations", "conversation", "chat", "dialog"),
    "conversations_field": ("conversations", "conversation", "messages", "dialog", "chat"),
    "prompt_field": ("prompt", "instruction", "question", "query", "input"),
    "completion_field": ("completion", "response", "output", "answer", "chosen"),
}


def preflight_problems(recipe: Recipe, where: str, hub: bool = False) -> list[str]:
    """Every problem found, each a full message (file, key, fix); empty when the recipe can start."""
    problems = []
    for key, section in zip(recipe.data_keys, recipe.data_sections):
        problems += data_problems(section, where, section.path, key=key)
        if section.eval_path:
            problems += data_problems(section, where, section.eval_path, key=key)
    problems += integration_problems(recipe, where)
    if hub:
        problems += hub_model_problems(recipe, where)
    return problems


def first_rows(path: str, limit: int = ROWS) -> list[dict[str, Any]] | None:
    """The first rows of a local .jsonl/.json/.csv file as dicts; None for what this does not read
    (parquet, hub datasets) or cannot read (the data pipeline reports those with the line)."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        if file.suffix == ".jsonl":
            rows = []
            with file.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        rows.append(json.loads(line))
                    if len(rows) >= limit:
                        break
            return [r for r in rows if isinstance(r, dict)]
        if file.suffix == ".json":
            if file.stat().st_size > 50_000_000:
                return None
            data = json.loads(file.read_text(encoding="utf-8"))
            return [r for r in (data if isinstance(data, list) else [])[:limit] if isinstance(r, dict)]
        if file.suffix == ".csv":
            with file.open(encoding="utf-8", newline="") as f:
                return [row for _, row in zip(range(limit), csv.DictReader(f))]
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _needed_fields(section: DatasetSection) -> list[tuple[str, str, bool]]:
    """(recipe key, field name, required) for the section's format."""
    if section.format == "text":
        return [("text_field", section.text_field, True)]
    if section.format == "alpaca":
        return [("instruction_field", section.instruction_field, True), ("input_field", section.input_field, False),
                ("output_field", section.output_field, True)]
    if section.format == "sharegpt":
        return [("conversations_field", section.conversations_field, True)]
    if section.format == "prompt_completion":
        return [("prompt_field", section.prompt_field, True), ("completion_field", section.completion_field, True)]
    return [("messages_field", section.messages_field, True)]


def data_problems(section: DatasetSection, where: str, path: str, key: str = "dataset") -> list[str]:
    """The fields `section` reads that the first rows of `path` lack, and (sharegpt) speakers no role maps;
    `key` is the section's recipe key (`dataset`, `datasets[1]`)."""
    rows = first_rows(path)
    if not rows:
        return []
    present = sorted({name for row in rows for name in row})
    problems = []
    for recipe_key, name, required in _needed_fields(section):
        if not required or any(name in row for row in rows):
            continue
        guess = next((g for g in FIELD_SYNONYMS[recipe_key] if g in present and g != name), None)
        fix = (f"set `{key}.{recipe_key}: {guess}`" if guess else
               f"set `{key}.{recipe_key}` to the column that holds it")
        if recipe_key == "messages_field" and guess and _first_turn_has(rows, guess, "from"):
            fix = f"these are ShareGPT turns ({{from, value}}): set `{key}.format: sharegpt`"
            if guess != "conversations":
                fix += f" and `{key}.conversations_field: {guess}`"
        problems.append(f"{where}: {key}.{recipe_key}: {name!r} is not a field of {display_path(Path(path))} (its "
                        f"first rows have: {', '.join(present) or 'no fields'}); {fix}")
    if section.format == "sharegpt" and not problems:
        problems += _sharegpt_problems(section, rows, where, path, key)
    return problems


def _first_turn_has(rows: list[dict[str, Any]], field: str, name: str) -> bool:
    value = rows[0].get(field)
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and name in value[0]


def _sharegpt_problems(section: DatasetSection, rows: list[dict[str, Any]], where: str, path: str,
                       key: str) -> list[str]:
    from qlora_doctor.recipe.schema import sharegpt_role_names

    field, shown = section.conversations_field, display_path(Path(path))
    if _first_turn_has(rows, field, "role") and not _first_turn_has(rows, field, section.role_key):
        return [f"{where}: {key}.format: sharegpt, but the turns of {shown} are {{role, content}} messages; set "
                f"`{key}.format: chat` and `{key}.messages_field: {field}`"]
    known = {name for names in sharegpt_role_names(section.roles).values() for name in names}
    unknown = sorted({turn.get(section.role_key) for row in rows for turn in (row.get(field) or [])
                      if isinstance(turn, dict) and isinstance(turn.get(section.role_key), str)} - known)
    if not unknown:
        return []
    return [f"{where}: {key}.roles: the turns of {shown} have speaker(s) {', '.join(map(repr, unknown))} that no "
            f"role lists (known: {', '.join(sorted(known))}); map each, e.g. `roles: {{assistant: [gpt, "
            f"{unknown[0]}]}}` (roles: user, assistant, system, tool, tool_call)"]


def integration_problems(recipe: Recipe, where: str) -> list[str]:
    """One problem per report_to integration that is not installed (recipe/integrations.toml says which
    packages provide each); the fix installs all the missing ones at once, or drops them from the list."""
    from qlora_doctor.recipe.integrations import integrations

    table = integrations()
    targets = recipe.training.report_targets
    missing = [table[t] for t in targets if t in table and not table[t].installed()]
    if not missing:
        return []
    install = f"`pip install {' '.join(i.pip for i in missing)}`"
    kept = [t for t in targets if t not in {i.name for i in missing}]
    instead = (f"`training.report_to: [{', '.join(kept)}]`" if len(kept) > 1 else
               f"`training.report_to: {kept[0] if kept else 'none'}`")
    return [f"{where}: training.report_to: {i.name} is not installed (the Trainer would stop when it starts "
            f"logging); {install}, or set {instead}" for i in missing]


def hub_model_problems(recipe: Recipe, where: str) -> list[str]:
    """A hub model id that is neither in the local Hugging Face cache nor reachable in HUB_TIMEOUT_S."""
    from qlora_doctor.recipe.builtin import is_builtin

    name = recipe.model.name_or_path
    if is_builtin(name) or os.path.isdir(name) or os.path.isabs(name):
        return []
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    cached = try_to_load_from_cache(name, "config.json", revision=recipe.model.revision)
    if isinstance(cached, str):
        return []
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return [f"{where}: model.name_or_path: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                "is set; download it first (`huggingface-cli download " + name + "`) or point "
                "model.name_or_path at a local folder"]
    reason = hub_unreachable(name, recipe.model.revision)
    if reason is None:
        return []
    return [f"{where}: model.name_or_path: {name} is not in the local Hugging Face cache and the hub did not answer "
            f"within {HUB_TIMEOUT_S:g} s ({reason}); check the network (or HF_ENDPOINT), log in for a gated model "
            "(`huggingface-cli login`), or point model.name_or_path at a local folder"]


def hub_unreachable(name: str, revision: str | None) -> str | None:
    """None when the hub answers for `name`'s config.json; else why not, in a few words (bounded time)."""
    import concurrent.futures

    def ask() -> None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=HUB_TIMEOUT_S)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(ask).result(timeout=HUB_TIMEOUT_S + 1)
    except concurrent.futures.TimeoutError:
        return "timed out"
    except Exception as err:  # noqa: BLE001 - any failure to reach it is the answer
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        pool.shutdown(wait=False)
    return None

"""What a recipe needs that no schema can see, checked before anything is loaded (`validate`, `check
--recipe`, `run`): the data file's first rows have the fields the recipe names, the logging integrations
in `training.report_to` are installed, and (with `hub=True`) a hub model is cached or reachable within a
bounded time. Each problem names the file, the key and the value to set; none is a traceback.
"""

from __future__ import annotations

import csv
import importlib.util
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
INTEGRATIONS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                "trackio": ("trackio",)}
"""transformers' report_to names -> the importable packages that provide each (any one suffices)."""
FIELD_SYNONYMS = {
    "text_field": ("text", "content", "document", "sentence", "body"),
    "instruction_field": ("instruction", "prompt", "question", "query", "input_text"),
    "input_field": ("input", "context", "history"),
    "output_field": ("output", "response", "completion", "answer", "target", "chosen"),
    "messages_field": ("messages", "conversations", "conversation", "chat", "dialog"),
}


def preflight_problems(recipe: Recipe, where: str, hub: bool = False) -> list[str]:
    """Every problem found, each a full message (file, key, fix); empty when the recipe can start."""
    problems = data_problems(recipe.dataset, where, "dataset.path", recipe.dataset.path)
    if recipe.dataset.eval_path:
        problems += data_problems(recipe.dataset, where, "dataset.eval_path", recipe.dataset.eval_path)
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
    return [("messages_field", section.messages_field, True)]


def data_problems(section: DatasetSection, where: str, key: str, path: str) -> list[str]:
    rows = first_rows(path)
    if not rows:
        return []
    present = sorted({name for row in rows for name in row})
    problems = []
    for recipe_key, name, required in _needed_fields(section):
        if not required or any(name in row for row in rows):
            continue
        guess = next((g for g in FIELD_SYNONYMS[recipe_key] if g in present and g != name), None)
        fix = (f"set `dataset.{recipe_key}: {guess}`" if guess else
               f"set `dataset.{recipe_key}` to the column that holds it")
        if recipe_key == "messages_field" and guess in ("conversations", "conversation") and rows and \
                isinstance(rows[0].get(guess), list) and rows[0][guess] and isinstance(rows[0][guess][0], dict) and \
                "from" in rows[0][guess][0]:
            fix += " (these are ShareGPT turns, {from, value}: convert them to {role, content} messages)"
        problems.append(f"{where}: dataset.{recipe_key}: {name!r} is not a field of {display_path(Path(path))} (its first "
                        f"rows have: {', '.join(present) or 'no fields'}); {fix}")
    return problems


def integration_problems(recipe: Recipe, where: str) -> list[str]:
    wanted = recipe.training.report_to
    targets = [wanted] if isinstance(wanted, str) else list(wanted)
    problems = []
    for target in targets:
        modules = INTEGRATIONS.get(target)
        if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
            problems.append(f"{where}: training.report_to: {target} is not installed (the Trainer would stop "
                            f"when it starts logging); `pip install {modules[0]}`, or set "
                            "`training.report_to: none`")
    return problems


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
    reason = _hub_unreachable(name, recipe.model.revision)
    if reason is None:
        return []
    return [f"{where}: model.name_or_path: {name} is not in the local Hugging Face cache and the hub did not answer "
            f"within {HUB_TIMEOUT_S:g} s ({reason}); check the network (or HF_ENDPOINT), log in for a gated model "
            "(`huggingface-cli login`), or point model.name_or_path at a local folder"]


def _hub_unreachable(name: str, revision: str | None) -> str | None:
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

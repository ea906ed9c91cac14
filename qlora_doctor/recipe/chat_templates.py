"""The chat templates a recipe can name in `model.chat_template:`, read from chat_templates.toml (each
with its sources), and the resolution of that key: a name from the table, or a `.jinja` file.

    template = resolve_chat_template(recipe.model.chat_template)   # None, or the Jinja text
    tokenizer.chat_template = template
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qlora_doctor.core.errors import InputError

TEMPLATES_FILE = Path(__file__).resolve().parent / "chat_templates.toml"
TEMPLATE_SUFFIX = ".jinja"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    description: str
    text: str
    """The Jinja source, as transformers' `tokenizer.chat_template` takes it."""
    tokens: tuple[str, ...]
    """Special tokens the template writes."""
    tools: bool
    """Whether it renders assistant tool calls and tool turns."""
    sources: tuple[str, ...]


@lru_cache(maxsize=1)
def named_templates() -> dict[str, ChatTemplate]:
    """The shipped table, by name."""
    import tomllib

    data = tomllib.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))
    return {row["name"]: ChatTemplate(name=row["name"], description=row["description"], text=row["text"],
                                      tokens=tuple(row["tokens"]), tools=bool(row["tools"]),
                                      sources=tuple(row["sources"]))
            for row in data["template"]}


def is_template_file(value: str) -> bool:
    return value.lower().endswith(TEMPLATE_SUFFIX)


def resolve_chat_template(value: str | None) -> str | None:
    """The Jinja text for `model.chat_template` (validated: a known name, or an absolute .jinja path)."""
    if value is None:
        return None
    if value in named_templates():
        return named_templates()[value].text
    try:
        text = Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"model.chat_template: cannot read {value} ({err}); fix the path or use one of "
                         f"{', '.join(named_templates())}") from None
    if not text.strip():
        raise InputError(f"model.chat_template: {value} is empty; write the Jinja template into it")
    return text

"""A starter recipe as commented YAML: the values `qlora-doctor init` chose (memory/starter.py decides them),
each with the reason on its line, rendered so that the text loads back to exactly those values.

    text = render_starter(header_lines, sections)      # what `init` prints or writes
    recipe_from_dict(yaml.safe_load(text))            # the same values, validated
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COMMENT_COLUMN = 48
"""Comments after a value start at this column (as in the shipped recipes), or one space after a long value."""


@dataclass(frozen=True)
class Entry:
    """One `key: value` line, and why."""

    key: str
    value: Any
    comment: str = ""


@dataclass(frozen=True)
class Block:
    """One recipe section (`model:`, `training:`, ...) with a comment above it."""

    name: str
    entries: tuple[Entry, ...]
    comment: tuple[str, ...] = ()


def yaml_scalar(value: Any) -> str:
    """`value` as one line of YAML flow style that reads back to the same value."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").rstrip()


def render_starter(header: list[str], blocks: list[Block]) -> str:
    """The recipe text: the header as comment lines, then each section, comments aligned."""
    lines = [f"# {line}".rstrip() for line in header]
    for block in blocks:
        lines.append("")
        lines += [f"# {line}".rstrip() for line in block.comment]
        lines.append(f"{block.name}:")
        for entry in block.entries:
            text = f"  {entry.key}: {yaml_scalar(entry.value)}"
            if entry.comment:
                text = f"{text.ljust(COMMENT_COLUMN - 1)} # {entry.comment}"
            lines.append(text)
    return "\n".join(lines) + "\n"


def blocks_as_dict(blocks: list[Block]) -> dict[str, dict[str, Any]]:
    """The values of `blocks` as the mapping the recipe loader reads (what the rendered text parses to)."""
    return {block.name: {entry.key: entry.value for entry in block.entries} for block in blocks}

"""Reading a recipe's YAML: safe loading, numbers like `2e-4` read as numbers (YAML 1.1 would make
that a string), duplicate keys refused, and every unreadable file an InputError naming the file and,
for syntax errors, the line.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from qlora_doctor.core.errors import InputError

MAX_FLOW_NESTING = 64
"""Deepest `[`/`{` nesting a recipe may have (reliability: keeps the YAML scanner linear)."""


@functools.lru_cache(maxsize=1)
def recipe_loader() -> type:
    """The loader class, built on first use so that importing this module does not import yaml."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        """SafeLoader that reads `2e-4` as a number (YAML 1.1 wants `2.0e-4`) and refuses duplicate keys."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it below, with its line
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first}); keep one of them",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

        def fetch_flow_collection_start(self, TokenClass: Any) -> None:
            # PyYAML's scanner is quadratic in `[`/`{` nesting (5000 `[` take seconds, a megabyte
            # would hang), and no recipe nests more than a few levels: refuse early, with the line.
            if self.flow_level >= MAX_FLOW_NESTING:
                raise yaml.scanner.ScannerError(
                    None, None, f"more than {MAX_FLOW_NESTING} nested [ ] or {{ }}; a recipe nests 2 or 3",
                    self.get_mark())
            super().fetch_flow_collection_start(TokenClass)

    float_re = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                              |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                              |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                              |[-+]?\.(?:inf|Inf|INF)
                              |\.(?:nan|NaN|NAN))$""", re.X)
    RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in "-+0123456789.":
        RecipeLoader.yaml_implicit_resolvers[first] = [
            (tag, regexp) for tag, regexp in RecipeLoader.yaml_implicit_resolvers.get(first, [])
            if tag != "tag:yaml.org,2002:float"]
        RecipeLoader.yaml_implicit_resolvers[first].append(("tag:yaml.org,2002:float", float_re))
    return RecipeLoader


def read_recipe_yaml(path: Path, where: str) -> Any:
    """The parsed YAML of a recipe file; InputError naming the file (and the line) for anything unreadable."""
    import yaml

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"{where}: cannot read the recipe ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{where}: not a UTF-8 text file (byte {err.start}); a recipe is YAML text, "
                         "see recipes/demo.yaml") from None
    if "\x00" in text:
        raise InputError(f"{where}: contains NUL bytes, so it is not a YAML text file; see recipes/demo.yaml")
    try:
        return yaml.load(text, Loader=recipe_loader())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{where}{line}: not valid YAML: {yaml_problem(err)}") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a recipe") from None


def yaml_problem(err: Exception) -> str:
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    context_mark, problem_mark = getattr(err, "context_mark", None), getattr(err, "problem_mark", None)
    if context and context_mark is not None and problem_mark is not None and context_mark.line != problem_mark.line:
        context += f" that starts on line {context_mark.line + 1}"
    if problem:
        return f"{problem}{' (' + context + ')' if context else ''}"
    return str(err).splitlines()[0]




def parse_yaml_value(text: str) -> Any:
    """One value as YAML (for `--set key=value`); raises yaml.YAMLError."""
    import yaml

    return yaml.load(text, Loader=recipe_loader()) if text.strip() else None

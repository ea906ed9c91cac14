"""pydantic's validation errors as the messages a recipe's author needs: the dotted key, what is
wrong with the value they wrote, and the fix (`lora.r: must be > 0, got 0`,
`lora.lora_alpah: unknown key 'lora_alpah' (did you mean 'lora_alpha'?)`).

Model: torchtune's `config/_validate.py`; messages are grouped per key so that a union such as
`auto|true|false` gives one line (`expected one of auto, true, false, got 'yes please'`).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import BaseModel

CROSS_FIELD_MARK = "\x1f"  # separates several cross-field problems raised by one validator


def format_validation_errors(err: Any, model: type[BaseModel]) -> list[str]:
    """pydantic's errors as `section.key: what is wrong, and the fix`, one line each, in file order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        path, field_type = _field_path(model, e["loc"])
        e["_field_type"] = field_type
        grouped.setdefault(path, []).append(e)
    messages: list[str] = []
    for path, errors in grouped.items():
        first = errors[0]
        if first["type"] == "value_error" and CROSS_FIELD_MARK in first["msg"]:
            messages.extend(m for m in first["msg"].split(CROSS_FIELD_MARK)[1:])
            continue
        if len(errors) > 1:  # a union (e.g. `auto|true|false`): say what it accepts
            messages.append(f"{path}: expected {_describe(first['_field_type'])}, got {_show(first['input'])}")
            continue
        messages.append(f"{path}: {_message(first, path, model)}" if path else _message(first, path, model))
    return messages


def _field_path(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, Any]:
    """Dotted key path from a pydantic `loc`, skipping union-member tags; plus the field's type."""
    path = ""
    current: Any = model
    field_type: Any = None
    list_of_sections = False
    for part in loc:
        if isinstance(part, int) and list_of_sections:  # an item of a list of sections (`datasets[1]`)
            path = f"{path}[{part}]"
            list_of_sections = False
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            field_type = current.model_fields[part].annotation
            path = f"{path}.{part}" if path else str(part)
            current = _unwrap_model(field_type)
            list_of_sections = _is_list_of_sections(field_type)
        elif isinstance(current, type) and issubclass(current, BaseModel):
            # An unknown key (maybe a number: `1: 2`); quoted when it is not a plain word, so that
            # `"\n"` or `" "` stay visible and every message stays one line.
            key = str(part) if re.fullmatch(r"[\w-]+", str(part)) else repr(str(part))
            path = f"{path}.{key}" if path else key
            break
        elif isinstance(part, int):
            path = f"{path}[{part}]"
        else:
            break  # a union member tag such as `literal['auto']` or `list[str]`
    return path, field_type


def _is_list_of_sections(annotation: Any) -> bool:
    import typing

    return any(typing.get_origin(arg) is list and _unwrap_model(arg) is not arg
               for arg in (typing.get_args(annotation) or (annotation,)))


def _unwrap_model(annotation: Any) -> Any:
    import typing

    for arg in (typing.get_args(annotation) or (annotation,)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is list:  # `list[Section] | None`: the section of each item
            inner = _unwrap_model(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _message(e: dict[str, Any], path: str, model: type[BaseModel]) -> str:
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a key that is not a string, like `1: 2`
        parent = _parent_model(model, path)
        key = str(e["loc"][-1]) if e.get("loc") else path.rsplit(".", 1)[-1]
        options = list(parent.model_fields) if parent is not None else []
        hint = did_you_mean(key, options) or f" (expected one of {', '.join(options)})"
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return "missing (required)"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
        return f"must be {op} {shown}, got {_show(value)}"
    if kind == "literal_error":
        options = [str(o).strip("'") for o in re.findall(r"'[^']*'|True|False", ctx.get("expected", ""))]
        return f"{_show(value)} is not one of {', '.join(options)}{did_you_mean(str(value), options)}"
    if kind == "string_too_short":
        return "is empty"
    if kind == "value_error":
        return str(e["msg"]).removeprefix("Value error, ")
    if kind in ("finite_number",):
        return f"must be a finite number, got {_show(value)}"
    if kind == "model_type" or kind == "dict_type":
        return f"expected a mapping of keys under it, got {describe_value(value)}"
    return f"expected {_describe(e.get('_field_type'))}, got {_show(value)}"


def _parent_model(model: type[BaseModel], path: str) -> type[BaseModel] | None:
    current: Any = model
    for part in path.split(".")[:-1]:
        part = part.split("[")[0]
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _unwrap_model(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _describe(annotation: Any) -> str:
    """`int | None` -> `a whole number or null`, for "expected ..." messages."""
    import types
    import typing

    if annotation is None or annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join("true" if a is True else "false" if a is False else str(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        annotation, str(annotation))


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (dict, list)):
        return describe_value(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_value(value: Any) -> str:
    """`a list`, `a mapping`, `int 5`: what the user wrote, for `got ...`."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {_show(value)}"


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        hint = did_you_mean(value, known) or f"; known: {', '.join(known)}"
        raise ValueError(f"{value!r} is not a transformers {what}{hint}")
    return value

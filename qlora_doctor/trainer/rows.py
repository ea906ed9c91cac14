"""One data row -> text segments, each learned or not: the five `dataset.format`s.

  text               the `text_field`, then EOS; all of it is learned.
  alpaca             instruction (+ input) as the user's turn and output as the answer, through the chat
                     template when the tokenizer has one, else the Alpaca prompt; only the answer is learned.
  chat               a list of {role, content} messages (OpenAI / TRL "conversational"): assistant turns
                     (with their end-of-turn marker) are learned. Assistant `tool_calls`, tool turns'
                     `name`/`tool_call_id` and the row's `tools` go to the chat template as they are.
  sharegpt           a list of {from, value} turns, speakers mapped to roles by `dataset.roles`; a
                     `function_call` turn (LLaMA-Factory) becomes an assistant tool call. Then as chat.
  prompt_completion  TRL's format: text prompt + text completion (BOS, prompt, completion, EOS; the
                     completion learned), or prompt and completion as message lists through the chat
                     template (only the completion's assistant turns learned).

The Arrow tables behind `datasets` give every row every key seen anywhere in the file (as null): keys
whose value is null are dropped from messages, tool calls' `arguments` and `tools` before rendering, so a
row renders as it was written (a null written on purpose is dropped too). `arguments` given as JSON text
(the OpenAI wire format) are parsed, since chat templates write them with `tojson`.

A bad row raises ValueError naming the field; a chat template that cannot render the data at all (it
drops tool calls, or there is none) raises TemplateError, reported once rather than for every row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qlora_doctor.recipe.schema import DatasetSection, sharegpt_role_names

CHAT_ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                            "provides further context. Write a response that appropriately completes the "
                            "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
"""The prompt of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py), for tokenizers
without a chat template."""

TEMPLATE_FIX = ("set `model.chat_template:` to a named template (chatml, llama-3, alpaca, qwen2.5) or a "
                ".jinja file")


class TemplateError(ValueError):
    """The chat template cannot render this data (none, or it drops tool calls): one message, not one a row."""


@dataclass(frozen=True)
class Segment:
    """A piece of one rendered example."""

    text: str
    learned: bool
    """True when the loss is computed on these tokens."""


@dataclass(frozen=True)
class Rendered:
    segments: list[Segment]
    chat: bool
    """Rendered by the chat template, whose text carries its own special tokens (no BOS/EOS added)."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_row(row: dict[str, Any], section: DatasetSection, tokenizer: Any) -> Rendered:
    """One row as text segments, learned or not. Raises ValueError naming the field when the row is bad."""
    fmt = section.format
    if fmt == "text":
        return Rendered([Segment(field_text(row, section.text_field), True)], chat=False)
    if fmt == "alpaca":
        return _alpaca(row, section, tokenizer)
    if fmt == "prompt_completion":
        return _prompt_completion(row, section, tokenizer)
    if fmt == "sharegpt":
        messages = sharegpt_messages(row, section)
        field = section.conversations_field
    else:
        messages = chat_messages(row, section.messages_field)
        field = section.messages_field
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"field {field!r}: no assistant message, so there is no answer to learn")
    return Rendered(chat_segments(messages, tokenizer, tools=row_tools(row, section.tools_field)), chat=True)


def field_text(row: dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise ValueError(f"field {field!r} is missing (fields present: {_present(row)}); fix the row or set the "
                         "dataset's *_field keys to the file's column names")
    if not isinstance(value, str):
        raise ValueError(f"field {field!r}: expected text, got {type(value).__name__}")
    return value


def _present(row: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"


def _alpaca(row: dict[str, Any], section: DatasetSection, tokenizer: Any) -> Rendered:
    instruction = field_text(row, section.instruction_field)
    extra = row.get(section.input_field)
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"field {section.input_field!r}: expected text or nothing, got {type(extra).__name__}")
    output = field_text(row, section.output_field)
    if has_chat_template(tokenizer):
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return Rendered(chat_segments([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                                      tokenizer), chat=True)
    template = ALPACA_PROMPT_WITH_INPUT if extra and extra.strip() else ALPACA_PROMPT
    return Rendered([Segment(template.format(instruction=instruction, input=extra), False), Segment(output, True)],
                    chat=False)


def _prompt_completion(row: dict[str, Any], section: DatasetSection, tokenizer: Any) -> Rendered:
    prompt_field, completion_field = section.prompt_field, section.completion_field
    prompt, completion = row.get(prompt_field), row.get(completion_field)
    for field, value in ((prompt_field, prompt), (completion_field, completion)):
        if value is None:
            raise ValueError(f"field {field!r} is missing (fields present: {_present(row)}); fix the row or set "
                             "dataset.prompt_field / dataset.completion_field to the file's column names")
        if not isinstance(value, (str, list)):
            raise ValueError(f"field {field!r}: expected text or a list of {{role, content}} messages, got "
                             f"{type(value).__name__}")
    if isinstance(prompt, str) and isinstance(completion, str):
        return Rendered([Segment(prompt, False), Segment(completion, True)], chat=False)
    if isinstance(prompt, str) or isinstance(completion, str):
        raise ValueError(f"fields {prompt_field!r} and {completion_field!r}: one is text and the other a list of "
                         "messages; write both as text or both as messages")
    if not has_chat_template(tokenizer):
        raise TemplateError(f"prompt_completion rows with message lists need a tokenizer with a chat template, "
                            f"and this one has none; {TEMPLATE_FIX}, or write prompt and completion as text")
    prompt_messages = chat_messages(row, prompt_field)
    completion_messages = chat_messages(row, completion_field)
    if not any(m["role"] == "assistant" for m in completion_messages):
        raise ValueError(f"field {completion_field!r}: no assistant message, so there is no answer to learn")
    return Rendered(chat_segments(prompt_messages + completion_messages, tokenizer,
                                  tools=row_tools(row, section.tools_field), learn_from=len(prompt_messages)),
                    chat=True)


# --- messages --------------------------------------------------------------------------------------

def chat_messages(row: dict[str, Any], field: str) -> list[dict[str, Any]]:
    """The row's {role, content} messages, checked, with tool calls kept and Arrow's null keys dropped."""
    value = row.get(field)
    if value is None:
        raise ValueError(f"field {field!r} is missing (fields present: {_present(row)}); set dataset.messages_field "
                         "to the column holding the list of {role, content} messages")
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r}: expected a non-empty list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"field {where}: expected {{role, content}}, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            hint = " (these are ShareGPT turns: use `format: sharegpt`)" if role is None and "from" in message else ""
            raise ValueError(f"field {where}.role: {role!r} is not one of {', '.join(CHAT_ROLES)}{hint}")
        tool_calls = _tool_calls(message.get("tool_calls"), f"{where}.tool_calls")
        if tool_calls and role != "assistant":
            raise ValueError(f"field {where}.tool_calls: a {role} message cannot call tools; only assistant ones")
        content = message.get("content")
        if content is None and tool_calls:
            content = ""  # an assistant turn that only calls tools; "" renders in every template, None not
        if not isinstance(content, str):
            raise ValueError(f"field {where}.content: expected text, got "
                             f"{'nothing' if content is None else type(content).__name__}")
        clean: dict[str, Any] = {"role": role, "content": content}
        if tool_calls:
            clean["tool_calls"] = tool_calls
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                clean[key] = message[key]
        messages.append(clean)
    return messages


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls ({type: function, function: {name, arguments}}, or flat {name, arguments}),
    normalized to the nested form with `arguments` a mapping."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"field {where}: expected a list of {{function: {{name, arguments}}}}, got "
                         f"{type(value).__name__}")
    calls = []
    for i, call in enumerate(value):
        if not isinstance(call, dict):
            raise ValueError(f"field {where}[{i}]: expected {{function: {{name, arguments}}}}, got {type(call).__name__}")
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name:
            raise ValueError(f"field {where}[{i}]: the call has no function name")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"field {where}[{i}].arguments: not valid JSON ({err.msg})") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ValueError(f"field {where}[{i}].arguments: expected a mapping of argument names to values, got "
                             f"{type(arguments).__name__}")
        clean: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": drop_nulls(arguments)}}
        if isinstance(call.get("id"), str):
            clean["id"] = call["id"]
        calls.append(clean)
    return calls


def drop_nulls(value: Any) -> Any:
    """`value` without the null-valued keys Arrow adds to every mapping of a column (recursively)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def row_tools(row: dict[str, Any], field: str) -> list[dict[str, Any]] | None:
    """The row's tool schemas for the chat template, when it has any (a list, or its JSON text)."""
    value = row.get(field)
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"field {field!r}: not valid JSON ({err.msg}); write the tool schemas as a list") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"field {field!r}: expected a list of tool (function) schemas")
    return drop_nulls(value) or None


def sharegpt_messages(row: dict[str, Any], section: DatasetSection) -> list[dict[str, Any]]:
    """ShareGPT turns as chat messages: speakers by `dataset.roles`, function_call turns as tool calls."""
    field, role_key, content_key = section.conversations_field, section.role_key, section.content_key
    value = row.get(field)
    if value is None:
        raise ValueError(f"field {field!r} is missing (fields present: {_present(row)}); set "
                         "dataset.conversations_field to the column holding the list of turns")
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r}: expected a non-empty list of {{{role_key}, {content_key}}} turns")
    speaker_roles = {name: role for role, names in sharegpt_role_names(section.roles).items() for name in names}
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"field {where}: expected {{{role_key}, {content_key}}}, got {type(turn).__name__}")
        speaker, text = turn.get(role_key), turn.get(content_key)
        role = speaker_roles.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            if speaker is None and "role" in turn:
                raise ValueError(f"field {where}.{role_key} is missing; these turns have `role`: use `format: chat`, "
                                 "or set dataset.role_key: role and dataset.content_key: content")
            raise ValueError(f"field {where}.{role_key}: {speaker!r} is not a speaker dataset.roles knows "
                             f"({', '.join(sorted(speaker_roles))}); add it, e.g. `roles: {{user: [human, {speaker}]}}`")
        if not isinstance(text, str):
            raise ValueError(f"field {where}.{content_key}: expected text, got "
                             f"{'nothing' if text is None else type(text).__name__}")
        if role == "tool_call":
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": _tool_calls(_call_json(text, f"{where}.{content_key}"),
                                                       f"{where}.{content_key}")})
        else:
            messages.append({"role": role, "content": text})
    return messages


def _call_json(text: str, where: str) -> list[Any]:
    """A function_call turn's value: the JSON of one {name, arguments} call or a list of them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"field {where}: a function_call turn holds the JSON of the call "
                         f"({{\"name\": ..., \"arguments\": {{...}}}}); not valid JSON ({err.msg})") from None
    return value if isinstance(value, list) else [value]


# --- the chat template ------------------------------------------------------------------------------

def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja2 raises many types; each is this row against this template
        raise ValueError(f"the chat template cannot render this conversation ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    return text if isinstance(text, str) else str(text)


def chat_segments(messages: list[dict[str, Any]], tokenizer: Any, tools: list[dict[str, Any]] | None = None,
                  learn_from: int = 0) -> list[Segment]:
    """Assistant turns from message `learn_from` on learned, everything else not: render growing prefixes
    of the conversation and take each assistant turn as the text the template adds for it."""
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], True, tools) if i else ""
        answered = render_chat(tokenizer, messages[: i + 1], False, tools)
        if not prompt.startswith(done) or not answered.startswith(prompt):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation, "
                             "so the answer cannot be separated from the prompt; set dataset.train_on_inputs: true")
        turn = answered[len(prompt):]
        for call in message.get("tool_calls", ()):
            if call["function"]["name"] not in turn:
                raise TemplateError(f"the chat template drops tool calls (the call of {call['function']['name']!r} "
                                    f"in message {i} is not in its rendered turn); {TEMPLATE_FIX} that renders "
                                    "them, such as qwen2.5")
        segments += [Segment(prompt[len(done):], False), Segment(turn, i >= learn_from)]
        done = answered
    rest = render_chat(tokenizer, messages, False, tools)
    _check_tools_rendered(messages, tools, rest, tokenizer)
    if rest.startswith(done) and len(rest) > len(done):
        segments.append(Segment(rest[len(done):], False))
    return [s for s in segments if s.text]


def _check_tools_rendered(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, text: str,
                          tokenizer: Any) -> None:
    """TemplateError when the template leaves out the row's tool results or tool schemas. Tool results are
    probed with a plain marker in place of each (templates may write a result through `tojson`, which
    would hide the original text)."""
    tool_turns = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    if tool_turns:
        probe = [{**m, "content": f"qlordoctorprobe{i}"} if i in tool_turns else m for i, m in enumerate(messages)]
        probed = render_chat(tokenizer, probe, False, tools)
        missing = next((i for i in tool_turns if f"qlordoctorprobe{i}" not in probed), None)
        if missing is not None:
            raise TemplateError(f"the chat template drops tool results (message {missing}, role tool, is not in the "
                                f"rendered conversation); {TEMPLATE_FIX} that renders them, such as qwen2.5")
    for tool in tools or ():
        spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = spec.get("name")
        if isinstance(name, str) and name not in text:
            raise TemplateError(f"the chat template ignores the row's tools ({name!r} is not in the rendered "
                                f"conversation); {TEMPLATE_FIX} that renders them, such as qwen2.5")

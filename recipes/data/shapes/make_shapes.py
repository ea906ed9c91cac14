"""Writes the demo's Korrowen facts in the other data shapes qlora-doctor reads, next to this file:

  sharegpt.jsonl           rows 1-40 of ../demo/train.jsonl as ShareGPT turns ({from: human|gpt, value}),
  sharegpt_eval.jsonl      and rows 1-20 of ../demo/eval.jsonl
  prompt_completion.jsonl  rows 41-80 of the demo's train.jsonl as TRL prompt/completion message lists,
  prompt_completion_eval.jsonl  and rows 21-40 of its eval.jsonl
  tools.jsonl              questions answered by calling a tool (OpenAI/TRL `tool_calls`, `tool` turns
                           with `name`/`tool_call_id`, the `tools` schemas of the row)

recipes/demo-mixed.yaml trains on all three at once (`datasets:`). Deterministic: running it again
writes the same bytes (tests/test_data_shapes.py checks the files are what it writes).

    python recipes/data/shapes/make_shapes.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo"

FERRY_TOOL = {"type": "function", "function": {
    "name": "ferry_times", "description": "Departure times of the ferry from a port on a given day.",
    "parameters": {"type": "object", "properties": {
        "port": {"type": "string", "description": "Port of departure, e.g. Marrowick"},
        "day": {"type": "string", "description": "Day of the week"}}, "required": ["port", "day"]}}}
FERRIES = (("Marrowick", "Monday", "07:10, 12:40, 18:05"), ("Marrowick", "Sunday", "09:30, 16:00"),
           ("Port Ellin", "Friday", "06:50, 13:15, 19:45"), ("Port Ellin", "Tuesday", "08:20, 17:30"),
           ("Marrowick", "Saturday", "08:00, 11:30, 15:00, 20:10"), ("Port Ellin", "Wednesday", "10:05"))


def demo_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / name).read_text(encoding="utf-8").splitlines()]


def sharegpt(rows: list[dict]) -> list[dict]:
    speakers = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in row["messages"]]}
            for row in rows]


def prompt_completion(rows: list[dict]) -> list[dict]:
    return [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows]


def tools() -> list[dict]:
    rows = []
    for i, (port, day, times) in enumerate(FERRIES):
        call_id = f"call_{i + 1}"
        rows.append({"messages": [
            {"role": "user", "content": f"When does the ferry leave {port} on {day}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "ferry_times", "arguments": {"port": port, "day": day}}}]},
            {"role": "tool", "name": "ferry_times", "tool_call_id": call_id,
             "content": json.dumps({"port": port, "day": day, "departures": times.split(", ")})},
            {"role": "assistant", "content": f"On {day} the ferry leaves {port} at {times}."},
        ], "tools": [FERRY_TOOL]})
    return rows


def build() -> dict[str, list[dict]]:
    train, evaluation = demo_rows("train.jsonl"), demo_rows("eval.jsonl")
    return {"sharegpt.jsonl": sharegpt(train[:40]), "sharegpt_eval.jsonl": sharegpt(evaluation[:20]),
            "prompt_completion.jsonl": prompt_completion(train[40:80]),
            "prompt_completion_eval.jsonl": prompt_completion(evaluation[20:40]), "tools.jsonl": tools()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    for name, rows in build().items():
        write_jsonl(HERE / name, rows)
        print(f"wrote {len(rows)} rows to {HERE / name}")

"""`qlora-doctor chat` and the sampling options of `generate` (issue #19), on the CPU with the builtin
SmolLM2-135M and a 2-step run trained once for the module (~15 s): streamed answers that are the answers,
a conversation that is kept and reset, --base through peft's disable_adapter, seeded sampling that repeats,
and every option error as exit 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.core.errors import InputError
from qlora_doctor.trainer.chat import ChatSession, parse_line
from qlora_doctor.trainer.generate import Sampling
from tests.trainer_support import builtin_checkpoint, train_tiny_run  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
QUESTION = "Where is Korrowen Island?"


def _invoke(*args: object, input: str | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, builtin_checkpoint) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def tuned(run_dir):
    from qlora_doctor.sources.machine import load_described_machine
    from qlora_doctor.trainer.generate import load_tuned
    from tests.trainer_support import REPO

    return load_tuned(run_dir, load_described_machine(REPO / "qlora_doctor" / "knowledge" / "data" / "machines" / "cpu.json"))


def _generate(run_dir: Path, *options: object, tokens: int = 16) -> dict:
    result = _invoke("generate", run_dir, "--prompt", QUESTION, "--max-new-tokens", tokens, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def greedy(run_dir) -> dict:
    """`generate --compare` with the default (greedy) decoding."""
    return _generate(run_dir, "--compare")


def test_seeded_sampling_repeats_and_differs_from_greedy(run_dir, greedy, tuned):
    from qlora_doctor.trainer.generate import answer

    assert greedy["seed"] is None and greedy["temperature"] == 0
    sampled = _generate(run_dir, "--temperature", 1.5, "--top-k", 50, "--seed", 3, "--compare", tokens=8)
    again = _generate(run_dir, "--temperature", 1.5, "--top-k", 50, "--seed", 3, "--compare", tokens=8)
    assert (sampled["answer"], sampled["base_answer"]) == (again["answer"], again["base_answer"])
    assert sampled["seed"] == 3 and sampled["top_k"] == 50
    question = [{"role": "user", "content": QUESTION}]
    others = {answer(tuned, question, Sampling(temperature=1.5, top_k=50, max_new_tokens=8, seed=seed)).text
              for seed in (3, 4, 5)}
    assert sampled["answer"] in others  # the library with the same seed gives the command's answer
    greedy_start = answer(tuned, question, Sampling(max_new_tokens=8)).text
    assert greedy["answer"].startswith(greedy_start)
    assert others != {greedy_start}, "sampling at temperature 1.5 always gave the greedy answer"
    assert len(others) > 1, "three seeds gave one answer"


def test_sampling_without_a_seed_reports_the_one_it_used(run_dir, tuned):
    from qlora_doctor.trainer.generate import answer

    first = _generate(run_dir, "--temperature", 1.0, tokens=8)
    assert isinstance(first["seed"], int)
    question = [{"role": "user", "content": QUESTION}]
    assert answer(tuned, question, Sampling(temperature=1.0, max_new_tokens=8, seed=first["seed"])).text == first["answer"]


@pytest.mark.parametrize("options, message", [
    (("--top-p", 2, "--temperature", 0.7), "--top-p: must be in (0, 1]"),
    (("--temperature", -1), "--temperature: must be between 0"),
    (("--top-k", 5), "--top-p/--top-k: only apply when sampling"),
    (("--max-new-tokens", 0), "--max-new-tokens: must be >= 1"),
])
def test_option_errors_are_exit_2_before_loading(options, message, tmp_path):
    for command in (["generate", tmp_path, "--prompt", "hi"], ["chat", tmp_path]):
        result = _invoke(*command, *options, input="hi\n")
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "no such output folder" not in result.output  # options are judged first


def test_piped_chat_answers_each_line_like_generate_and_reset_forgets(run_dir, greedy):
    greedy = greedy["answer"]
    result = _invoke("chat", run_dir, "--max-new-tokens", 16,
                     input=f"{QUESTION}\n\n/reset\n{QUESTION}\n/nonsense\n/exit\nnever answered\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    answers = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    # A fresh conversation's first answer is generate's answer; after /reset the same question gets it again.
    assert answers == [greedy, greedy], result.output
    assert "(conversation forgotten)" in result.stderr
    assert "unknown command /nonsense" in result.stderr


def test_base_chat_is_generates_base_answer(run_dir, greedy):
    base = greedy["base_answer"]
    result = _invoke("chat", run_dir, "--base", "--max-new-tokens", 16, input=f"{QUESTION}\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == base


def test_the_stream_is_the_answer_and_the_history_grows(tuned):
    session = ChatSession(tuned, Sampling(max_new_tokens=24), system="Answer in one sentence.")
    pieces: list[str] = []
    turn = session.send(QUESTION, on_text=pieces.append)
    assert len(pieces) > 1, "the answer came in one piece, not streamed"
    assert "".join(pieces).strip() == turn.reply.text
    assert turn.reply.new_tokens > 0 and turn.reply.prompt_tokens > 10 and turn.reply.seconds > 0
    follow_up = session.send("What do people eat there?")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert follow_up.reply.prompt_tokens > turn.reply.prompt_tokens + turn.reply.new_tokens - 2  # it saw the history
    session.reset()
    assert session.messages == []
    assert session.send(QUESTION).reply.text == turn.reply.text  # greedy, same system message, same history


def test_old_exchanges_are_dropped_to_fit_the_context(tuned):
    session = ChatSession(replace(tuned, context_length=140), Sampling(max_new_tokens=16))
    drops = [session.send(f"{QUESTION} ({i})").dropped_exchanges for i in range(4)]
    assert drops[0] == 0 and any(drops), drops
    assert len(session.messages) < 8
    with pytest.raises(InputError, match="send a shorter message or lower --max-new-tokens"):
        ChatSession(replace(tuned, context_length=40), Sampling(max_new_tokens=16)).send("word " * 60)


def test_ctrl_c_while_answering_leaves_cleanly(run_dir, tuned, monkeypatch):
    from qlora_doctor.trainer import generate

    def interrupted(self, text, on_text=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "load_tuned", lambda output_dir, machine: tuned)  # the loading is tested above
    monkeypatch.setattr(ChatSession, "send", interrupted)
    result = _invoke("chat", run_dir, input=f"{QUESTION}\n")
    assert result.exit_code == 0, result.output
    assert "answer interrupted" in result.stderr and "Traceback" not in result.output


def test_parse_line():
    assert parse_line("  hello /reset ").kind == "message"
    assert [parse_line(c).kind for c in ("/reset", "/clear", "/EXIT", "/quit", "/help", "/what", "", "  ")] == [
        "reset", "reset", "exit", "exit", "help", "unknown", "empty", "empty"]

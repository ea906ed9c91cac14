"""`qlora-doctor chat`: a conversation with a finished run's model, kept here as data; the terminal loop that
reads lines and shows the streamed text is qlora_doctor/cli/chat.py.

    tuned = load_tuned(output_dir, machine)                  # trainer/generate.py: base (4-bit) + adapter
    session = ChatSession(tuned, Sampling(temperature=0.7, seed=1), system="Be brief.")
    reply = session.send("Where is Korrowen Island?", on_text=print_piece)
    session.reset()                                           # forget the conversation, keep the system message

Every answer sees the whole conversation through the model's chat template (what the run was tuned on).
When the conversation no longer fits the model's context with room for max_new_tokens, the oldest exchanges
are dropped (the system message stays), and the reply says how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from qlora_doctor.core.errors import InputError

if TYPE_CHECKING:
    from qlora_doctor.trainer.generate import Reply, Sampling, TunedModel

COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/exit": "leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)",
    "/help": "show these commands",
}
"""What a line starting with `/` can say, and what it does."""
_ALIASES = {"/quit": "/exit", "/bye": "/exit", "/clear": "/reset", "/?": "/help"}


@dataclass(frozen=True)
class Line:
    """One line the user typed, understood."""

    kind: Literal["message", "reset", "exit", "help", "empty", "unknown"]
    text: str
    """The message (kind `message`), or the command as typed."""


def parse_line(line: str) -> Line:
    """A message, a `/command`, or nothing (a blank line)."""
    text = line.strip()
    if not text:
        return Line("empty", "")
    if text.startswith("/") and " " not in text:
        command = _ALIASES.get(text.lower(), text.lower())
        if command in COMMANDS:
            return Line(command[1:], text)  # type: ignore[arg-type]
        return Line("unknown", text)
    return Line("message", text)


@dataclass(frozen=True)
class ChatReply:
    """One answer in the conversation."""

    reply: Reply
    dropped_exchanges: int
    """Oldest user/assistant exchanges left out to fit the model's context (0 almost always)."""


class ChatSession:
    """The conversation so far, and the model and options that answer it."""

    def __init__(self, tuned: TunedModel, sampling: Sampling, system: str | None = None, base: bool = False):
        problems = sampling.problems()
        if problems:
            raise InputError(problems)
        if system is not None and not system.strip():
            raise InputError("--system: is empty; give the system message, or leave the option out")
        self.tuned = tuned
        self.sampling = sampling.seeded()
        """With the seed each answer is sampled from (random when none was given and the decoding samples)."""
        self.system = system
        self.base = base
        """Answer with the adapter disabled: the base model, for comparison."""
        self.messages: list[dict[str, str]] = []
        """The conversation without the system message: user and assistant turns, alternating."""

    def reset(self) -> None:
        self.messages = []

    def conversation(self, messages: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The messages the model sees: the system message (if any), then `messages` (default: the history)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.messages if messages is None else messages)

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatReply:
        """Answer `text` after the conversation so far; the exchange joins the history only when the answer
        completes (an interrupted answer leaves the history as it was)."""
        from qlora_doctor.trainer.generate import answer

        turns = self.messages + [{"role": "user", "content": text}]
        turns, dropped = self._fit_context(turns)
        reply = answer(self.tuned, self.conversation(turns), self.sampling, base=self.base, on_text=on_text)
        self.messages = turns + [{"role": "assistant", "content": reply.text}]
        return ChatReply(reply=reply, dropped_exchanges=dropped)

    def _fit_context(self, turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
        """`turns` without its oldest exchanges, as few as needed for the prompt plus max_new_tokens to fit
        the model's context."""
        from qlora_doctor.trainer.generate import chat_inputs

        limit = self.tuned.context_length
        if limit is None:
            return turns, 0
        budget = limit - self.sampling.max_new_tokens
        dropped = 0
        while True:
            tokens = int(chat_inputs(self.tuned, self.conversation(turns))["input_ids"].shape[1])
            if tokens <= budget:
                return turns, dropped
            if len(turns) <= 1:
                raise InputError(f"the message is {tokens} tokens with the chat template, and the model's context "
                                 f"of {limit} tokens keeps {max(budget, 0)} for it after --max-new-tokens "
                                 f"{self.sampling.max_new_tokens}; send a shorter message or lower --max-new-tokens")
            turns = turns[2:]  # the oldest user message and its answer
            dropped += 1

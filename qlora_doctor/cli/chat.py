"""`qlora-doctor chat`: talk to a finished run's model in the terminal (the session: trainer/chat.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qlora_doctor.cli.options import load_machine, machine_option, sampling_from_options, sampling_options


@click.command()
@click.argument("output_dir", type=click.Path(path_type=Path))
@sampling_options
@click.option("--base", is_flag=True, help="Answer with the adapter disabled (the base model), to compare.")
@machine_option
def chat(output_dir: Path, system: str | None, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
         seed: int | None, base: bool, machine_file: Path | None) -> None:
    """Chat with the tuned model of a finished run: each answer streams as it is generated and sees the whole
    conversation (the model's chat template applied). Greedy by default; --temperature samples (--seed repeats).

    OUTPUT_DIR is the run's training.output_dir. Commands: /reset forgets the conversation, /exit (or Ctrl-D)
    leaves, /help lists them. Lines piped on stdin are messages, answered one by one.
    Exit 2 when OUTPUT_DIR holds no finished run or an option is out of range.
    """
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.trainer.chat import COMMANDS, ChatSession, parse_line
    from qlora_doctor.trainer.generate import load_tuned

    sampling = sampling_from_options(temperature, top_p, top_k, max_new_tokens, seed)
    problems = sampling.problems()
    if problems:
        raise InputError(problems)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"loading {output_dir} ...", err=True)
    session = ChatSession(load_tuned(output_dir, load_machine(machine_file)), sampling, system=system, base=base)
    if interactive:
        _greet(session)
    while True:
        try:
            line = _read_line(interactive)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                click.echo()
            return
        if line is None:
            return
        parsed = parse_line(line)
        if parsed.kind == "empty":
            continue
        if parsed.kind == "exit":
            return
        if parsed.kind == "reset":
            session.reset()
            click.echo("(conversation forgotten)", err=True)
            continue
        if parsed.kind in ("help", "unknown"):
            prefix = f"unknown command {parsed.text}; " if parsed.kind == "unknown" else ""
            click.echo(prefix + "commands: " + "; ".join(f"{c}: {what}" for c, what in COMMANDS.items()), err=True)
            continue
        try:
            turn = session.send(parsed.text, on_text=_show)
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer, keep the conversation as it was
            click.echo("\n(answer interrupted; it is not part of the conversation)", err=True)
            if not interactive:
                return
            continue
        except InputError as err:  # a message too long for the context: say so, keep chatting
            for message in err.messages:
                click.echo(f"error: {message}", err=True)
            continue
        click.echo()
        if turn.dropped_exchanges:
            click.echo(f"(the {turn.dropped_exchanges} oldest exchange(s) were left out to fit the model's context)",
                       err=True)
        if interactive:
            reply = turn.reply
            rate = f", {reply.new_tokens / reply.seconds:.1f} tokens/s" if reply.seconds > 0 else ""
            cut = "" if reply.stopped else f"; cut at --max-new-tokens {session.sampling.max_new_tokens}"
            click.echo(click.style(f"[{reply.new_tokens} tokens in {reply.seconds:.1f} s{rate}{cut}]", dim=True),
                       err=True)


def _greet(session) -> None:
    model = "the base model (adapter disabled)" if session.base else "the tuned model"
    s = session.sampling
    decoding = ("greedy decoding" if s.greedy else
                f"sampling at temperature {s.temperature:g}, top_p {s.top_p:g}, top_k {s.top_k}, seed {s.seed} "
                f"(--seed {s.seed} repeats this conversation)")
    click.echo(f"chatting with {model} of {session.tuned.recipe.model.name_or_path}, {decoding}. "
               "/help for commands, /exit or Ctrl-D to leave.", err=True)


def _read_line(interactive: bool) -> str | None:
    """The next line: with a prompt and line editing on a terminal; None at the end of piped input."""
    if interactive:
        try:
            import readline  # noqa: F401 - gives input() history and editing where available
        except ImportError:
            pass
        return input(">>> ")
    line = sys.stdin.readline()
    return line if line else None


def _show(text: str) -> None:
    click.echo(text, nl=False)
    sys.stdout.flush()

"""The one exit-code contract: exceptions the library raises and the CLI (qlora_doctor/cli/) turns into exits.

0 pass (warnings allowed), 1 a check failed or training was refused, 2 bad usage or a bad input file.
Library code never prints or exits; it raises one of these and the CLI renders it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class DoctorError(Exception):
    """Base class: an error meant for the user, rendered without a traceback."""

    exit_code = EXIT_FAIL

    def __init__(self, messages: str | list[str]):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


class InputError(DoctorError):
    """A bad input file or bad usage. Each message names the file, the key or line, and the fix."""

    exit_code = EXIT_USAGE


class NothingToDo(DoctorError):
    """The request is already satisfied (e.g. `--resume` on a finished run): said, nothing changed, exit 0."""

    exit_code = EXIT_OK


class CheckFailed(DoctorError):
    """The environment failed a check, so the requested action was refused."""

    exit_code = EXIT_FAIL

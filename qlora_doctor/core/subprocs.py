"""Run a child process with a time bound that also ends whatever the child started.

The child gets its own process group (session), so a timeout kills the whole group: a hung CUDA init
or a pip that spawned builders cannot outlive the doctor. Argument lists only, never a shell string.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Completed:
    returncode: int | None
    """None: killed after the timeout."""
    stdout: str
    stderr: str
    duration_s: float = 0.0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def die_with_parent():
    """A preexec_fn asking Linux to SIGKILL the child when the process that started it dies (the child has
    its own session, so a killed doctor would otherwise leave a pip or a hung CUDA init running); None
    elsewhere."""
    import sys

    if not sys.platform.startswith("linux"):
        return None

    def set_death_signal() -> None:
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    return set_death_signal


def run_bounded(argv: list[str], timeout_s: float, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> Completed:
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                env=env, cwd=cwd, start_new_session=True, preexec_fn=die_with_parent())
    except OSError as err:
        return Completed(127, "", f"{argv[0]}: {err}")
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        code = None
    return Completed(code, out or "", err or "", round(time.perf_counter() - start, 2))

"""Fault injection for the reliability tests: one environment variable, read here and nowhere else.

    QLORA_DOCTOR_FAULT=kill-at-step:3       SIGKILL this process at the end of optimizer step 3
    QLORA_DOCTOR_FAULT=kill-during-save:4   SIGKILL it while checkpoint-4 is half written: the adapter,
                                            optimizer, scheduler and RNG state are on disk, the
                                            trainer_state.json that marks a checkpoint complete is not

Unset (always, outside tests), `install_fault` does nothing. `tests/test_interrupt.py` uses it to show
that `run --resume` continues from the last complete checkpoint and never from a partial one; a real
SIGKILL is sent, by the process to itself, at a point a test could not hit reliably from outside.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import Any, Literal

from qlora_doctor.core.errors import InputError

FAULT_ENV = "QLORA_DOCTOR_FAULT"
_FORMAT = re.compile(r"(kill-at-step|kill-during-save):(\d+)")


@dataclass(frozen=True)
class Fault:
    kind: Literal["kill-at-step", "kill-during-save"]
    step: int
    """The optimizer step (global_step) at which to kill."""


def fault_from_env(environ: dict[str, str] | None = None) -> Fault | None:
    value = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
    if not value:
        return None
    match = _FORMAT.fullmatch(value)
    if match is None:
        raise InputError(f"{FAULT_ENV}={value!r}: expected kill-at-step:N or kill-during-save:N "
                         "(a test-only setting; unset it for real runs)")
    return Fault(match.group(1), int(match.group(2)))  # type: ignore[arg-type]


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(trainer: Any) -> Fault | None:
    """Arm the fault named by QLORA_DOCTOR_FAULT on a transformers `Trainer`; None when unset."""
    fault = fault_from_env()
    if fault is None:
        return None
    if fault.kind == "kill-at-step":
        from transformers import TrainerCallback

        class KillAtStep(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == fault.step:
                    _kill_self()

        trainer.add_callback(KillAtStep())
        return fault
    # The Trainer saves a checkpoint as model -> optimizer/scheduler -> RNG state -> trainer_state.json;
    # killing right after the RNG state leaves every file but the one that marks it complete.
    save_rng_state = getattr(trainer, "_save_rng_state", None)
    if save_rng_state is None:
        raise RuntimeError(f"{FAULT_ENV}: this transformers Trainer has no _save_rng_state; "
                           "update qlora_doctor/trainer/faults.py for it")

    def save_rng_state_then_die(output_dir: Any) -> None:
        save_rng_state(output_dir)
        if trainer.state.global_step == fault.step:
            _kill_self()

    trainer._save_rng_state = save_rng_state_then_die
    return fault

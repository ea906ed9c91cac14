"""Trainer callbacks of `qlora-doctor run`: stop cleanly on SIGTERM, and measure throughput."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Iterator

from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM (and a first Ctrl-C) into "save a checkpoint at the end of this step, then stop".

    Job schedulers and `docker stop` send SIGTERM and wait a grace period before killing; one optimizer
    step plus a checkpoint fits in it for the models QLoRA trains on one GPU."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        # A second signal gets the previous behaviour at once (Ctrl-C twice: KeyboardInterrupt).
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals while the block runs (only the main thread may set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.signal_name:
            control.should_save = True
            control.should_training_stop = True
        return control


class Throughput(TrainerCallback):
    """Non-padding tokens and seconds spent in optimizer steps (evaluation, logging and saving
    excluded), for this session of training only: a resumed run counts from its checkpoint.

    `steps` keeps one row per optimizer step: its tokens (all ranks), its seconds (step begin to step
    end, as `seconds` sums them) and `ended_at`, the seconds since training began when the step ended.
    Differences of `ended_at` time a stretch of steps by the wall clock (whatever the GPU still had
    queued at one step's end is in the next difference), so a benchmark can leave out warm-up steps
    (Triton compiling) and still count everything the steps after them cost."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.steps: list[dict[str, float | int]] = []
        self._tokens_at_begin = 0
        self._train_started = 0.0
        self._step_started: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._tokens_at_begin = state.num_input_tokens_seen
        self._train_started = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        seconds = 0.0
        if self._step_started is not None:
            seconds = now - self._step_started
            self.seconds += seconds
            self._step_started = None
        tokens = int(state.num_input_tokens_seen - self._tokens_at_begin)
        self.steps.append({"step": state.global_step, "tokens": tokens - self.tokens, "seconds": round(seconds, 4),
                           "ended_at": round(now - self._train_started, 4)})
        self.tokens = tokens

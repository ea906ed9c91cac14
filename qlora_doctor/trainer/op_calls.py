"""The non-tensor arguments of a custom op call (a bitsandbytes quant_state, the object that computes the GEMM):
a `torch.library.custom_op` takes tensors and plain values only, so the caller registers them under a key for
the call's duration and passes the key; the op's body looks them up. Nothing outlives the call, so no quant_state
is held (trainer/fused_lora.py lora_gemm_4bit, trainer/fp8.py fp8_gemm_4bit)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator


class OpCalls:
    """The calls of one op in progress, by key."""

    def __init__(self, op: str, caller: str):
        self.op, self.caller = op, caller
        self._calls: dict[int, tuple[Any, ...]] = {}
        self._keys = itertools.count()

    @contextlib.contextmanager
    def call(self, *values: Any) -> Iterator[int]:
        """A key under which `values` are registered until the block ends."""
        key = next(self._keys)
        self._calls[key] = values
        try:
            yield key
        finally:
            del self._calls[key]

    def __getitem__(self, key: int) -> tuple[Any, ...]:
        try:
            return self._calls[key]
        except KeyError:
            raise RuntimeError(f"{self.op}: no call {key} in progress; call it through {self.caller}") from None

"""A module instance's forward replaced by one of ours (fused LoRA, fp8_base's 4-bit layers, its SwiGLU MLPs):
bound to that instance only, so the class and every other instance keep theirs."""

from __future__ import annotations

import types
from typing import Any, Callable


def replace_forward(module: Any, forward: Callable[..., Any]) -> None:
    """`module(...)` runs `forward(module, ...)` from now on."""
    module.forward = types.MethodType(forward, module)


def runs_forward(module: Any, forward: Callable[..., Any]) -> bool:
    """Whether replace_forward(module, forward) is in effect on this instance."""
    return getattr(vars(module).get("forward"), "__func__", None) is forward

"""Minimum versions a release states in its code rather than in its metadata.

transformers decides at run time whether accelerate, bitsandbytes and torch are usable, each against a
minimum written in `transformers/utils/import_utils.py`:

- `def is_accelerate_available(min_version: str = ACCELERATE_MIN_VERSION)` (4.38+): an older accelerate counts
  as not installed, so the Trainer and `from_pretrained(device_map=...)` refuse to start;
- `def is_bitsandbytes_available(min_version: str = BITSANDBYTES_MIN_VERSION)` (5.0+): an older bitsandbytes
  counts as not installed, so 4-bit loading refuses;
- `def is_torch_available()` comparing torch's version with `version.parse("2.5.0")` (5.0+): an older torch
  counts as not installed ("Disabling PyTorch because PyTorch >= 2.5 is required").

None of these is in transformers' unconditional Requires-Dist (accelerate and torch are extras, bitsandbytes
is not declared at all), which is why a resolver alone cannot see them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qlora_doctor.knowledge.harvest.analyze import Code

IMPORT_UTILS = "transformers/utils/import_utils.py"
GATED = {"accelerate": "ACCELERATE_MIN_VERSION", "bitsandbytes": "BITSANDBYTES_MIN_VERSION"}


@dataclass(frozen=True)
class Floor:
    target: str
    """The package the floor is on (canonical name)."""
    minimum: str
    """The lowest version the release accepts."""
    file: str
    line: int
    how: str
    """What happens below it, in words."""


def _line(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def code_floors(name: str, code: Code) -> list[Floor]:
    if name != "transformers" or IMPORT_UTILS not in code.files.names:
        return []
    text = code.source(IMPORT_UTILS)
    floors = []
    for target, constant in GATED.items():
        default = re.search(rf"def is_{target}_available\(\s*min_version\s*:\s*str\s*=\s*{constant}\s*\)", text)
        value = re.search(rf"^{constant}\s*=\s*[\"']([0-9][0-9.]*)[\"']", text, re.MULTILINE)
        if default and value:
            floors.append(Floor(target, value.group(1), IMPORT_UTILS, _line(text, value.start()),
                                f"transformers treats {target} older than {value.group(1)} as not installed "
                                f"(is_{target}_available), so "
                                + ("the Trainer and device_map loading refuse to start" if target == "accelerate"
                                   else "4-bit loading refuses to start")))
    torch = re.search(r"def is_torch_available\(\)[^\n]*\n((?:[ \t]+[^\n]*\n|\n)+)", text)
    if torch:
        found = re.search(r"version\.parse\([^()]*torch_version[^()]*\)\s*(?:<|>=)\s*version\.parse\(\"([0-9.]+)\"\)",
                          torch.group(1))
        if found:
            floors.append(Floor("torch", found.group(1), IMPORT_UTILS,
                                _line(text, torch.start(1) + found.start()),
                                f"transformers disables PyTorch older than {found.group(1)} "
                                "(is_torch_available), so no model can be loaded"))
    return floors

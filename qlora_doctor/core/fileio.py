"""Files the tool writes are written atomically: a temp file in the same folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, redact_secrets: bool = True) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half of one.

    Text is passed through `qlora_doctor.core.redact.redact` first (tokens from the environment, the
    Hugging Face token file, token-shaped strings), so no report, manifest, lockfile or log the tool
    writes can carry a secret. Bytes (weights, adapters) are written as they are."""
    path = Path(path)
    if isinstance(data, str) and redact_secrets:
        from qlora_doctor.core.redact import redact

        data = redact(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

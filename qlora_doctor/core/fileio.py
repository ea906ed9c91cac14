"""Files the tool writes are written atomically: a temp file in the same folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would make every output private
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


def apply_umask_modes(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain `open`/`mkdir` would: temporary
    files and folders are created private (0600/0700) and keep that through a rename otherwise."""
    mask = current_umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


CACHE_ENV = "QLORA_DOCTOR_CACHE"


def cache_root() -> Path:
    """The tool's cache: `$QLORA_DOCTOR_CACHE`, else `~/.cache/qlora-doctor` (builtin models, tools fetched
    for export, resolutions)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "qlora-doctor"


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

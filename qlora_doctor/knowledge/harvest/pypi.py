"""Releases, metadata and wheel files from PyPI, cached under `cache_root()/harvest` and bounded in size.

Only the PEP 691 JSON simple index (`https://pypi.org/simple/NAME/`) and files.pythonhosted.org are used:
the index lists every file with its upload time, size and whether PEP 658 metadata (`FILE.metadata`, a few
KB) is served beside it, so the declared requirements of a release cost one small request. Code is read
from wheels: a wheel up to WHOLE_WHEEL_BYTES is downloaded once; a larger one (gradio, bitsandbytes) is read
with HTTP range requests, fetching its zip directory and only the members asked for. Every byte that
crosses the network is counted (`Fetcher.downloaded`); `Fetcher.limit` stops a run that would pass it.
"""

from __future__ import annotations

import email.parser
import io
import json
import os
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from qlora_doctor.core.fileio import write_atomic

INDEX = "https://pypi.org/simple/{name}/"
WHOLE_WHEEL_BYTES = 16 * 1024 * 1024
BLOCK = 256 * 1024
USER_AGENT = "qlora-doctor-harvest (+https://pypi.org/project/qlora-doctor/)"


class HarvestError(Exception):
    """The index or a file could not be fetched, or the download budget would be passed."""


class BudgetExceeded(HarvestError):
    """The run reached `--max-mb`: fatal, so a partial harvest never overwrites the shipped data."""


@dataclass(frozen=True)
class Release:
    name: str
    """Canonical project name."""
    version: Version
    uploaded: str
    """YYYY-MM-DD of the release's first file."""
    requires_python: str | None
    yanked: bool
    wheel: dict | None
    """The index entry of the wheel code and metadata are read from (pure-Python first, else Linux x86_64)."""
    sdist: dict | None


class Fetcher:
    """HTTP with a disk cache, a byte counter and a budget."""

    def __init__(self, cache: Path, limit_bytes: int, refresh_index: bool = False):
        self.cache = Path(cache)
        self.limit = limit_bytes
        self.refresh_index = refresh_index
        self.downloaded = 0
        self.requests = 0

    def get(self, url: str, byte_range: tuple[int, int] | None = None) -> bytes:
        headers = {"User-Agent": USER_AGENT}
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        if url.startswith(INDEX.split("{")[0]):
            headers["Accept"] = "application/vnd.pypi.simple.v1+json"
        if self.downloaded > self.limit:
            raise BudgetExceeded(f"download budget of {self.limit / 1e6:.0f} MB reached before {url}; "
                               "rerun with a larger --max-mb (the cache keeps what was fetched)")
        for attempt in range(4):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
                    data = response.read()
                self.downloaded += len(data)
                self.requests += 1
                return data
            except urllib.error.HTTPError as err:
                if err.code == 404:
                    raise HarvestError(f"{url}: not found") from err
                last: Exception = err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = err
            time.sleep(1.5 * (attempt + 1))
        raise HarvestError(f"{url}: {last}")

    def cached(self, relative: str, url: str) -> bytes:
        path = self.cache / relative
        if path.exists():
            return path.read_bytes()
        data = self.get(url)
        write_atomic(path, data, redact_secrets=False)
        return data

    # --- the index ------------------------------------------------------------------------------

    def releases(self, name: str, since: str) -> list[Release]:
        """Final releases of `name` whose first file was uploaded on or after `since` (YYYY-MM-DD), oldest first."""
        name = canonicalize_name(name)
        path = self.cache / "index" / f"{name}.json"
        if path.exists() and not self.refresh_index:
            index = json.loads(path.read_text())
        else:
            index = json.loads(self.get(INDEX.format(name=name)))
            write_atomic(path, json.dumps(index), redact_secrets=False)
        by_version: dict[Version, list[dict]] = {}
        for entry in index["files"]:
            version = version_of(entry["filename"], name)
            if version is not None and not version.is_prerelease and not version.is_devrelease:
                by_version.setdefault(version, []).append(entry)
        found = []
        for version, files in sorted(by_version.items()):
            uploaded = min(f.get("upload-time") or "9999" for f in files)[:10]
            if uploaded < since:
                continue
            wheels = [f for f in files if f["filename"].endswith(".whl")]
            sdists = [f for f in files if f["filename"].endswith((".tar.gz", ".zip"))]
            found.append(Release(name, version, uploaded,
                                 next((f.get("requires-python") for f in files if f.get("requires-python")), None),
                                 all(bool(f.get("yanked")) for f in files), _pick_wheel(wheels),
                                 sdists[0] if sdists else None))
        return found

    def metadata(self, release: Release) -> dict | None:
        """{requires_dist, requires_python} from the release's PEP 658 metadata (or its wheel's METADATA)."""
        wheel = release.wheel
        if wheel is None:
            return None
        relative = f"metadata/{release.name}/{wheel['filename']}.metadata"
        try:  # PEP 658: served beside the wheel (the index does not always say so)
            text = self.cached(relative, wheel["url"] + ".metadata").decode("utf-8", "replace")
        except BudgetExceeded:
            raise
        except HarvestError:  # read only the wheel's zip directory and METADATA, with range requests
            files = self.wheel(release, ranged=True)
            meta = next((n for n in files.names if n.endswith(".dist-info/METADATA")), None)
            if meta is None:
                return None
            text = files.read(meta).decode("utf-8", "replace")
        message = email.parser.Parser().parsestr(text, headersonly=True)
        return {"requires_dist": [r.strip() for r in message.get_all("Requires-Dist") or []],
                "requires_python": message.get("Requires-Python") or release.requires_python}

    def wheel(self, release: Release, ranged: bool = False) -> WheelFiles:
        """The wheel's files: downloaded whole when small (and not `ranged`), else read member by member with
        range requests."""
        wheel = release.wheel
        if wheel is None:
            raise HarvestError(f"{release.name} {release.version}: no wheel on PyPI")
        whole = self.cache / "wheels" / release.name / wheel["filename"]
        if whole.exists() or (wheel["size"] <= WHOLE_WHEEL_BYTES and not ranged):
            data = self.cached(f"wheels/{release.name}/{wheel['filename']}", wheel["url"])
            return WheelFiles(zipfile.ZipFile(io.BytesIO(data)))
        blocks = self.cache / "blocks" / release.name / wheel["filename"]
        return WheelFiles(zipfile.ZipFile(_RangeFile(self, wheel["url"], wheel["size"], blocks)))


def _pick_wheel(wheels: list[dict]) -> dict | None:
    def rank(entry: dict) -> tuple[int, int]:
        name = entry["filename"]
        if name.endswith("-none-any.whl"):
            return (0, entry["size"])
        if "manylinux" in name and "x86_64" in name:
            return (1 if ("cp311" in name or "abi3" in name) else 2, entry["size"])
        return (3, entry["size"])
    usable = [w for w in wheels if not w.get("yanked")] or wheels
    return min(usable, key=rank, default=None)


def version_of(filename: str, name: str) -> Version | None:
    """The version in a wheel or sdist file name (`peft-0.13.2-py3-none-any.whl` -> 0.13.2)."""
    stem = filename
    for suffix in (".whl", ".tar.gz", ".zip", ".tar.bz2"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        return None
    parts = stem.split("-")
    if len(parts) < 2 or canonicalize_name(parts[0]) != name:
        return None
    try:
        return Version(parts[1])
    except InvalidVersion:
        return None


class WheelFiles:
    """Read access to a wheel's members."""

    def __init__(self, archive: zipfile.ZipFile):
        self.archive = archive
        self.names = frozenset(archive.namelist())

    def read(self, member: str) -> bytes:
        return self.archive.read(member)


class _RangeFile(io.RawIOBase):
    """A seekable, read-only view of a remote file, fetched in BLOCK-sized range requests (blocks kept on disk,
    so an interrupted run resumes without fetching them again)."""

    def __init__(self, fetcher: Fetcher, url: str, size: int, cache: Path):
        self.fetcher, self.url, self.size, self.cache = fetcher, url, size, cache
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _block(self, index: int) -> bytes:
        path = self.cache / str(index)
        if path.exists():
            return path.read_bytes()
        data = self.fetcher.get(self.url, (index * BLOCK, min((index + 1) * BLOCK, self.size)))
        write_atomic(path, data, redact_secrets=False)
        return data

    def readinto(self, buffer) -> int:
        if self.pos >= self.size:
            return 0
        want = min(len(buffer), self.size - self.pos)
        out = bytearray()
        while len(out) < want:
            index, offset = divmod(self.pos + len(out), BLOCK)
            out += self._block(index)[offset: offset + want - len(out)]
        buffer[: len(out)] = out
        self.pos += len(out)
        return len(out)

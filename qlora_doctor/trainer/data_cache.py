"""Tokenized data kept on disk, so that a rerun or a `--resume` does not tokenize again.

An entry is keyed by a sha256 over everything the tokenized rows depend on: the content of each data
file (a hub dataset: the fingerprint `datasets` gives the loaded rows), the data sections of the recipe
(paths, formats, fields, limits, weights, splits), training.max_seq_length and training.seed, the tokenizer
(its full serialized vocabulary, merges, normalizer and post-processor for a fast tokenizer, else its
vocabulary; its special tokens; the chat template in use), the versions of transformers, tokenizers and
datasets, and PIPELINE_VERSION (raised whenever this package changes what the pipeline produces).

    key = cache_key(parts)
    hit = load_entry(folder, key)          # (train, eval, stats) or None
    store_entry(folder, key, train, eval, stats)

Entries live under `<cache root>/tokenized/<key>/` (`train/`, `eval/` as `Dataset.save_to_disk`, and
`stats.json`); each is written to a temporary folder and renamed into place, so a reader sees a whole
entry or none. The MAX_ENTRIES most recently used are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qlora_doctor.core.fileio import apply_umask_modes, cache_root

PIPELINE_VERSION = 1
MAX_ENTRIES = 16
STATS_FILE = "stats.json"


def default_cache_dir() -> Path:
    return cache_root() / "tokenized"


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of `parts` (JSON with sorted keys) plus the pipeline and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("transformers", "tokenizers", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    blob = json.dumps({"pipeline": PIPELINE_VERSION, "versions": versions, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides how the tokenizer turns text into ids."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))  # vocabulary, merges, normalizer, pre/post-processors
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        digest.update(repr(getattr(tokenizer, "init_kwargs", {})).encode("utf-8"))
    digest.update(json.dumps({
        "class": type(tokenizer).__name__,
        "special": sorted(map(str, tokenizer.all_special_tokens)),
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def load_entry(folder: Path, key: str) -> tuple[Any, Any | None, dict[str, Any]] | None:
    """(train, eval or None, stats) stored under `key`, or None when there is no whole entry."""
    import datasets

    entry = folder / key
    try:
        stats = json.loads((entry / STATS_FILE).read_text(encoding="utf-8"))
        train = datasets.load_from_disk(str(entry / "train"))
        evaluation = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    except (OSError, ValueError, FileNotFoundError):
        return None  # absent, or damaged: tokenized again and stored anew
    try:
        os.utime(entry / STATS_FILE)  # most recently used
    except OSError:
        pass
    return train, evaluation, stats


def store_entry(folder: Path, key: str, train: Any, evaluation: Any | None, stats: dict[str, Any]) -> None:
    """Write the entry (temporary folder, then rename) and drop the least recently used beyond MAX_ENTRIES.
    A cache that cannot be written (read-only, full) is skipped: the run does not need it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=folder))
    except OSError:
        return
    try:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / STATS_FILE).write_text(json.dumps(stats, sort_keys=True), encoding="utf-8")
        apply_umask_modes(tmp)  # mkdtemp's folder is private
        os.replace(tmp, folder / key)
    except OSError:
        pass  # written by another process in the meantime (the rename found it), or the disk is full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(folder)


def _prune(folder: Path) -> None:
    entries = []
    for entry in folder.iterdir():
        stats = entry / STATS_FILE
        if not entry.name.startswith(".") and stats.is_file():
            entries.append((stats.stat().st_mtime, entry))
    for _, entry in sorted(entries, reverse=True)[MAX_ENTRIES:]:
        shutil.rmtree(entry, ignore_errors=True)

"""`python -m qlora_doctor.knowledge.harvest`: harvest, write the shipped data, and (with --bench) the measures.

Progress goes to the log (stderr); the files written are the output. Exit status 0, or 2 when PyPI could not
be read or the download budget was reached (the cache keeps what was fetched: rerun to resume)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
from pathlib import Path

from qlora_doctor.core.fileio import cache_root, write_atomic
from qlora_doctor.knowledge.harvest import (
    DEFAULT_PACKAGES,
    OUT_DIR,
    HarvestError,
    harvest,
    log,
)
from qlora_doctor.knowledge.harvest.facts import write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_doctor.knowledge.harvest", description=__doc__)
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--since", default="2023-01-01", help="first upload date of the releases read (YYYY-MM-DD)")
    parser.add_argument("--cache", type=Path, default=None, help="download cache (default: cache_root()/harvest)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where imports.json and requires.json go")
    parser.add_argument("--max-mb", type=float, default=4000.0, help="download budget of this run, in MB")
    parser.add_argument("--refresh-index", action="store_true", help="re-read PyPI's release lists")
    parser.add_argument("--bench", type=Path, default=None, help="write the run's measures (MB, seconds) here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cache = args.cache or cache_root() / "harvest"
    command = "python -m qlora_doctor.knowledge.harvest" + (
        "" if args.packages == list(DEFAULT_PACKAGES) else " --packages " + " ".join(args.packages)) + (
        "" if args.since == "2023-01-01" else f" --since {args.since}")
    try:
        result = harvest(tuple(args.packages), args.since, cache, args.max_mb, refresh_index=args.refresh_index)
    except HarvestError as err:
        log.error("harvest stopped: %s", err)
        return 2
    paths = write(args.out, result, args.since, command)
    imports = json.loads(paths["imports"].read_text())
    measures = {
        "command": shlex.join(["python", "-m", "qlora_doctor.knowledge.harvest", *argv]),
        "since": args.since,
        "packages": args.packages,
        "downloaded_mb": round(result.downloaded_bytes / 1e6, 1),
        "http_requests": result.requests,
        "seconds": round(result.seconds, 1),
        "cache_mb": round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6, 1),
        "releases_with_requirements": sum(len(v) for v in result.requires.values()),
        "releases_read_for_imports": {k: len(v) for k, v in result.sites.items()},
        "releases_read_for_definitions": {k: len(v) for k, v in result.defines.items()},
        "import_facts": len(imports["imports"]),
        "floor_facts": len(imports["floors"]),
        "imports_json_bytes": paths["imports"].stat().st_size,
        "requires_json_bytes": paths["requires"].stat().st_size,
        "skipped": result.skipped,
        "machine": f"{platform.machine()} {platform.python_version()}, cache {'warm' if result.downloaded_bytes < 1e8 else 'cold'}",
    }
    if args.bench:
        write_atomic(args.bench, json.dumps(measures, indent=2) + "\n")
    log.info("wrote %s and %s: %d import facts, %d floors; %.0f MB downloaded in %.0f s",
                 paths["imports"], paths["requires"], measures["import_facts"], measures["floor_facts"],
                 measures["downloaded_mb"], measures["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

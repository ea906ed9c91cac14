"""How long resolving a requirements file over the bundled snapshot takes offline (sources/snapshot.py), and how
often it agrees with uv resolving the same file against PyPI, for every file of the pin-set corpus
(tests/data/pinsets/, each at its `date` and Python; a Linux x86_64 CPU machine).

Per file, in a fresh process with no index reachable (QLORA_DOCTOR_OFFLINE=1):
- load_s: reading and parsing the snapshot (requires.json.gz, then Versions and specifiers) the first time;
- cold_s: the first resolution in that process (the snapshot loaded), warm_s: the same resolution again;
- cli_s: `qlora-doctor check --json -r FILE --resolver snapshot --as-of DATE --machine cpu.json`, end to end.

With `--uv-answers DIR` (JSON Resolutions written by `--record-uv DIR`, i.e. uv through
sources/resolve.resolve_requirements while PyPI answers), each file's snapshot packages are compared with uv's;
with `--uv-cache DIR` (the QLORA_DOCTOR_CACHE `--record-uv` filled), so are the failing checks of `check -r`.

    QLORA_DOCTOR_CACHE=/tmp/uv-cache python bench/snapshot_resolve.py --record-uv /tmp/uv-answers  # online
    python bench/snapshot_resolve.py --uv-answers /tmp/uv-answers --uv-cache /tmp/uv-cache \
        --out bench/results/snapshot_resolve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "pinsets"


def cases() -> list[tuple[str, str, str]]:
    """(file, as of, Python) for every corpus case; a Python the thread does not state is 3.11."""
    index = tomllib.loads((CORPUS / "index.toml").read_text())
    return [(c["file"], c["date"], c["python"] if str(c.get("python", "unknown")) != "unknown" else "3.11")
            for c in index["case"]]


def machine(python: str):
    from qlora_doctor.core.machine import machine_from_dict

    return machine_from_dict({"os": "linux", "arch": "x86_64", "python": python, "driver_version": None, "gpus": []},
                             "cpu")


def one(file: str, as_of: str, python: str) -> dict:
    """In this (fresh) process: load, cold and warm resolution of one file."""
    from qlora_doctor.sources.reqfile import prepare_requirements
    from qlora_doctor.sources.snapshot import resolve_prepared, snapshot_releases

    started = time.perf_counter()
    snapshot_releases()
    load_s = time.perf_counter() - started
    target = machine(python)
    prepared = prepare_requirements(CORPUS / file, target, lambda host, port: False)
    started = time.perf_counter()
    resolution = resolve_prepared(prepared, target, as_of=as_of)
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    resolve_prepared(prepared, target, as_of=as_of)
    warm_s = time.perf_counter() - started
    return {"load_s": round(load_s, 4), "cold_s": round(cold_s, 4), "warm_s": round(warm_s, 4),
            "error": resolution.error, "pins": resolution.pins, "unknown": list(resolution.unknown)}


def record_uv(directory: Path) -> None:
    from qlora_doctor.sources.resolve import resolve_requirements

    directory.mkdir(parents=True, exist_ok=True)
    for file, as_of, python in cases():
        resolution = resolve_requirements(CORPUS / file, machine(python), as_of=as_of)
        (directory / f"{file}.json").write_text(json.dumps({"file": file, "as_of": as_of, "python": python,
                                                            **resolution.to_json()}, indent=1))
        print(file, resolution.error or f"{len(resolution.pins)} packages", flush=True)


def compare(snapshot_answer: dict, uv: dict, names: set[str]) -> dict:
    """uv's versions of the snapshot's packages against the snapshot's answer."""
    if uv.get("error") or snapshot_answer["error"]:
        return {"uv_error": (uv.get("error") or "")[:200] or None, "snapshot_error": snapshot_answer["error"]}
    same, differ, unknown = [], {}, []
    for name in sorted(names & (set(uv["pins"]) | set(snapshot_answer["pins"]))):
        ours, theirs = snapshot_answer["pins"].get(name), uv["pins"].get(name)
        if ours == theirs:
            same.append(name)
        elif ours is None and name in snapshot_answer["unknown"]:
            unknown.append(name)
        else:
            differ[name] = {"uv": theirs, "snapshot": ours}
    return {"same": same, "differ": differ, "unknown_offline": unknown}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=3, metavar=("FILE", "AS_OF", "PYTHON"), help=argparse.SUPPRESS)
    parser.add_argument("--record-uv", type=Path, help="resolve every file with uv (online) into this folder")
    parser.add_argument("--uv-answers", type=Path, help="a --record-uv folder to compare with")
    parser.add_argument("--uv-cache", type=Path, help="QLORA_DOCTOR_CACHE holding uv's answers: compare verdicts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    if args.record_uv:
        record_uv(args.record_uv)
        return
    from qlora_doctor.sources.snapshot import snapshot_releases

    names = set(snapshot_releases()[0])
    env = {**os.environ, "QLORA_DOCTOR_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env["QLORA_DOCTOR_CACHE"] = str(Path(tmp) / "cache")
        for file, as_of, python in cases():
            done = subprocess.run([sys.executable, __file__, "--one", file, as_of, python], capture_output=True,
                                  text=True, env=env, cwd=REPO, timeout=300, check=False)
            measured = json.loads(done.stdout)
            target = Path(tmp) / f"cpu-{python}.json"
            target.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": python, "gpus": []}))
            started = time.perf_counter()
            cli = subprocess.run([sys.executable, "-m", "qlora_doctor.cli", "check", "--json", "-r", str(CORPUS / file),
                                  "--resolver", "snapshot", "--as-of", as_of, "--machine", str(target)],
                                 capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
            cli_s = time.perf_counter() - started
            report = json.loads(cli.stdout) if cli.stdout.startswith("{") else {}
            failing = sorted(c["id"] for c in report.get("checks", []) if c["status"] == "fail")
            resolved = next((c for c in report.get("checks", []) if c["id"] == "packages.resolved"), {})
            row = {"file": file, "as_of": as_of, "python": python, "load_s": measured["load_s"],
                   "cold_s": measured["cold_s"], "warm_s": measured["warm_s"], "cli_s": round(cli_s, 2),
                   "cli_exit": cli.returncode, "resolved": resolved.get("status"), "found": resolved.get("found"),
                   "error": measured["error"]}
            answer = args.uv_answers / f"{file}.json" if args.uv_answers else None
            if answer is not None and answer.is_file():
                row["vs_uv"] = compare(measured, json.loads(answer.read_text()), names)
            if args.uv_cache:  # the same check with uv's cached answer (PyPI reachable, no resolver run)
                online = subprocess.run(
                    [sys.executable, "-m", "qlora_doctor.cli", "check", "--json", "-r", str(CORPUS / file), "--as-of",
                     as_of, "--machine", str(target)], capture_output=True, text=True, cwd=REPO, timeout=600,
                    env={**os.environ, "QLORA_DOCTOR_CACHE": str(args.uv_cache)}, check=False)
                uv_report = json.loads(online.stdout) if online.stdout.startswith("{") else {}
                uv_failing = sorted(c["id"] for c in uv_report.get("checks", []) if c["status"] == "fail")
                row["failing_checks"] = {"same": failing == uv_failing, "snapshot": failing, "uv": uv_failing}
            rows.append(row)
            print(file, row["cold_s"], row["warm_s"], row["cli_s"], row.get("vs_uv", {}).get("differ"), flush=True)
    compared = [r["vs_uv"] for r in rows if "vs_uv" in r and "same" in r["vs_uv"]]
    result = {
        "command": "python bench/snapshot_resolve.py" + (f" --uv-answers {args.uv_answers}" if args.uv_answers else "")
                   + (f" --uv-cache {args.uv_cache}" if args.uv_cache else "")
                   + (f" --out {args.out}" if args.out else ""),
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": f"vm: {os.cpu_count()} CPUs (shared with other work), {platform.platform()}, Python "
                   f"{platform.python_version()}",
        "uv_answers": (f"{args.uv_answers}: {len(compared)} files resolved by "
                       + json.loads(next(args.uv_answers.glob("*.json")).read_text())["resolver"]
                       + " with PyPI reachable, as --record-uv does") if args.uv_answers else None,
        "snapshot": {"packages": len(names), "releases": sum(len(v) for v in snapshot_releases()[0].values()),
                     "newest_upload": snapshot_releases()[1]},
        "summary": {
            "files": len(rows),
            "load_s_median": statistics.median(r["load_s"] for r in rows),
            "cold_s_median": statistics.median(r["cold_s"] for r in rows),
            "cold_s_max": max(r["cold_s"] for r in rows),
            "warm_s_median": statistics.median(r["warm_s"] for r in rows),
            "warm_s_max": max(r["warm_s"] for r in rows),
            "cli_s_median": statistics.median(r["cli_s"] for r in rows),
            "cli_s_max": max(r["cli_s"] for r in rows),
            "snapshot_errors": sum(1 for r in rows if r["error"]),
            "compared_with_uv": len(compared),
            "identical_to_uv_on_snapshot_packages": sum(1 for c in compared
                                                        if not c["differ"] and not c["unknown_offline"]),
            "identical_except_unknown_offline": sum(1 for c in compared if not c["differ"] and c["unknown_offline"]),
            "differ_from_uv": sum(1 for c in compared if c["differ"]),
            "same_failing_checks_as_uv": sum(1 for r in rows if r.get("failing_checks", {}).get("same")),
            "failing_checks_compared": sum(1 for r in rows if "failing_checks" in r),
        },
        "cases": rows,
    }
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()

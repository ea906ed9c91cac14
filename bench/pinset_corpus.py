"""`check -r` on real pin sets (tests/data/pinsets/: 77 files from public projects and issue threads, each
with its source URL, date, Python, machine class and outcome): is each broken stack failed for the right
reason, and is each known-good stack not failed? Resolves each file as of its date (uv, network).

    python bench/pinset_corpus.py --out bench/results/pinset_corpus.json [--no-resolve | --resolver snapshot]
        [--only-held-out | --cases 55,61-65]

A broken case counts as right when the report fails and its expected rule is among the failures, or
the table check that judges the same fact (the rule's `judged_by`: `cuda.arch` for a Blackwell GPU under
an old torch build) failed; a `computed:IMPORTER:TARGET` rule is a computed import fact (knowledge/computed.py)
and counts when that check failed; for a `new:` rule not yet in the knowledge base, any failing check. A case
marked `kind = "code"` broke on the user's own script (an argument a release removed): from pins alone
`check` can only report it, so it counts as right when its rule is reported (a warning, or a fired note),
and is counted on its own line. A good case counts as right when the report does not fail; `pass` counts
how many of them pass outright. Cases marked `held_out = true` (or `added = "held-out"`) were added after the
product was tuned on the others and are also counted on their own; `--only-held-out` runs only them. `machine_file` (under tests/data/pinsets/) replaces the
machine class where the thread states the hardware (driver, GPU, OS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "pinsets"
MACHINES = REPO / "qlora_doctor" / "knowledge" / "data" / "machines"


def machine_file(case: dict, work: Path) -> Path:
    name = case.get("machine", "unknown")
    if (MACHINES / f"{name}.json").is_file():
        data = json.loads((MACHINES / f"{name}.json").read_text())
    else:
        # A thread that does not say which machine ran a QLoRA stack: an NVIDIA GPU every CUDA build
        # supports (A100, sm_80) with a driver that runs every CUDA up to 13.0 (580), so the judgement is
        # about the packages, not about a CPU the stack was never meant for.
        data = json.loads((MACHINES / "a100-550.json").read_text())
        data.update(driver_version="580.95.05", cuda_driver_version="13.0")
    if case.get("machine_file"):  # the thread states the hardware: its driver, GPU or OS
        data = json.loads((CORPUS / case["machine_file"]).read_text())
        name = Path(case["machine_file"]).stem
    python = str(case.get("python") or "")
    # a thread that does not say: the Python most such projects ran in 2023-2025
    if not case.get("machine_file") or python.replace(".", "").isdigit():
        data["python"] = f"{python}.0" if python.replace(".", "").isdigit() else "3.10.0"
    path = work / f"{name}-{data['python']}.json"
    path.write_text(json.dumps(data))
    return path


def judged_by() -> dict[str, str]:
    """rule id -> the table check that judges the same fact (the rule's row is folded into it when it fails)."""
    from qlora_doctor.knowledge.loading import load_rules

    return {r.id: r.judged_by for r in load_rules() if r.judged_by}


def judge(case: dict, report: dict | None, exit_code: int, table: dict[str, str]) -> tuple[bool, str]:
    if report is None:
        return False, f"no report (exit {exit_code})"
    failed = [c["id"] for c in report["checks"] if c["status"] == "fail"]
    if case["outcome"] == "good":
        return report["status"] != "fail", "failed: " + ", ".join(failed) if failed else report["status"]
    rule = case.get("rule", "")
    if case.get("kind") == "code":
        row = next((c for c in report["checks"] if c["id"] == f"rule:{rule}"), None)
        if row is None:
            return False, f"rule:{rule} not reported; failed: {', '.join(failed) or 'nothing'}"
        fired = row["status"] in ("warn", "fail") or row["title"].startswith("note")
        how = "note" if row["title"].startswith("note") else row["status"]
        return fired, f"rule:{rule} reported as {how}" + (f"; failed: {', '.join(failed)}" if failed else "")
    if rule.startswith("new:") or not rule:
        return bool(failed), ", ".join(failed) or "passed"
    same = [rule, *case.get("same_cause", [])]  # one cause split across rules by version (index.toml says why)
    # `computed:IMPORTER:TARGET` names a computed import fact (knowledge/computed.py): its check has that id
    right = any(r in failed if r.startswith("computed:") else f"rule:{r}" in failed or table.get(r) in failed
                for r in same)
    return right, ", ".join(failed) or "passed"


def is_held_out(case: dict) -> bool:
    return bool(case.get("held_out")) or case.get("added") == "held-out"


def case_numbers(spec: str) -> set[int]:
    """`--cases 1,5,55-65` -> {1, 5, 55, ..., 65} (the NN- prefix of each file)."""
    numbers: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise SystemExit(f"--cases {spec!r}: expected numbers and ranges like 1,5,55-65")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def selected(cases: list[dict], only_held_out: bool, spec: str | None) -> list[dict]:
    wanted = case_numbers(spec) if spec else None
    return [c for c in cases if (not only_held_out or is_held_out(c))
            and (wanted is None or int(c["file"].split("-", 1)[0]) in wanted)]


def tally(rows: list[dict]) -> str:
    return f"{sum(r['right'] for r in rows)}/{len(rows)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-resolve", action="store_true")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--only-held-out", action="store_true", help="only the cases marked held_out = true")
    parser.add_argument("--cases", help="only these cases, by number: 1,5,55-65")
    parser.add_argument("--resolver", choices=("auto", "snapshot"), default="auto",
                        help="check's --resolver: snapshot resolves offline over the bundled PyPI metadata (fast, "
                             "reproducible; packages outside it are judged unknown)")
    args = parser.parse_args()
    cases = selected(tomllib.loads((CORPUS / "index.toml").read_text())["case"], args.only_held_out, args.cases)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="pinset-machines-"))
    rows = []
    table = judged_by()
    for case in cases:
        argv = [sys.executable, "-m", "qlora_doctor.cli", "check", "--json", "-r", str(CORPUS / case["file"]),
                "--machine", str(machine_file(case, work))]
        argv += ["--no-resolve"] if args.no_resolve else ["--as-of", case["date"], "--resolver", args.resolver]
        started = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
            code, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired:
            code, out, err = None, "", "timed out"
        try:
            report = json.loads(out) if out.strip().startswith("{") and "checks" in out else None
        except ValueError:
            report = None
        right, what = judge(case, report, code if code is not None else -1, table)
        resolved = next((c["detail"] for c in (report or {}).get("checks", []) if c["id"] == "packages.resolved"), "")
        rows.append({"file": case["file"], "url": case["url"], "outcome": case["outcome"], "rule": case.get("rule"),
                     "kind": case.get("kind", "pins"), "added": "held-out" if is_held_out(case) else "tuned",
                     "status": (report or {}).get("status"), "right": right, "found": what, "exit_code": code, "seconds": round(time.perf_counter() - started, 1),
                     "resolved": resolved[:300], "error": err.strip().splitlines()[-1][:300] if err.strip() else ""})
        print(f"{'ok  ' if right else 'MISS'} {case['file']}: {what}", flush=True)
    broken = [r for r in rows if r["outcome"] == "broken"]
    good = [r for r in rows if r["outcome"] == "good"]
    held = [r for r in rows if r["added"] == "held-out"]
    summary = {"command": " ".join(sys.argv), "resolve": not args.no_resolve, "resolver": args.resolver,
               "broken_failed_for_the_right_reason": tally([r for r in broken if r["kind"] != "code"]),
               "broken_code_dependent_rule_reported": tally([r for r in broken if r["kind"] == "code"]),
               "broken_right_all": tally(broken),
               "good_not_failed": tally(good),
               "good_pass": f"{sum(r['status'] == 'pass' for r in good)}/{len(good)}",
               "held_out_broken_right": tally([r for r in held if r["outcome"] == "broken"]),
               "held_out_good_not_failed": tally([r for r in held if r["outcome"] == "good"]),
               "held_out_good_pass": f"{sum(r['status'] == 'pass' for r in held if r['outcome'] == 'good')}/"
                                     f"{sum(r['outcome'] == 'good' for r in held)}",
               "seconds": round(sum(r["seconds"] for r in rows), 1), "cases": rows}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}))


if __name__ == "__main__":
    main()

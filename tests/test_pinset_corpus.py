"""The real-world pin-set corpus (tests/data/pinsets/, issue #14) is well formed, and bench/pinset_corpus.py
judges its cases as its docstring says. Offline: the bench's network resolver never runs here; one test runs
`check` on every known-good set over the bundled PyPI snapshot (`--resolver snapshot`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "pinsets"
CASES = tomllib.loads((CORPUS / "index.toml").read_text(encoding="utf-8"))["case"]
MACHINES = {p.stem for p in (REPO / "qlora_doctor" / "knowledge" / "data" / "machines").glob("*.json")} | {"unknown"}


def bench():
    spec = importlib.util.spec_from_file_location("pinset_corpus", REPO / "bench" / "pinset_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_case_has_its_file_source_and_fields():
    files = [c["file"] for c in CASES]
    assert len(files) == len(set(files)) and len(files) >= 77
    numbers = [int(f.split("-", 1)[0]) for f in files]
    dropped = {86}  # a good case found unsatisfiable as one install after first sight (README, 78-89)
    assert numbers == [n for n in range(1, len(files) + len(dropped) + 1) if n not in dropped]
    on_disk = {p.name for p in CORPUS.glob("[0-9]*-*.txt")}
    assert on_disk == set(files)
    for case in CASES:
        where = case["file"]
        assert case["url"].startswith("https://github.com/"), where
        assert case["outcome"] in ("broken", "good"), where
        assert ("-good-" in where) == (case["outcome"] == "good"), where
        assert len(case["date"]) == 10 and case["date"][4] == "-", where
        assert case.get("machine", "unknown") in MACHINES or case.get("machine_file"), where
        first = (CORPUS / where).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#"), f"{where}: line 1 names the source file and commit"


def test_every_expected_rule_is_a_rule_a_computed_fact_or_a_proposal():
    from qlora_doctor.knowledge.loading import load_rules

    ids = {r.id for r in load_rules()}
    for case in CASES:
        if case["outcome"] == "good":
            assert case.get("rule", "none") == "none", case["file"]
            continue
        for rule in [case["rule"], *case.get("same_cause", [])]:
            assert rule in ids or rule.startswith(("new:", "computed:")), f"{case['file']}: {rule}"


def test_each_round_of_new_cases_keeps_some_held_out():
    """55-65, 78-89, 90-97, 98-111, 112-125, 126-131, 132-135, 136-140, 141-149, 150-155, 156-161, 162-169, 170-176,
    177-184, 185-189, 190-191, 192-205, 206-217, 218-229, 230-241, 242-252 and 253-264 were wholly held out (README); of 66-77, about a
    third (66-70): each scored once before any product change, broken and good alike."""
    bench_module = bench()

    def number(case):
        return int(case["file"].split("-", 1)[0])

    for low, high, share in ((55, 65, (1.0, 1.0)), (66, 77, (0.25, 0.5)), (78, 89, (1.0, 1.0)), (90, 97, (1.0, 1.0)),
                             (98, 111, (1.0, 1.0)), (112, 125, (1.0, 1.0)), (126, 131, (1.0, 1.0)),
                             (132, 135, (1.0, 1.0)), (136, 140, (1.0, 1.0)), (141, 149, (1.0, 1.0)),
                             (150, 155, (1.0, 1.0)), (156, 161, (1.0, 1.0)), (162, 169, (1.0, 1.0)),
                             (170, 176, (1.0, 1.0)), (177, 184, (1.0, 1.0)), (185, 189, (1.0, 1.0)),
                             (190, 191, (1.0, 1.0)), (192, 205, (1.0, 1.0)),
                             (206, 217, (1.0, 1.0)), (218, 229, (1.0, 1.0)),
                             (230, 241, (1.0, 1.0)), (242, 252, (1.0, 1.0)),
                             (253, 264, (1.0, 1.0))):
        cases = [c for c in CASES if low <= number(c) <= high]
        held = [c for c in cases if bench_module.is_held_out(c)]
        assert share[0] <= len(held) / len(cases) <= share[1], (low, high)
        assert {c["outcome"] for c in held} == {"broken", "good"}, (low, high)


@pytest.mark.parametrize("rule, failed, right", [
    ("computed:peft:transformers", ["computed:peft:transformers"], True),
    ("computed:peft:transformers", ["rule:peft-encoder-decoder-cache"], False),
    ("accel-dispatch-batches", ["rule:accel-dispatch-batches", "rule:peft-encoder-decoder-cache"], True),
    ("new:some-proposal", ["packages.training"], True),
])
def test_a_broken_case_is_right_when_its_rule_or_computed_fact_fails(rule, failed, right):
    case = {"outcome": "broken", "rule": rule}
    report = {"status": "fail", "checks": [{"id": c, "status": "fail", "title": c} for c in failed]}
    assert bench().judge(case, report, 1, {})[0] is right


def test_cases_are_selected_by_number_and_held_out_flag():
    module = bench()
    assert module.case_numbers("1,5,66-68") == {1, 5, 66, 67, 68}
    picked = module.selected(CASES, only_held_out=True, spec="60-70")
    assert picked and all(module.is_held_out(c) for c in picked)
    assert {int(c["file"][:2]) for c in picked} <= set(range(60, 71))


GOOD_FAILED_OVER_THE_SNAPSHOT = {
    # each explained in tests/data/pinsets/README.md: good for what they run, failed as QLoRA sets or as of their date
    "35-good-philschmid-sagemaker-run-qlora.txt",  # datasets' fsspec glob break, as the bench's network run says
    "175-good-kubeflow-llm-trainer-accelerate0280.txt",  # peft too old for 4-bit training (plain LoRA there)
    "226-good-llm4hw-torch211-tf4350-peft061.txt",  # numpy 2 under torch 2.1 as of the reply's date
    "227-good-csr2-trl083-tf4372.txt",  # accelerate 1.2 under transformers 4.37 as of the reply's date
}


def test_no_rule_fails_a_known_good_set_over_the_bundled_snapshot(tmp_path):
    """A rule whose [rule.when] is wider than its failure (an API a script may call, written as a fail) fails good
    sets; this run shows it without the network: `check -r` on every known-good case, resolved offline over the
    bundled snapshot as of the case's date, fails none but the documented exceptions."""
    import json
    import subprocess

    good = sorted(int(c["file"].split("-", 1)[0]) for c in CASES if c["outcome"] == "good")
    out = tmp_path / "good.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pinset_corpus.py"), "--resolver", "snapshot",
                           "--cases", ",".join(map(str, good)), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["cases"]
    assert len(rows) == len(good) >= 100
    failed = {r["file"]: r["found"] for r in rows if r["status"] == "fail"}
    assert set(failed) <= GOOD_FAILED_OVER_THE_SNAPSHOT, {f: failed[f] for f in set(failed) - GOOD_FAILED_OVER_THE_SNAPSHOT}

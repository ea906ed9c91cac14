"""pyproject's floors and caps for the training stack are the oldest and newest versions a passing matrix
record tested (issue #17): `pip install qlora-doctor[train]` can only give versions some record vouches
for, and a new record moves them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def versions_recorded(name: str) -> tuple[Version, Version]:
    versions = []
    for path in (REPO / "matrix-results").glob("*.json"):
        record = json.loads(path.read_text())
        if record["works"] and record["combination"].get("expect") == "pass" and name in record["freeze"]:
            versions.append(Version(Version(record["freeze"][name]).public))
    return min(versions), max(versions)


def test_train_extra_floors_and_caps_are_the_tested_range():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    reqs = {Requirement(line).name: Requirement(line) for line in extra}
    for name in STACK:
        oldest, newest = versions_recorded(name)
        spec = {s.operator: Version(s.version) for s in reqs[name].specifier}
        assert spec[">="] == oldest, (name, spec, oldest)
        assert spec["<"] == Version(f"{newest.major}.{newest.minor + 1}"), (name, spec, newest)


def test_the_readme_matrix_table_is_generated_from_the_records():
    from click.testing import CliRunner

    from qlora_doctor.cli import cli

    readme = (REPO / "README.md").read_text()
    begin = readme.index("<!-- matrix-table:")
    table = readme[readme.index("\n", begin) + 1: readme.index("<!-- /matrix-table -->")]
    assert table == CliRunner().invoke(cli, ["matrix", "report", "--markdown"]).stdout

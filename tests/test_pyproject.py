"""`check -r pyproject.toml[extra]` (sources/pyproject.py): a project's declared requirements judged like a
requirements file."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.core.errors import InputError
from qlora_doctor.sources.pyproject import _poetry_specifier, pyproject_requirements

PEP621 = """[project]
name = "My_Trainer"
version = "0.1.0"
dependencies = ["torch==2.6.0", "transformers==4.50.0", "peft==0.15.0", "accelerate==1.5.0"]

[project.optional-dependencies]
train = ["bitsandbytes==0.45.4", "datasets==3.4.0"]
ui = ["gradio==4.44.0"]
all = ["my-trainer[train,ui]"]
"""


def lines(path):
    return path.read_text().splitlines()[1:]


def test_pep621_dependencies_and_extras_followed_through_the_project_itself(tmp_path):
    project = tmp_path / "pyproject.toml"
    project.write_text(PEP621)
    base, what = pyproject_requirements(project, tmp_path / "cache")
    assert lines(base) == ["torch==2.6.0", "transformers==4.50.0", "peft==0.15.0", "accelerate==1.5.0"]
    every, what = pyproject_requirements(tmp_path / "pyproject.toml[all]", tmp_path / "cache")
    assert lines(every)[4:] == ["bitsandbytes==0.45.4", "datasets==3.4.0", "gradio==4.44.0"]
    assert what.endswith("with extras all")
    with pytest.raises(InputError, match=r"no extra 'gpu' .*it has: all, train, ui"):
        pyproject_requirements(tmp_path / "pyproject.toml[gpu]", tmp_path / "cache")
    assert pyproject_requirements(tmp_path / "requirements.txt", tmp_path / "cache") is None


@pytest.mark.parametrize("poetry, pep440", [
    ("^4.36.2", ">=4.36.2,<5"), ("^0.7.1", ">=0.7.1,<0.8"), ("^0.0.3", ">=0.0.3,<0.0.4"), ("~1.2.3", ">=1.2.3,<1.3"),
    ("2.1.0", "==2.1.0"), ("*", ""), (">=0.41,<0.42", ">=0.41,<0.42"),
])
def test_poetry_ranges_read_as_poetry_reads_them(poetry, pep440):
    assert _poetry_specifier(poetry) == pep440


def test_poetry_project_with_an_extra(tmp_path):
    project = tmp_path / "pyproject.toml"
    project.write_text('[tool.poetry]\nname = "x"\n[tool.poetry.dependencies]\npython = "^3.10"\n'
                       'transformers = "^4.36.2"\nbitsandbytes = { version = "0.41.3", optional = true }\n'
                       '[tool.poetry.extras]\nquant = ["bitsandbytes"]\n')
    path, _ = pyproject_requirements(tmp_path / "pyproject.toml[quant]", tmp_path / "cache")
    assert lines(path) == ["transformers>=4.36.2,<5", "bitsandbytes==0.41.3"]


def test_check_judges_a_pyproject_with_its_extra(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PEP621.replace("gradio==4.44.0", "gradio==4.44.0\", \"huggingface-hub==1.1.0"))
    args = ["check", "-r", f"{tmp_path / 'pyproject.toml'}[ui]", "--resolver", "snapshot", "--as-of", "2025-11-16",
            "--machine", "a100", "--json"]
    report = json.loads(CliRunner().invoke(cli, args).stdout)
    resolved = next(c for c in report["checks"] if c["id"] == "packages.resolved")
    assert resolved["detail"].startswith("[project] dependencies of") and "with extras ui" in resolved["detail"]
    assert "rule:hub-hffolder-gradio" in [c["id"] for c in report["checks"] if c["status"] == "fail"]

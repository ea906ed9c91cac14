"""Installed like any package: the wheel, in a fresh virtual environment, run from a folder outside the
checkout, finds everything it reads at run time (recipes with their data, matrix.yaml, matrix records,
lockfiles, the knowledge base) inside the package (issue #17).

The fresh environment gets only the wheel; its dependencies come from this test environment through a
.pth file, so nothing is downloaded but the build backend (pip's isolated build) and the editable
install of the checkout stays invisible to it.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.trainer_support import builtin_checkpoint  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("qlora_doctor-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel (dependencies reached through a .pth); returns its bin folder."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = env / "bin" / "python"
    # the venv's seeded setuptools (65 on 3.11) would shadow the one torch declares (>= 77) in the test deps
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], capture_output=True, timeout=300)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {p for p in site.getsitepackages()} | {sysconfig.get_paths()["purelib"]}
    Path(purelib, "test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return env / "bin"


def run(bin_dir: Path, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QLORA_DOCTOR_RESULTS")}
    return subprocess.run([str(bin_dir / "qlora-doctor"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_what_the_tool_reads(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "qlora_doctor/shipped/recipes/demo.yaml" in names
    assert any(n.startswith("qlora_doctor/shipped/recipes/data/demo/") for n in names)
    assert "qlora_doctor/shipped/matrix.yaml" in names
    assert any(n.startswith("qlora_doctor/shipped/matrix-results/") and n.endswith(".json") for n in names)
    assert any(n.startswith("qlora_doctor/shipped/lockfiles/") for n in names)
    assert "qlora_doctor/knowledge/data/rules/hardware.toml" in names
    assert "qlora_doctor/recipe/builtin_configs/smollm2-135m-instruct.json" in names
    assert "qlora_doctor/knowledge/data/machines/t4-550.json" in names


def test_installed_wheel_imports_itself_not_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import qlora_doctor; print(qlora_doctor.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert not where.startswith(str(REPO)), where


def test_check_validate_plan_lock_and_report_from_the_wheel(installed, tmp_path):
    check = run(installed, "check", "--json", cwd=tmp_path)
    assert check.returncode in (0, 1), check.stderr
    report = json.loads(check.stdout)
    assert report["tested"]["status"] in ("tested", "untested")
    assert run(installed, "validate", "demo", cwd=tmp_path).returncode == 0
    plan = run(installed, "plan", "demo", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    matrix = run(installed, "matrix", "report", cwd=tmp_path)
    assert matrix.returncode == 0, matrix.stderr
    assert "cpu-tf5.24-peft0.21.2-bnb0.50.2" in matrix.stdout
    lock = run(installed, "lock", "--machine", str(REPO / "lockfiles" / "machines" / "linux-x86_64-py3.11-cpu.json"),
               cwd=tmp_path)
    assert lock.returncode == 0, lock.stderr
    assert "transformers==" in lock.stdout
    t4 = run(installed, "lock", "--machine", "t4", cwd=tmp_path)  # a preset the wheel carries
    assert t4.returncode == 0, t4.stderr
    assert "+cu12" in t4.stdout and "Tesla T4" in t4.stdout


def test_run_demo_from_the_wheel(installed, tmp_path, builtin_checkpoint):
    result = run(installed, "run", "demo", "--set", "training.max_steps=2",
                 cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "runs" / "demo"
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"

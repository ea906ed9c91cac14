"""Broken environments, built for real: half-installed packages on sys.path, a torch whose import raises,
no NVML library, NVML that fails or hangs mid-query, an nvidia-smi that hangs, lies or loses its GPU.

What must hold: `check` reports `unknown` or `fail` with the reason, stays within its time bound, and
exits normally (0 or 1, never a traceback); `check` without `--smoke` never imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from qlora_doctor.sources import machine as machine_mod
from qlora_doctor.doctor.diagnose import diagnose
from qlora_doctor.sources.machine import probe_machine
from qlora_doctor.sources.installed import installed_environment

from helpers import machine

REPO = Path(__file__).resolve().parent.parent


# --- helpers ----------------------------------------------------------------------------------------

def fake_nvidia_smi(folder: Path, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return exe


@pytest.fixture
def no_gpu_probes(tmp_path, monkeypatch):
    """PATH without nvidia-smi, no /proc driver file, and NVML's library missing, as on a CPU box."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr(machine_mod, "PROC_DRIVER_VERSION", tmp_path / "no-proc-driver-version")
    return bin_dir


def install_fake_pynvml(monkeypatch, **overrides):
    """A `pynvml` module in sys.modules that answers like a 1-2 GPU machine unless told otherwise.
    Errors are the real pynvml error classes, so the messages are the driver's."""
    import pynvml as real

    class Memory:
        total, free = 81920 * 2**20, 80000 * 2**20

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    fake.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12040
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda handle: "NVIDIA A100-SXM4-80GB"
    fake.nvmlDeviceGetMemoryInfo = lambda handle: Memory()
    fake.nvmlDeviceGetCudaComputeCapability = lambda handle: (8, 0)
    for name, value in overrides.items():
        setattr(fake, name, value)
    fake.real = real
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def raiser(error: BaseException):
    def call(*args, **kwargs):
        raise error
    return call


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """`qlora-doctor ARGS` in a fresh interpreter (the way a user runs it), timed."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qlora_doctor.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)
    return proc, time.perf_counter() - start


def clean_env(tmp_path: Path, pythonpath: list[Path] = (), path_dirs: list[Path] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QLORA_DOCTOR_MACHINE", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(REPO)])
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env["HOME"] = str(tmp_path)
    return env


# --- NVML -------------------------------------------------------------------------------------------

def test_no_nvml_library_is_a_note_and_the_probe_goes_on(no_gpu_probes, monkeypatch):
    """The real pynvml, with libnvidia-ml.so.1 missing (CDLL fails, as on a machine without a driver)."""
    import pynvml

    def no_library(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", no_library)
    m = probe_machine()
    assert m.gpus == () and m.gpu_vendor == "none" and m.driver_version is None
    assert any(n.startswith("NVML: no NVIDIA driver library") and "NVML Shared Library Not Found" in n
               for n in m.notes), m.notes
    check = {c.id: c for c in diagnose(m).checks}["machine.gpu"]
    assert check.status == "warn" and "NVML Shared Library Not Found" in check.detail


def test_pynvml_whose_import_raises_is_a_note(no_gpu_probes, monkeypatch, tmp_path):
    broken = tmp_path / "broken-site"
    broken.mkdir()
    (broken / "pynvml.py").write_text("raise ImportError('libnvidia-ml.so.1: wrong ELF class: ELFCLASS32')\n")
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.syspath_prepend(str(broken))
    m = probe_machine()
    assert m.gpus == ()
    assert any("pynvml not importable (ImportError: libnvidia-ml.so.1: wrong ELF class" in n for n in m.notes), m.notes


def test_gpu_that_vanishes_during_the_nvml_query_keeps_the_others(no_gpu_probes, monkeypatch):
    """Two GPUs counted, the second lost before its handle is read (Xid 79): the first is reported,
    the second is a note naming the driver's error."""
    import pynvml

    def handle(i):
        if i == 1:
            raise pynvml.NVMLError_GpuIsLost()
        return i

    install_fake_pynvml(monkeypatch, nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=handle)
    m = probe_machine()
    assert [g.name for g in m.gpus] == ["NVIDIA A100-SXM4-80GB"]
    assert m.driver_version == "550.54.15" and m.cuda_driver_version == "12.4"
    assert any("GPU 1 unreadable" in n and "GPU is lost" in n for n in m.notes), m.notes


def test_nvml_failing_mid_query_falls_back_to_nvidia_smi(no_gpu_probes, monkeypatch, data_dir):
    """NVML initialises, then the driver-version query fails: the probe notes it and gets the GPUs and
    driver from nvidia-smi instead."""
    import pynvml

    install_fake_pynvml(monkeypatch, nvmlSystemGetDriverVersion=raiser(pynvml.NVMLError_Unknown()))
    csv = (data_dir / "nvidia-smi-2xA100.csv").read_text()
    fake_nvidia_smi(no_gpu_probes, f'case "$1" in --query-gpu=*) printf "{csv}";;\n'
                                   f'*) cat "{data_dir / "nvidia-smi-header.txt"}";; esac\n')
    m = probe_machine()
    assert [g.name for g in m.gpus] == ["NVIDIA A100-SXM4-80GB"] * 2
    assert m.driver_version == "550.54.15"
    assert any(n.startswith("NVML: query failed") and "Unknown Error" in n for n in m.notes), m.notes


def test_nvml_that_hangs_is_abandoned_within_its_bound(no_gpu_probes, monkeypatch):
    monkeypatch.setattr(machine_mod, "NVML_TIMEOUT_S", 0.3)
    install_fake_pynvml(monkeypatch, nvmlInit=lambda: time.sleep(30))
    start = time.perf_counter()
    m = probe_machine()
    assert time.perf_counter() - start < 3
    assert m.gpus == () and any("NVML: no answer within 0.3 s" in n for n in m.notes), m.notes


# --- nvidia-smi -------------------------------------------------------------------------------------

def test_nvidia_smi_lists_a_gpu_then_errors(no_gpu_probes, monkeypatch, data_dir):
    """The GPU falls off the bus between two nvidia-smi calls: the GPU read first is kept, the
    failure is a note with nvidia-smi's own message, and `check` still judges the machine."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: NVML absent
    csv = (data_dir / "nvidia-smi-h100.csv").read_text()
    fake_nvidia_smi(no_gpu_probes, f'case "$1" in --query-gpu=*) printf "{csv}";;\n'
                                   '*) echo "Unable to determine the device handle for GPU0000:01:00.0: '
                                   'GPU is lost.  Reboot the system to recover this GPU" >&2; exit 15;; esac\n')
    m = probe_machine()
    assert len(m.gpus) == 1 and m.gpus[0].compute_capability == "9.0"
    assert m.cuda_driver_version is None
    assert any("nvidia-smi exited 15" in n and "GPU is lost" in n for n in m.notes), m.notes
    report = diagnose(m)
    assert {c.id: c for c in report.checks}["machine.gpu"].status == "pass"


def test_nvidia_smi_that_lost_every_gpu_makes_the_gpu_check_unknown(no_gpu_probes, monkeypatch, data_dir):
    """The driver answers (header, /proc) but every GPU query fails: `check` says unknown, and why."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    fake_nvidia_smi(no_gpu_probes, 'case "$1" in --query-gpu=*) echo "No devices were found" >&2; exit 6;;\n'
                                   f'*) cat "{data_dir / "nvidia-smi-header.txt"}";; esac\n')
    m = probe_machine()
    assert m.gpus == () and m.gpu_vendor == "nvidia" and m.driver_version == "580.159.04"
    check = {c.id: c for c in diagnose(m).checks}["machine.gpu"]
    assert check.status == "unknown"
    assert "No devices were found" in check.detail and "nvidia-smi" in check.fix


def test_nvidia_smi_that_is_not_executable_is_a_note(no_gpu_probes, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    exe = fake_nvidia_smi(no_gpu_probes, "exit 0\n")
    exe.write_bytes(b"\x7fELF\x02\x01\x01garbage")  # an executable file the kernel refuses to run
    m = probe_machine()
    assert m.gpus == () and any(n.startswith("nvidia-smi: [Errno 8] Exec format error") for n in m.notes), m.notes


def test_hanging_nvidia_smi_costs_one_timeout_in_total(no_gpu_probes, monkeypatch):
    """Three nvidia-smi calls (new query, old query, header), each of which would hang: together they
    get NVIDIA_SMI_TIMEOUT_S, not three times it."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(machine_mod, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    fake_nvidia_smi(no_gpu_probes, "exec sleep 30\n")
    start = time.perf_counter()
    m = probe_machine()
    assert time.perf_counter() - start < 1.5
    assert any("no answer within 0.5 s" in n for n in m.notes)
    assert any("s were used up" in n for n in m.notes), m.notes


def test_check_as_a_subprocess_is_bounded_with_hanging_nvml_and_nvidia_smi(tmp_path):
    """The real command with the real time bounds: NVML hangs in nvmlInit and nvidia-smi never answers.
    `check --json` still exits normally, with both stalls reported, within the documented bound."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "pynvml.py").write_text("import time\n\ndef nvmlInit():\n    time.sleep(120)\n")
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, "exec sleep 120\n")
    req = tmp_path / "req.txt"
    req.write_text("torch==2.5.1+cu124\ntransformers==4.46.3\npeft==0.13.2\nbitsandbytes==0.45.0\n"
                   "accelerate==1.1.1\ndatasets==3.1.0\n")
    proc, seconds = run_cli("check", "--json", "--no-resolve", "-r", str(req), env=clean_env(tmp_path, [site], [bin_dir]))
    bound = machine_mod.NVML_TIMEOUT_S + machine_mod.NVIDIA_SMI_TIMEOUT_S
    assert bound <= 10
    assert seconds < bound + 4, f"check took {seconds:.1f} s with hanging probes (bound {bound:g} s + start-up)"
    assert proc.returncode in (0, 1), proc.stderr
    notes = json.loads(proc.stdout)["machine"]["notes"]
    assert any(n.startswith("NVML: no answer within") for n in notes), notes
    assert any(n.startswith("nvidia-smi: no answer within") for n in notes), notes


# --- packages: missing or corrupt metadata ----------------------------------------------------------

def test_half_installed_and_corrupt_packages_are_reported_broken(tmp_path, monkeypatch):
    """A site-packages with a dist-info that lost its METADATA (pip killed mid-install), one with an
    unparseable version, and a torch whose METADATA is not UTF-8: each is named as broken, torch's build
    is unknown, and the report says how to repair them."""
    site = tmp_path / "site-packages"
    (site / "bitsandbytes-0.45.0.dist-info").mkdir(parents=True)
    (site / "bitsandbytes-0.45.0.dist-info" / "RECORD").write_text("bitsandbytes/__init__.py,,\n")
    (site / "peft-0.13.2.dist-info").mkdir()
    (site / "peft-0.13.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.13.2-broken!\n")
    (site / "torch-2.5.1.dist-info").mkdir()
    (site / "torch-2.5.1.dist-info" / "METADATA").write_bytes(b"Name: torch\nVersion: \xff\xfe2.5.1\n")
    monkeypatch.setattr(sys, "path", [str(site)])
    env = installed_environment()
    monkeypatch.undo()
    assert set(env.packages) == {"bitsandbytes", "peft", "torch"}
    assert "metadata is missing or corrupt" in env.packages["bitsandbytes"].problem
    assert "is not a valid version" in env.packages["peft"].problem
    assert env.packages["torch"].version is None and env.packages["torch"].problem
    report = diagnose(machine(), env=env)
    checks = {c.id: c for c in report.checks}
    broken = checks["packages.broken"]
    assert broken.status == "fail" and report.status == "fail"
    for name in ("bitsandbytes", "peft", "torch"):
        assert name in broken.detail and name in broken.fix
    assert checks["torch.build"].status == "unknown"


def test_check_cli_on_a_site_with_a_half_installed_package(tmp_path):
    """The same through the command, in a fresh interpreter whose sys.path starts with the broken site."""
    site = tmp_path / "site"
    (site / "half_installed_pkg-1.0.dist-info").mkdir(parents=True)
    (site / "garbled-2.0.dist-info").mkdir()
    (site / "garbled-2.0.dist-info" / "METADATA").write_bytes(bytes(range(256)))
    machine_file = tmp_path / "m.json"
    machine_file.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "gpus": []}))
    proc, _ = run_cli("check", "--json", "--machine", str(machine_file), env=clean_env(tmp_path, [site]))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    checks = {c["id"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["packages.broken"]["status"] == "fail"
    assert "half-installed-pkg" in checks["packages.broken"]["detail"]
    assert "garbled" in checks["packages.broken"]["detail"]


# --- torch whose import raises ----------------------------------------------------------------------

@pytest.fixture
def exploding_torch(tmp_path) -> tuple[Path, Path]:
    """A `torch` package earlier on sys.path whose import records itself and raises, like a torch
    built for a CUDA the machine lacks."""
    site = tmp_path / "exploding-site"
    (site / "torch").mkdir(parents=True)
    marker = tmp_path / "torch-was-imported"
    (site / "torch" / "__init__.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text(str(os.getpid()))\n"
        "raise OSError('libcudnn.so.9: cannot open shared object file: No such file or directory')\n")
    return site, marker


def test_check_and_explain_never_import_torch(tmp_path, exploding_torch):
    site, marker = exploding_torch
    env = clean_env(tmp_path, [site])
    machine_file = tmp_path / "m.json"
    machine_file.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "gpus": []}))
    proc, _ = run_cli("check", "--json", "--machine", str(machine_file), env=env)
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["packages"]["torch"]  # torch's version was still read, from metadata
    proc, _ = run_cli("check", "--machine", str(machine_file), env=env)
    assert proc.returncode in (0, 1) and "result" in proc.stdout, proc.stderr
    paste = tmp_path / "paste.txt"
    paste.write_text("hello world\n")
    proc, _ = run_cli("explain", str(paste), env={**env}, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert not marker.exists(), "check/explain imported torch"


def test_check_smoke_with_a_broken_torch_fails_with_the_reason(tmp_path, exploding_torch):
    site, marker = exploding_torch
    machine_file = tmp_path / "m.json"
    machine_file.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.11.7", "gpus": []}))
    proc, _ = run_cli("check", "--json", "--smoke", "--machine", str(machine_file), env=clean_env(tmp_path, [site]),
                      timeout=120)
    assert proc.returncode == 1, proc.stderr
    smoke = {c["id"]: c for c in json.loads(proc.stdout)["checks"]}["smoke"]
    assert smoke["status"] == "fail"
    assert "libcudnn.so.9: cannot open shared object file" in smoke["detail"]
    assert marker.exists(), "the smoke test's child process is the one that imports torch"

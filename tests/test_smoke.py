"""The smoke test runs for real on the CPU (seconds); its judge is tested on captured process outputs."""

from __future__ import annotations

import json
import sys

import pytest

from qlora_doctor.smoke.judge import judge_smoke, parse_smoke_output, run_smoke_process
from qlora_doctor.core.subprocs import Completed
from qlora_doctor.smoke.functional import NF4_MEAN_ABS_ERROR_MAX, TRAIN_STEPS, run_smoke

STEPS = ["torch.device", "bnb.library", "bnb.nf4_roundtrip", "bnb.linear4bit_lora", "model.load_4bit",
         "peft.prepare_kbit", "peft.attach_lora", "train.loss_decreases", "adapter.save", "adapter.reload",
         "generate"]


@pytest.fixture(scope="module")
def cpu_result():
    return run_smoke(device="cpu")


def test_smoke_passes_on_cpu_with_every_step(cpu_result):
    failed = cpu_result.failed_step
    assert cpu_result.status == "pass", failed and failed.error
    assert [s.name for s in cpu_result.steps] == STEPS
    assert all(s.status == "pass" for s in cpu_result.steps)
    assert cpu_result.device == "cpu"
    assert cpu_result.facts["compute_dtype"] == "float32"


def test_smoke_measures_what_it_claims(cpu_result):
    facts = cpu_result.facts
    assert facts["bnb_library"] and "libbitsandbytes" in facts["bnb_library"]
    assert 0.01 < facts["nf4_mean_abs_error"] <= NF4_MEAN_ABS_ERROR_MAX
    assert facts["linear4bit_layers"] == 14
    assert len(cpu_result.losses) == TRAIN_STEPS
    assert cpu_result.losses[-1] < cpu_result.losses[0]
    assert facts["reload_max_logit_diff"] <= 1e-3
    assert cpu_result.versions["bitsandbytes"] and cpu_result.versions["peft"]


def test_smoke_json_round_trips_through_the_parser(cpu_result):
    text = "noise a library printed\n" + json.dumps(cpu_result.to_json(), indent=2)
    data = parse_smoke_output(text)
    assert data is not None and data["status"] == "pass"
    check = judge_smoke(Completed(0, text, ""), 60)
    assert check.status == "pass"
    assert "NF4 round-trip" in check.detail and "libbitsandbytes" in check.detail


def test_asking_for_a_missing_cuda_device_fails_the_first_step_and_skips_the_rest():
    result = run_smoke(device="cuda:0") if not _cuda() else pytest.skip("this machine has CUDA")
    assert result.status == "fail"
    assert result.steps[0].status == "fail" and "cuda.is_available() is False" in result.steps[0].detail
    assert {s.status for s in result.steps[1:]} == {"skip"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_a_hang_is_a_failed_check_not_a_hung_doctor():
    proc = run_smoke_process(1.5, [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"])
    assert proc.returncode is None
    check = judge_smoke(proc, 1.5)
    assert check.status == "fail" and "hung" in check.detail and "loading" in check.detail


def test_a_crash_is_a_failed_check_with_the_output_excerpt():
    crash = Completed(-11, "", "Fatal Python error: Segmentation fault\n  File bitsandbytes/cextension.py")
    check = judge_smoke(crash, 60)
    assert check.status == "fail"
    assert "killed by signal 11" in check.detail and "Segmentation fault" in check.detail


def test_a_failing_step_is_named_with_its_error():
    data = {"status": "fail", "device": "cuda:0", "losses": [], "facts": {},
            "steps": [{"name": "torch.device", "status": "pass", "detail": "", "error": ""},
                      {"name": "bnb.library", "status": "fail", "detail": "RuntimeError: No compatible CUDA binary",
                       "error": "Traceback ...\nRuntimeError: No compatible CUDA binary"}]}
    check = judge_smoke(Completed(1, json.dumps(data), ""), 60)
    assert check.status == "fail"
    assert check.detail.startswith("step bnb.library failed: RuntimeError: No compatible CUDA binary")
    assert check.found == "bnb.library"

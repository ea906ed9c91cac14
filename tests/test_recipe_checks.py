"""Recipe checks judged on described machines (the --machine format), through `recipe_checks`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.runplan import build_run_plan
from qlora_doctor.doctor.recipe import (RECIPE_CHECKS, compute_dtype_check, mixed_precision_check,
    optimizer_device_check, recipe_checks, trust_remote_code_check)
from qlora_doctor.recipe.schema import apply_overrides, load_recipe
from qlora_doctor.recipe.precision import resolve_precision

from helpers import CPU_MACHINE, machine, write_machine

T4 = [{"name": "Tesla T4", "compute_capability": "7.5", "memory_total_mib": 15360}]
A100 = [{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_total_mib": 81920}]
UNKNOWN_CC = [{"name": "NVIDIA Mystery GPU", "memory_total_mib": 16384}]


def recipe(*overrides: str):
    return apply_overrides(load_recipe("demo"), list(overrides)) if overrides else load_recipe("demo")


def by_id(checks, check_id: str):
    matching = [c for c in checks if c.id == check_id]
    assert len(matching) == 1, [c.id for c in checks]
    return matching[0]


def test_bf16_on_a_t4_fails_with_the_fp16_fix():
    check = by_id(recipe_checks(recipe("training.bf16=true"), machine(gpus=T4)), "recipe.precision")
    assert check.status == "fail"
    assert "7.5" in check.detail and "8.0" in check.detail
    assert "training.bf16: false, training.fp16: true" in check.fix
    assert check.sources


def test_bf16_on_an_a100_passes():
    check = by_id(recipe_checks(recipe("training.bf16=true"), machine(gpus=A100)), "recipe.precision")
    assert check.status == "pass", check


def test_auto_on_a_t4_passes_with_fp16():
    check = by_id(recipe_checks(recipe(), machine(gpus=T4)), "recipe.precision")
    assert check.status == "pass" and check.expected == "fp16" and "chosen by auto" in check.detail


@pytest.mark.parametrize("overrides", [(), ("training.bf16=true",), ("training.fp16=true",)])
def test_unknown_compute_capability_is_unknown_never_pass(overrides):
    check = by_id(recipe_checks(recipe(*overrides), machine(gpus=UNKNOWN_CC)), "recipe.precision")
    assert check.status == "unknown"
    assert "NVIDIA Mystery GPU" in check.detail and "compute_cap" in check.fix


@pytest.mark.parametrize("key", ["fp16", "bf16"])
def test_half_precision_on_cpu_warns(key):
    check = by_id(recipe_checks(recipe(f"training.{key}=true"), machine(**CPU_MACHINE)), "recipe.precision")
    assert check.status == "warn" and f"training.{key}: auto" in check.fix


def test_auto_on_cpu_passes_in_float32():
    checks = recipe_checks(recipe(), machine(**CPU_MACHINE))
    assert by_id(checks, "recipe.precision").status == "pass"
    compute = by_id(checks, "recipe.compute_dtype")
    assert compute.status == "pass" and compute.expected == "float32"


@pytest.mark.parametrize("gpus, dtype, status", [
    (T4, "bfloat16", "warn"),      # no bf16 tensor cores: emulated
    (T4, "float16", "pass"),
    (A100, "bfloat16", "pass"),
    (A100, "float32", "warn"),     # slow 4-bit matmuls
    (UNKNOWN_CC, "bfloat16", "unknown"),
    ([], "float16", "warn"),       # CPU
])
def test_compute_dtype_against_the_gpu(gpus, dtype, status):
    m = machine(gpus=gpus) if gpus else machine(**CPU_MACHINE)
    overrides = [f"quantization.bnb_4bit_compute_dtype={dtype}"]
    if gpus == A100 and dtype == "float32":
        overrides.append("training.bf16=false")  # float32 training: no mismatch, only the speed warning
    check = by_id(recipe_checks(recipe(*overrides), m), "recipe.compute_dtype")
    assert check.status == status, check


def test_compute_dtype_that_differs_from_training_precision_warns():
    check = by_id(recipe_checks(recipe("quantization.bnb_4bit_compute_dtype=float16"), machine(gpus=A100)),
                  "recipe.compute_dtype")
    assert check.status == "warn" and "bfloat16" in check.detail and check.expected == "bfloat16"


def test_no_compute_dtype_check_without_4bit():
    checks = recipe_checks(recipe("quantization.load_in_4bit=false"), machine(gpus=A100))
    assert not [c for c in checks if c.id == "recipe.compute_dtype"]


def judge(check, r, m):
    """One check on its own, on the run plan `check --recipe` would build (offline)."""
    return check(build_run_plan(r, m, where="test"), m)


def test_trust_remote_code_warns_and_names_the_model_repo():
    r = apply_overrides(load_recipe("qwen2.5-1.5b-chat-t4"), ["model.trust_remote_code=true"])
    check = judge(trust_remote_code_check, r, machine(gpus=T4))
    assert check.status == "warn"
    assert "Qwen/Qwen2.5-1.5B-Instruct" in check.detail and "not pinned" in check.detail
    pinned = apply_overrides(r, ["model.revision=abc123"])
    assert "pinned to revision 'abc123'" in judge(trust_remote_code_check, pinned, machine(gpus=T4)).detail


def test_trust_remote_code_false_passes():
    assert by_id(recipe_checks(recipe(), machine(gpus=T4)), "recipe.trust_remote_code").status == "pass"


def test_paged_optimizer_without_gpu_fails_and_with_gpu_is_not_judged():
    r = recipe("training.optim=paged_adamw_8bit")
    check = by_id(recipe_checks(r, machine(**CPU_MACHINE)), "recipe.optimizer")
    assert check.status == "fail" and "training.optim: adamw_torch" in check.fix
    assert not [c for c in recipe_checks(r, machine(gpus=A100)) if c.id == "recipe.optimizer"]
    torchao = recipe("training.optim=adamw_torch_8bit")  # torchao, not bitsandbytes
    assert not [c for c in recipe_checks(torchao, machine(**CPU_MACHINE)) if c.id == "recipe.optimizer"]


def test_checks_are_an_extensible_list():
    assert len(recipe_checks(recipe(), machine(gpus=A100))) <= len(RECIPE_CHECKS)
    assert all(callable(c) for c in RECIPE_CHECKS)


def test_every_shipped_recipe_is_judged_without_error_on_t4_a100_and_cpu():
    from qlora_doctor.recipe.schema import REPO_RECIPES

    for path in sorted(REPO_RECIPES.glob("*.yaml")):
        r = load_recipe(path)
        for m in (machine(gpus=T4), machine(gpus=A100), machine(**CPU_MACHINE)):
            for check in (mixed_precision_check, compute_dtype_check):
                assert judge(check, r, m).status == "pass", (path.name, m.gpus, check.__name__)
        # the GPU recipes use paged optimizers: on a CPU that is a failure the doctor reports
        cpu = judge(optimizer_device_check, r, machine(**CPU_MACHINE))
        assert (cpu.status if cpu else None) == ("fail" if r.training.optim.startswith("paged_") else None)


def test_check_cli_with_recipe_fails_for_bf16_on_t4(tmp_path):
    bad = tmp_path / "bf16.yaml"
    text = load_demo_text().replace("  bf16: auto", "  bf16: true").replace(
        "path: data/demo/train.jsonl", f"path: {load_recipe('demo').dataset.path}").replace(
        "eval_path: data/demo/eval.jsonl", f"eval_path: {load_recipe('demo').dataset.eval_path}")
    bad.write_text(text)
    machine_file = write_machine(tmp_path / "t4.json", gpus=T4)
    result = CliRunner().invoke(cli, ["check", "--machine", str(machine_file), "--recipe", str(bad), "--json"])
    assert result.exit_code == 1, result.output
    precision = [c for c in json.loads(result.output)["checks"] if c["id"] == "recipe.precision"]
    assert [c["status"] for c in precision] == ["fail"]
    assert "training.bf16: false, training.fp16: true" in precision[0]["fix"]
    result = CliRunner().invoke(cli, ["check", "--machine", str(machine_file), "--recipe", "demo", "--json"])
    precision = [c for c in json.loads(result.output)["checks"] if c["id"] == "recipe.precision"]
    assert [c["status"] for c in precision] == ["pass"]


def load_demo_text() -> str:
    from qlora_doctor.recipe.schema import REPO_RECIPES

    return (REPO_RECIPES / "demo.yaml").read_text()


def test_bf16_on_a_cpu_names_the_key_that_decides_the_compute_dtype():
    """Issue #17: with the compute dtype already `auto`, the fix is training.bf16, not the dtype again."""
    check = by_id(recipe_checks(recipe("training.bf16=true"), machine(**CPU_MACHINE)), "recipe.compute_dtype")
    assert check.status == "warn" and "training.bf16: auto" in check.fix and "compute_dtype: auto" not in check.fix


def test_a_machine_file_with_only_a_gpu_name_gets_its_compute_capability(tmp_path):
    """Issue #17: a described GPU without compute_capability is looked up in the GPU table, as a probe is."""
    from qlora_doctor.sources.machine import load_described_machine

    path = tmp_path / "l4.json"
    path.write_text('{"os": "linux", "arch": "x86_64", "python": "3.11.9", "driver_version": "550.54.15", '
                    '"gpus": [{"name": "NVIDIA L4"}]}')
    described = load_described_machine(path)
    assert described.gpus[0].compute_capability == "8.9" and "GPU table" in described.notes[0]

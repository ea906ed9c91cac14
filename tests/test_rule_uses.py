"""Rules that only bite for some uses of the stack (`[rule.when] uses`, knowledge/loading.py USES): without a
recipe the doctor cannot tell, so they are notes (a stack is not `warn` for what it may never do); with a
recipe they fire only when the run does that, and bf16 is judged once, by the recipe's precision check."""

from __future__ import annotations

from qlora_doctor.doctor.diagnose import diagnose
from qlora_doctor.knowledge.loading import USES, load_rules
from qlora_doctor.recipe.schema import apply_overrides, load_recipe

from helpers import env, machine

T4 = [{"name": "Tesla T4", "compute_capability": "7.5", "memory_total_mib": 15360}]
A100 = [{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "memory_total_mib": 81920}]
NVIDIA = {"driver_version": "550.54.15", "cuda_driver_version": "12.4", "gpu_vendor": "nvidia"}
STACK = dict(torch="2.5.1+cu124", transformers="4.46.3", peft="0.13.2", bitsandbytes="0.45.0",
             accelerate="1.1.1", datasets="3.1.0")


def rows(report, rule_id: str):
    return [c for c in report.checks if c.id == f"rule:{rule_id}"]


def test_every_uses_value_is_known_and_some_rules_carry_one():
    used = {use for rule in load_rules() if rule.when for use in rule.when.uses}
    assert used and used <= set(USES)


def test_without_a_recipe_bf16_on_a_t4_is_a_note_not_a_warning():
    report = diagnose(machine(gpus=T4, **NVIDIA), env(**STACK))
    (row,) = rows(report, "gpu-bf16-needs-ampere")
    assert row.status == "pass" and row.title.startswith("note (if the run uses bf16)")


def test_with_a_recipe_bf16_is_judged_once_by_the_recipe():
    t4 = machine(gpus=T4, **NVIDIA)
    auto = diagnose(t4, env(**STACK), recipe=load_recipe("demo"))
    assert not rows(auto, "gpu-bf16-needs-ampere")
    forced = diagnose(t4, env(**STACK), recipe=apply_overrides(load_recipe("demo"), ["training.bf16=true"]))
    assert not rows(forced, "gpu-bf16-needs-ampere")
    assert [c.status for c in forced.checks if c.id == "recipe.precision"] == ["fail"]


def test_an_fsdp_only_rule_is_a_note_without_a_recipe_and_a_warning_for_an_fsdp_run():
    old_bnb = dict(STACK, bitsandbytes="0.42.0", accelerate="0.27.2")
    a100 = machine(gpus=A100 * 2, **NVIDIA)
    (note,) = rows(diagnose(a100, env(**old_bnb)), "bnb-quant-storage-fsdp")
    assert note.status == "pass" and "fsdp" in note.title
    single = diagnose(a100, env(**old_bnb), recipe=load_recipe("demo"))
    assert not rows(single, "bnb-quant-storage-fsdp")
    fsdp = diagnose(a100, env(**old_bnb), recipe=apply_overrides(load_recipe("demo"), ["distributed.strategy=fsdp"]))
    (warn,) = rows(fsdp, "bnb-quant-storage-fsdp")
    assert warn.status == "warn"


def test_a_merge_only_rule_stays_a_note_even_with_a_recipe():
    # `run` never merges; merging later is the user's choice, so the run cannot decide it.
    old_peft = env(**dict(STACK, peft="0.5.0"))
    a100 = machine(gpus=A100, **NVIDIA)
    for report in (diagnose(a100, old_peft), diagnose(a100, old_peft, recipe=load_recipe("demo"))):
        (row,) = rows(report, "peft-merge-quantized-unsupported")
        assert row.status == "pass" and "merge" in row.title

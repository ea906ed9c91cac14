"""`offload_checkpoints: auto` and `recompute: auto` (the defaults): the memory planner turns on offloaded
checkpoints with selective recompute where the host can pin what they keep (memory/plan.py resolve_offload), and
says why not elsewhere; the host's memory comes from /proc/meminfo or a --machine file's `host_memory_mib`."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlora_doctor.core.errors import InputError
from qlora_doctor.memory.estimate import GIB, TrainSettings, offload_host_bytes
from qlora_doctor.memory.model import count_parameters
from qlora_doctor.memory.plan import HOST_PINNED_SHARE, resolve_offload
from qlora_doctor.sources.machine import _host_memory_mib

from helpers import machine

LLAMA3_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}
COUNTS = count_parameters(LLAMA3_8B)
BASE = TrainSettings(micro_batch=8, seq_len=2048, upcast_unquantized=False, fused_lora=True, lora_dropout=0.0,
                     liger_kernel=True)


def host(gib: int | None):
    return machine(gpus=[H100], host_memory_mib=None if gib is None else gib * 1024)


def test_the_host_decides_selective_and_offload_together():
    need_selective = offload_host_bytes(COUNTS, replace(BASE, offload_checkpoints=True, recompute="selective"))
    need_inputs = offload_host_bytes(COUNTS, replace(BASE, offload_checkpoints=True, recompute="full"))
    # 8B at 8 x 2048: 31 layer inputs (3.9 GiB) and 31 selective layers' kept outputs (~17 GiB)
    assert 3.5 * GIB < need_inputs < 4.5 * GIB < need_selective < 25 * GIB

    settings, note = resolve_offload(COUNTS, BASE, "auto", "auto", host(128))
    assert settings.offload_checkpoints and settings.recompute == "selective"
    assert note.startswith("offload_checkpoints auto: on, recompute auto: selective (pins about")
    # a host too small for the kept outputs still takes the inputs, with full recompute
    small = int(need_selective / HOST_PINNED_SHARE / GIB) - 1
    settings, note = resolve_offload(COUNTS, BASE, "auto", "auto", host(small))
    assert settings.offload_checkpoints and settings.recompute == "full", note
    # and one too small for both offloads nothing
    tiny = int(need_inputs / HOST_PINNED_SHARE / GIB) - 1
    settings, note = resolve_offload(COUNTS, BASE, "auto", "auto", host(tiny))
    assert not settings.offload_checkpoints and settings.recompute == "full"
    assert "would pin 3.9 GiB, more than 50% of the host's" in note and note.startswith(
        "offload_checkpoints auto: off, recompute auto: full")
    # two DDP ranks pin twice as much
    assert resolve_offload(COUNTS, BASE, "auto", "auto", host(small * 2 + 2), processes=2)[0].recompute == "full"


def test_unknown_host_memory_or_a_refusal_leaves_the_old_defaults():
    settings, note = resolve_offload(COUNTS, BASE, "auto", "auto", host(None))
    assert not settings.offload_checkpoints and settings.recompute == "full"
    assert "host's memory is unknown" in note and "host_memory_mib" in note
    settings, note = resolve_offload(COUNTS, BASE, "auto", "auto", host(512), refused="not with FSDP")
    assert not settings.offload_checkpoints and note.endswith("(not with FSDP)")


def test_explicit_settings_are_kept():
    assert resolve_offload(COUNTS, BASE, False, "full", host(512)) == (BASE, None)
    # recompute auto without offload stays full: selective alone spends GPU memory per layer
    settings, note = resolve_offload(COUNTS, BASE, False, "auto", host(512))
    assert not settings.offload_checkpoints and settings.recompute == "full" and note == "recompute auto: full"
    # offload auto with selective asked for
    settings, _ = resolve_offload(COUNTS, replace(BASE, recompute="selective"), "auto", "selective", host(512))
    assert settings.offload_checkpoints and settings.recompute == "selective"
    # offload asked for, recompute auto: selective where the host holds it
    assert resolve_offload(COUNTS, BASE, True, "auto", host(512))[0].recompute == "selective"


def test_host_memory_is_read_from_proc_meminfo_and_machine_files(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131905024 kB\nMemFree:        1000 kB\n")
    assert _host_memory_mib(str(meminfo)) == 128813
    assert _host_memory_mib(str(tmp_path / "missing")) is None
    assert machine(host_memory_mib=65536).host_memory_mib == 65536
    assert machine().host_memory_mib is None
    with pytest.raises(InputError) as err:
        machine(host_memory_mib="64 GB")
    assert "host_memory_mib: expected a positive whole number of MiB" in str(err.value)
    assert machine(host_memory_mib=65536).to_json()["host_memory_mib"] == 65536


def test_the_trainer_decides_what_the_run_plan_could_not(tmp_path):
    """A hub model not yet downloaded cannot be planned before the run: `auto` then reaches the trainer, which
    decides it from the loaded model's config and this host's memory, as the planner would have."""
    pytest.importorskip("torch")
    from transformers import LlamaConfig

    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.runplan import build_run_plan, levers_for_loaded

    from lever_support import make_recipe

    recipe = make_recipe(tmp_path, model="org/not-downloaded")
    big = machine(gpus=[H100], host_memory_mib=256 * 1024)
    run = build_run_plan(recipe, big, where="test")
    assert run.memory is None and run.recipe.performance.offload_checkpoints == "auto"
    assert run.recipe.performance.recompute == "auto" and not run.levers.offload_checkpoints.on

    class Loaded:  # what the trainer holds after loading: a model with its config
        config = LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type")})

    h100 = Precision(device="cuda", fp16=False, bf16=True, compute_dtype="bfloat16", compute_capability="9.0",
                     reason="test")
    decided = levers_for_loaded(run.recipe, h100, Loaded(), machine=big)
    assert decided.offload_checkpoints.on and decided.recompute.on
    unknown = levers_for_loaded(run.recipe, h100, Loaded(), machine=machine(gpus=[H100]))
    assert not unknown.offload_checkpoints.on and not unknown.recompute.on


def test_with_fp8_base_recompute_auto_stays_full():
    """fp8 with selective recompute was measured slower on an H200 (casts fell back to eager): auto does not pick
    it; offloading the inputs still pays."""
    fp8 = replace(BASE, fp8_base=True)
    settings, note = resolve_offload(COUNTS, fp8, "auto", "auto", host(128))
    assert settings.offload_checkpoints and settings.recompute == "full"
    assert "fp8 with selective recompute ran 13% slower" in note and "recompute: selective` to try it" in note
    assert resolve_offload(COUNTS, fp8, "auto", "selective", host(128))[0].recompute == "selective"


def test_without_a_gpu_auto_is_decided_without_planning(tmp_path):
    """No GPU: nothing to offload, and selective alone trades memory for speed; `check --recipe` on a laptop does
    not build the model's parameter count for it."""
    from qlora_doctor.runplan import build_run_plan

    from lever_support import make_recipe

    cpu = machine(gpus=[], driver_version="", host_memory_mib=65536)
    run = build_run_plan(make_recipe(tmp_path, model="org/not-downloaded"), cpu, where="test")
    assert run.memory is None and run.memory_error is None
    assert run.recipe.performance.offload_checkpoints is False and run.recipe.performance.recompute == "full"
    assert not run.levers.offload_checkpoints.on and run.levers.offload_checkpoints.reason == "off"
    assert not run.levers.recompute.on and run.levers.recompute.reason.startswith("full")

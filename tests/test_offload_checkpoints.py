"""`performance.offload_checkpoints` (qlora_doctor/trainer/offload.py) on CPU: the recipe's refusals, the lever and
its reasons, `check --recipe`, the memory planner, and the saved-tensor hooks' whole pack/unpack/prefetch path
(copies into separate CPU tensors instead of pinned memory and side streams) on a tiny 4-bit Llama: the
gradients are bit-identical to plain checkpointing, and after the forward the layer inputs live only in the
host copies."""

from __future__ import annotations

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qlora_doctor.core.errors import InputError  # noqa: E402
from qlora_doctor.doctor.performance import performance_check  # noqa: E402
from qlora_doctor.recipe import levers  # noqa: E402
from qlora_doctor.recipe.precision import Precision  # noqa: E402
from qlora_doctor.runplan import RunPlan  # noqa: E402
from qlora_doctor.trainer import speed  # noqa: E402
from qlora_doctor.trainer.offload import CheckpointOffloader  # noqa: E402

from helpers import machine  # noqa: E402
from lever_support import CPU, load_base, make_recipe, nonzero_lora_b, save_tiny_llama  # noqa: E402

H100 = Precision(device="cuda", fp16=False, bf16=True, compute_dtype="bfloat16", compute_capability="9.0",
                 reason="test")
H100_GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}
LAYERS = 4


# --- the recipe, the lever, check --recipe ------------------------------------------------------------

@pytest.mark.parametrize("extra, message, fix", [
    ({"performance": {"checkpoint_layers": 0}}, "performance.offload_checkpoints: true with "
     "performance.checkpoint_layers: 0", "set `performance.checkpoint_layers: all`"),
    ({"training": {"gradient_checkpointing": False}}, "performance.offload_checkpoints: true with "
     "training.gradient_checkpointing: false", "set `training.gradient_checkpointing: true` or "
     "`performance.offload_checkpoints: false`"),
    ({"distributed": {"strategy": "fsdp"}}, "performance.offload_checkpoints: true with distributed.strategy: fsdp",
     "set `distributed.strategy: ddp`"),
    ({"performance": {"torch_compile": True}}, "performance.offload_checkpoints: true with "
     "performance.torch_compile: true", "set `performance.torch_compile: false` or "
     "`performance.offload_checkpoints: false`"),
])
def test_the_recipe_refuses_what_offloading_cannot_be_combined_with(tmp_path, extra, message, fix):
    kwargs = {k: v for k, v in extra.items() if k != "performance"}
    with pytest.raises(InputError) as err:
        make_recipe(tmp_path, offload_checkpoints=True, **kwargs, **extra.get("performance", {}))
    assert message in str(err.value) and fix in str(err.value)
    make_recipe(tmp_path, offload_checkpoints=False, **kwargs, **extra.get("performance", {}))  # fine without it


def test_the_lever_is_auto_by_default_and_off_without_a_gpu(tmp_path):
    """`auto` is decided by the memory planner against the host's memory (tests/test_offload_auto.py); a lever
    still `auto` when the levers are decided is off."""
    assert make_recipe(tmp_path).performance.offload_checkpoints == "auto"
    undecided = levers.speed_plan(make_recipe(tmp_path), H100).offload_checkpoints
    assert undecided.on is False and "not decided by the memory planner" in undecided.reason
    assert levers.speed_plan(make_recipe(tmp_path, offload_checkpoints=False), H100).offload_checkpoints.reason == (
        "off")
    recipe = make_recipe(tmp_path, offload_checkpoints=True, recompute="selective", checkpoint_layers=2)
    off = levers.speed_plan(recipe, CPU).offload_checkpoints
    assert not off.on and off.reason == "no GPU: nothing to offload"
    on = levers.speed_plan(recipe, H100).offload_checkpoints
    assert on.on and "pinned host memory" in on.reason and "trainer/offload.py" in on.reason
    assert levers.speed_plan(recipe, H100).to_json()["offload_checkpoints"] == {"on": True, "reason": on.reason}


def run_plan(recipe, precision):
    return RunPlan(recipe=recipe, where="test", precision=precision, cudnn_hazards=None, num_processes=1,
                   levers=levers.speed_plan(recipe, precision))


def test_check_recipe_states_the_lever(tmp_path):
    recipe = make_recipe(tmp_path, offload_checkpoints=True)
    on_gpu = performance_check(run_plan(recipe, H100))
    assert on_gpu.status == "pass" and "offload_checkpoints" in on_gpu.detail.split(";")[0]
    assert "offload_checkpoints: checkpointed layers' saved inputs in pinned host memory" in on_gpu.detail
    on_cpu = performance_check(run_plan(recipe, CPU))
    assert on_cpu.status == "warn"
    assert "performance.offload_checkpoints: true but no GPU: nothing to offload" in on_cpu.detail
    assert on_cpu.fix == "set `performance.offload_checkpoints: false` in the recipe"


# --- the memory planner -------------------------------------------------------------------------------

def test_the_planner_moves_the_checkpointed_inputs_off_the_gpu():
    from dataclasses import replace

    from qlora_doctor.memory import activations
    from qlora_doctor.memory.estimate import (OFFLOAD_RESIDENT_CACHES, OFFLOAD_RESIDENT_LAYERS, TrainSettings,
                                              estimate, offload_host_bytes)
    from qlora_doctor.memory.model import count_parameters, lora_targets
    from qlora_doctor.recipe.builtin import builtin_config

    counts = count_parameters(builtin_config("builtin:smollm2-135m-instruct"))
    base = TrainSettings(micro_batch=8, seq_len=2048, upcast_unquantized=False, fused_lora=True, lora_dropout=0.0)
    layer_input = counts.hidden_size * 2 * base.tokens  # bf16 residual stream
    # a selective layer's kept outputs (fused LoRA: with A x of v/o/down_proj)
    kept = activations.selective_kept_per_token(counts, 2, lora_targets(counts, base.lora_targets), base.lora_r) * base.tokens
    stays = 3 * base.lora_r * 2 * base.tokens  # A x of v/o/down_proj's whole-LoRA op never moves (STAY_ON_DEVICE)
    for settings in (base, replace(base, recompute="selective"), replace(base, checkpoint_layers=10)):
        plain, offloaded = estimate(counts, settings), estimate(counts, replace(settings, offload_checkpoints=True))
        checkpointed = 10 if settings.checkpoint_layers == 10 else counts.num_layers
        saved = plain.peak_allocated_bytes - offloaded.peak_allocated_bytes
        # at most every checkpointed input but the resident ones (the first layer's and the double buffer), and
        # with selective every layer's kept outputs but OFFLOAD_RESIDENT_CACHES layers' worth
        selective = checkpointed if settings.recompute == "selective" else 0
        most = (checkpointed - OFFLOAD_RESIDENT_LAYERS) * layer_input + max(selective - OFFLOAD_RESIDENT_CACHES, 0) * kept
        assert 0 < saved <= most, settings
        if selective:
            assert saved > (selective - OFFLOAD_RESIDENT_CACHES - 1) * kept
        # what goes to the host: every input but the first layer's, every selective cache but the last layer's
        host = offload_host_bytes(counts, replace(settings, offload_checkpoints=True))
        assert host == (checkpointed - 1) * layer_input + max(selective - 1, 0) * (kept - stays)
        assert offload_host_bytes(counts, settings) == 0
        assert offloaded.peak_reserved_bytes < plain.peak_reserved_bytes
        assert any("offloaded to host memory" in name for name, _ in offloaded.breakdown)
    none = replace(base, checkpoint_layers=0)
    assert estimate(counts, none) == estimate(counts, replace(none, offload_checkpoints=True))


def test_plan_shows_the_lower_peak_and_the_lever(tmp_path):
    from qlora_doctor.memory.plan import plan_recipe

    kwargs = {"model": "builtin:smollm2-135m-instruct", "training": {"per_device_train_batch_size": 8,
                                                                     "max_seq_length": 2048}}
    gpu = machine(gpus=[H100_GPU])
    plain = plan_recipe(make_recipe(tmp_path, **kwargs), gpu)
    offloaded = plan_recipe(make_recipe(tmp_path, offload_checkpoints=True, **kwargs), gpu)
    assert offloaded.settings.offload_checkpoints and not plain.settings.offload_checkpoints
    assert offloaded.peak_allocated_bytes < plain.peak_allocated_bytes
    assert any("offload_checkpoints: the checkpointed layers' inputs are counted in pinned host memory" in note
               and "fastpath_h100_2026-12-06" in note for note in offloaded.notes)
    lever = {lv["name"]: lv for lv in offloaded.to_json()["settings"]["levers"]}["offload_checkpoints"]
    assert lever["on"] and "pinned host memory" in lever["reason"]


# --- the hooks on a tiny 4-bit Llama (CPU) --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-offload"), LAYERS)


def build(path, recipe, offloader=None):
    """The model as `qlora-doctor run` builds it (speed.prepare_for_training, peft, apply_after_peft); with
    `offloader`, its checkpointed layers offloaded through it (the lever itself is off on the CPU)."""
    from peft import LoraConfig, get_peft_model

    base = load_base(path)
    plan = levers.speed_plan(recipe, CPU)
    assert not plan.offload_checkpoints.on
    model = speed.prepare_for_training(base, recipe, plan)
    if offloader is not None:
        chosen = [i for i, layer in enumerate(speed.decoder_layers(model)) if layer.gradient_checkpointing]
        speed.enable_checkpointing(model, recipe.performance.checkpoint_layers, selective=plan.recompute.on,
                                   offload=offloader)
        assert chosen == [i for i, layer in enumerate(speed.decoder_layers(model)) if layer.gradient_checkpointing]
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    nonzero_lora_b(model)
    plan = speed.apply_after_peft(model, plan)
    model.train()
    return model, plan


def train(model, steps=2, accumulation=2):
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    batches = torch.randint(0, 256, (steps, accumulation, 2, 16), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)  # the dropout masks: the same draws in every run
    losses, grads = [], []
    for step in range(steps):
        optim.zero_grad()
        total = 0.0
        for ids in batches[step]:
            loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optim.step()
    return losses, grads


@pytest.mark.parametrize("fused, performance", [
    (True, {"checkpoint_layers": "all"}), (False, {"checkpoint_layers": "all"}),
    (True, {"checkpoint_layers": 2}), (True, {"checkpoint_layers": "all", "recompute": "selective"})])
def test_gradients_are_bit_identical_to_plain_checkpointing(tiny_llama, tmp_path, fused, performance):
    recipe = make_recipe(tmp_path, fused_lora=fused, offload_checkpoints=False, **performance)
    ref_losses, ref_grads = train(build(tiny_llama, recipe)[0])
    offloader = CheckpointOffloader(streams=False, pin_memory=False, offload_cpu=True)
    model, plan = build(tiny_llama, recipe, offloader)
    assert plan.fused_lora.on == fused
    losses, grads = train(model)
    assert ref_losses[0] != ref_losses[-1] and losses == ref_losses
    for step, (ours, ref) in enumerate(zip(grads, ref_grads)):
        assert set(ours) == set(ref) and len(ref) == 7 * LAYERS * 2
        for name, grad in ref.items():
            assert torch.equal(ours[name], grad), f"step {step} {name}"
    checkpointed = 2 if performance["checkpoint_layers"] == 2 else LAYERS
    micro_batches = 2 * 2
    # every checkpointed layer's input but the first layer's (a leaf) went through a host copy, and came back
    # through the prefetch but the last checkpointed layer's (reloaded when its backward starts)
    assert offloader.stats["offloaded"] == (checkpointed - 1) * micro_batches
    assert offloader.stats["prefetch_hits"] == (checkpointed - 2) * micro_batches
    assert offloader.stats["reloaded"] == micro_batches
    # selective: every selective layer's kept outputs but the last layer's went to the host and came back through
    # the prefetch that the replay of the layer after it started
    selective = LAYERS - 1 if performance.get("recompute") == "selective" else 0
    assert offloader.stats["caches_offloaded"] == selective * micro_batches
    assert offloader.stats["cache_prefetch_hits"] == selective * micro_batches
    assert offloader.stats["caches_reloaded"] == offloader.stats["caches_from_device"] == 0


def test_selective_kept_outputs_live_only_in_host_copies_after_the_forward(tiny_llama, tmp_path):
    from qlora_doctor.trainer import offload as offload_module

    offloader = CheckpointOffloader(streams=False, pin_memory=False, offload_cpu=True)
    recipe = make_recipe(tmp_path, checkpoint_layers="all", recompute="selective", fused_lora=True)
    model, _ = build(tiny_llama, recipe, offloader)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    records = [ref() for ref in offloader.caches]
    assert len(records) == LAYERS - 1 and all(r is not None and not r.restored for r in records)
    for record in records:
        # q, k, v, o, down GEMM outputs and attention's output + log-sum-exp, each now a host view
        assert len(record.entries) >= 7
        for wrapper, _number, _nbytes in record.entries:
            assert isinstance(wrapper.val, offload_module._HostView) and wrapper.val.host.device.type == "cpu"
    kept = sum(view.numel() for r in records for view in offload_module._hosts_of(r))
    assert offloader.stats["cache_bytes"] == kept > 0
    loss.backward()
    assert all(r.restored and r.prefetched is None for r in records)
    assert offloader.stats["cache_prefetch_hits"] == LAYERS - 1


def test_the_whole_lora_ops_a_x_stays_on_the_device():
    """STAY_ON_DEVICE: of the whole-LoRA op's kept outputs only the LoRA output moves; A x stays where it is (moved
    too, the default's loss curve lagged full recompute's on an H100: trainer/offload.py)."""
    from torch.utils.checkpoint import _VersionWrapper, create_selective_checkpoint_contexts

    from qlora_doctor.trainer import fused_lora  # noqa: F401 (registers the op)
    from qlora_doctor.trainer.offload import _cache_wrappers, _HostView

    op = torch.ops.qlora_doctor.lora_gemm_4bit.default
    out, a_out = torch.randn(16, 8), torch.randn(16, 4)
    forward, _ = create_selective_checkpoint_contexts(lambda *a, **k: True)
    forward.storage[op][0] = (_VersionWrapper(out), _VersionWrapper(a_out))
    assert [w.val for w in _cache_wrappers(forward.storage)] == [out]
    offloader = CheckpointOffloader(streams=False, pin_memory=False, offload_cpu=True)
    offload, restore = offloader.cache_contexts(forward.storage)
    with offload:
        pass
    moved, stayed = forward.storage[op][0]
    assert isinstance(moved.val, _HostView) and stayed.val is a_out
    with restore:
        pass
    assert torch.equal(moved.val, out) and stayed.val is a_out


def test_a_restored_cache_entry_is_the_same_view_of_the_same_bytes():
    from torch.utils.checkpoint import _VersionWrapper, create_selective_checkpoint_contexts

    from qlora_doctor.trainer.offload import _cache_wrappers

    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    permuted = base.permute(0, 2, 1)  # a strided view, as SDPA kernels return their output
    forward, _ = create_selective_checkpoint_contexts(lambda *a, **k: True)
    forward.storage["op"][0] = (_VersionWrapper(permuted.detach()), 3)
    forward.storage["op"][1] = _VersionWrapper(base[1].detach())
    wrappers = _cache_wrappers(forward.storage)
    offloader = CheckpointOffloader(streams=False, pin_memory=False, offload_cpu=True)
    offload, restore = offloader.cache_contexts(forward.storage)
    with offload:
        pass
    assert len(wrappers) == 2 and offloader.stats["caches_offloaded"] == 1
    assert not isinstance(wrappers[0].val, torch.Tensor)
    assert offloader.stats["cache_bytes"] == base.numel() * 4  # one storage, copied once
    with restore:
        pass
    first, second = wrappers
    assert first.val.stride() == permuted.stride() and torch.equal(first.val, permuted)
    assert torch.equal(second.val, base[1]) and second.val.storage_offset() == 12
    assert first.val.untyped_storage().data_ptr() == second.val.untyped_storage().data_ptr() != base.data_ptr()
    assert first.get_val(False) is first.val  # the version check passes on the restored tensor


@pytest.mark.parametrize("offload", [False, True])
def test_after_the_forward_the_layer_inputs_live_only_in_host_copies(tiny_llama, tmp_path, offload):
    offloader = CheckpointOffloader(streams=False, pin_memory=False, offload_cpu=True) if offload else None
    model, _ = build(tiny_llama, make_recipe(tmp_path, checkpoint_layers="all"), offloader)
    inputs: list[weakref.ref] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kwargs: inputs.append(weakref.ref(
        args[0] if args else kwargs["hidden_states"])), with_kwargs=True) for layer in speed.decoder_layers(model)]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    assert len(inputs) == LAYERS
    alive = [ref() is not None for ref in inputs]
    if not offload:
        assert alive == [True] * LAYERS  # plain checkpointing keeps each layer's input for the replay
    else:
        # the hooks dropped them, only their host copies remain; but the first layer's: the embeddings' output, a
        # leaf that autograd keeps anyway (trainer/offload.py), not copied
        assert alive == [True] + [False] * (LAYERS - 1)
        records = offloader.host_records()
        assert len(records) == LAYERS - 1
        for record in records:
            assert record.host.device.type == "cpu" and record.device_tensor is None
            assert record.host.shape == (2, 16, 64) and record.host.dtype == torch.float32
        assert len({r.host.untyped_storage().data_ptr() for r in records}) == LAYERS - 1
    loss.backward()
    for hook in hooks:
        hook.remove()
    if offload:  # the backward prefetched each layer's input while the layer after it ran its backward
        assert offloader.stats["prefetched"] == LAYERS - 2 and offloader.stats["prefetch_hits"] == LAYERS - 2
        assert all(r.device_tensor is None and r.unpacked for r in offloader.host_records())


def test_what_is_copied_and_what_is_kept():
    offloader = CheckpointOffloader()
    x = torch.ones(3, requires_grad=True) * 2
    assert offloader.pack(x) is x  # a CPU tensor stays (nothing to offload)
    leaf = torch.ones(3, requires_grad=True)
    assert CheckpointOffloader(offload_cpu=True).pack(leaf) is leaf  # a leaf stays (autograd holds it anyway)
    packed = CheckpointOffloader(offload_cpu=True).pack(x)
    assert packed is not x and packed.host.data_ptr() != x.data_ptr() and torch.equal(packed.host, x.detach())

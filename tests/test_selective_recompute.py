"""`performance.recompute: selective` (qlora_doctor/trainer/selective.py) on CPU with real NF4 layers
(bitsandbytes quantizes on the CPU): exactly the gradients of full checkpointing and of none, the ops the
backward's replay really skips, and the memory planner's prediction of what the layers keep."""

from __future__ import annotations

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from qlora_doctor.core.errors import InputError  # noqa: E402
from qlora_doctor.recipe import levers  # noqa: E402
from qlora_doctor.trainer import selective, speed  # noqa: E402
from tests.trainer_support import builtin_checkpoint  # noqa: E402, F401 (fixture)
from lever_support import CPU, OpCounter, load_base, make_recipe, nonzero_lora_b, save_tiny_llama  # noqa: E402

LAYERS = 4
HEADS = 4
GEMM = "bitsandbytes::gemm_4bit"
WHOLE_LORA = "qlora_doctor::lora_gemm_4bit"  # fused LoRA's whole forward of v/o/down_proj in a selective layer
SDPA = "aten::_scaled_dot_product_flash_attention_for_cpu"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """4 layers, grouped-query attention (4 query heads, 2 key/value heads), random weights."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-selective"), LAYERS)


def build(path, recipe, dropout):
    """The model (4-bit unless the recipe says otherwise) as `qlora-doctor run` builds it
    (speed.prepare_for_training, peft, apply_after_peft), with the same LoRA weights every time (B not
    zero, so every gradient path counts)."""
    from peft import LoraConfig, get_peft_model

    base = load_base(path, recipe.quantization.load_in_4bit)
    plan = levers.speed_plan(recipe, CPU)
    model = speed.prepare_for_training(base, recipe, plan)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    nonzero_lora_b(model)
    plan = speed.apply_after_peft(model, plan)
    model.train()
    return model, plan


MODES = {  # performance: settings of each way of running the same model
    "none": {"checkpoint_layers": 0},
    "full": {"checkpoint_layers": "all", "recompute": "full"},
    "selective": {"checkpoint_layers": "all", "recompute": "selective"},
    "selective_first_2": {"checkpoint_layers": 2, "recompute": "selective"},
    "selective_1_of_all": {"checkpoint_layers": "all", "recompute": "selective", "selective_layers": 1},
}


def train(path, tmp_path, mode, fused, dropout, quantized=True, steps=3, accumulation=2):
    """`steps` AdamW steps of `accumulation` micro-batches each; per step the loss and every LoRA gradient
    (accumulated), and the ops run by the first step's forward and backward."""
    recipe = make_recipe(tmp_path, fused_lora=fused, quantized=quantized, **MODES[mode])
    model, plan = build(path, recipe, dropout)
    assert plan.fused_lora.on == fused and plan.recompute.on == (mode.startswith("selective"))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    batches = torch.randint(0, 256, (steps, accumulation, 2, 16), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)  # the dropout masks: the same draws in every mode
    losses, grads, counter = [], [], OpCounter()
    for step in range(steps):
        optim.zero_grad()
        total = 0.0
        for ids in batches[step]:
            if step == 0:
                with counter:
                    loss = model(input_ids=ids, labels=ids).loss / accumulation
                    loss.backward()
            else:
                loss = model(input_ids=ids, labels=ids).loss / accumulation
                loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optim.step()
    return losses, grads, counter.counts


@pytest.mark.parametrize("fused, dropout, quantized", [
    (False, 0.0, True), (True, 0.0, True), (True, 0.1, True), (False, 0.1, True), (False, 0.1, False)])
def test_selective_gradients_equal_full_checkpointing_and_none(tiny_llama, tmp_path, fused, dropout, quantized):
    """float32 on CPU: loss and every LoRA gradient of 3 steps x 2 accumulated micro-batches agree to 1e-5
    relative (1e-7 absolute) across the modes; the steps differ from each other, so the optimizer moved."""
    runs = {mode: train(tiny_llama, tmp_path, mode, fused, dropout, quantized) for mode in MODES}
    ref_losses, ref_grads, _ = runs["none"]
    assert ref_losses[0] != pytest.approx(ref_losses[-1], rel=1e-3)
    for mode, (losses, grads, _) in runs.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), mode
        for step, (ours, ref) in enumerate(zip(grads, ref_grads)):
            assert set(ours) == set(ref) and len(ref) == 7 * LAYERS * 2
            for name, grad in ref.items():
                torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7, msg=f"{mode} step {step} {name}")
    # What the replay ran in the first step (2 micro-batches): 7 base GEMMs per layer in the forward; the
    # replay runs all 7 again under full checkpointing and only gate/up under selective; attention likewise.
    if not quantized:  # 16-bit weights: the base GEMMs are aten::mm like LoRA's; the replay skips 5 per layer
        mm = {mode: counts.get("aten::mm", 0) + counts.get("aten::addmm", 0) for mode, (_, _, counts) in runs.items()}
        assert mm["full"] - mm["selective"] == 2 * 5 * LAYERS and mm["selective"] > mm["none"]
        return
    ops = {mode: (counts.get(GEMM, 0) + counts.get(WHOLE_LORA, 0), counts.get(SDPA, 0))
           for mode, (_, _, counts) in runs.items()}
    # Fused, a selective layer runs v/o/down_proj as one whole-LoRA op (its base GEMM inside, not counted again)
    # in the forward, and its replay runs none of them: 3 per selective layer per micro-batch, forward only.
    whole = {mode: counts.get(WHOLE_LORA, 0) for mode, (_, _, counts) in runs.items()}
    assert whole == ({"none": 0, "full": 0, "selective": 2 * 3 * LAYERS, "selective_first_2": 2 * 3 * 2,
                      "selective_1_of_all": 2 * 3} if fused else dict.fromkeys(MODES, 0))
    assert ops == {"none": (2 * 7 * LAYERS, 2 * LAYERS), "full": (2 * 14 * LAYERS, 2 * 2 * LAYERS),
                   "selective": (2 * 9 * LAYERS, 2 * LAYERS), "selective_first_2": (2 * (7 * LAYERS + 2 * 2), 2 * LAYERS),
                   # one selective layer (2 of 7 GEMMs replayed, no attention), the others replay everything
                   "selective_1_of_all": (2 * (7 * LAYERS + 2 + 7 * (LAYERS - 1)), 2 * (1 + 2 * (LAYERS - 1)))}


def test_selective_is_exact_when_rope_rotates_q_and_k_in_place(tiny_llama, tmp_path, monkeypatch):
    """Liger's RoPE writes the rotated q and k into the projections' own storage (liger_kernel/ops/rope.py
    rope_forward). Here transformers' RoPE does the same on CPU: q/k_proj keep only their base GEMM output and
    add LoRA out of place, so the replay starts from unrotated values and selective still equals no
    checkpointing, fused and unfused, while v/o/down_proj keep their whole LoRA output (their replay runs none of
    it)."""
    from transformers.models.llama import modeling_llama

    rotate = modeling_llama.apply_rotary_pos_emb

    class RopeInPlace(torch.autograd.Function):  # as LigerRopeFunction: rotates its inputs' storage
        @staticmethod
        def forward(ctx, q, k, cos, sin):
            ctx.save_for_backward(cos, sin)
            q_rotated, k_rotated = rotate(q, k, cos, sin)
            return q.copy_(q_rotated), k.copy_(k_rotated)  # q, k: transposed views of the projections' outputs

        @staticmethod
        def backward(ctx, dq, dk):
            cos, sin = ctx.saved_tensors
            return (*rotate(dq, dk, cos, -sin), None, None)  # the rotation's transpose

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb",
                        lambda q, k, cos, sin, *a, **kw: RopeInPlace.apply(q, k, cos, sin))
    for fused in (True, False):
        (ref_losses, ref_grads, _), (losses, grads, counts) = (
            train(tiny_llama, tmp_path, mode, fused, 0.0, steps=2) for mode in ("none", "selective"))
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for step, (ours, ref) in enumerate(zip(grads, ref_grads)):
            for name, grad in ref.items():
                torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7, msg=f"{fused} {step} {name}")
        assert counts.get(WHOLE_LORA, 0) == (2 * 3 * LAYERS if fused else 0)


def test_a_write_into_a_kept_whole_lora_output_raises_naming_the_projection(tiny_llama, tmp_path):
    """If an op later in the layer wrote into v/o/down_proj's output, the replay would start from the written
    values: the layer's forward raises when it ends, naming the projection, instead of training on wrong
    gradients."""
    from qlora_doctor.trainer import fused_lora

    model, _ = build(tiny_llama, make_recipe(tmp_path, fused_lora=True), 0.0)
    layer = speed.decoder_layers(model)[0]
    kept = selective.kept_weight_pointers(layer)
    whole = selective.projection_weights(layer, frozenset({"v_proj"}))
    x = torch.randn(2, 8, 64)
    with fused_lora.selective_layer(kept, whole, check=True):  # nothing written: no error
        layer.self_attn.v_proj(x)
    with pytest.raises(RuntimeError, match="v_proj.*wrote into it in place.*recompute: full"):
        with fused_lora.selective_layer(kept, whole, check=True):
            out = layer.self_attn.v_proj(x)
            with torch.no_grad():  # as inside another autograd Function's forward (Liger's RoPE)
                out.mul_(2)
    with fused_lora.selective_layer(kept, whole):  # the replay's context does not check
        out = layer.self_attn.v_proj(x)
        with torch.no_grad():
            out.mul_(2)


def test_only_the_chosen_layers_are_selective(tiny_llama, tmp_path):
    def contexts(layers):
        return [getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", {}).get("context_fn")
                is not None for layer in layers]

    recipe = make_recipe(tmp_path, checkpoint_layers=2, recompute="selective")
    model, _ = build(tiny_llama, recipe, 0.0)
    layers = speed.decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
    assert contexts(layers[:2]) == [True, True]
    # selective_layers: of the checkpointed layers, the first N (or a fraction) keep outputs, the rest replay all
    model, plan = build(tiny_llama, make_recipe(tmp_path, checkpoint_layers=3, recompute="selective",
                                                selective_layers=0.5), 0.0)
    layers = speed.decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, True, False]
    assert contexts(layers[:3]) == [True, True, False] and "selective_layers: 0.5" in plan.recompute.reason


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates while active, by data_ptr, held weakly: `alive_bytes()` is what is still
    referenced (by autograd's saved tensors, checkpoint inputs, the selective cache, ...). A view op's output
    shares its input's storage, so a parameter's storage shows up when the forward views it (`lora_A.t()`) outside
    an op that hides it (the whole-LoRA op): `alive_bytes(exclude)` leaves the model's own storages out."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                known = self.storages.get(s.data_ptr())
                if s.data_ptr() and (known is None or known[0]() is None):  # new, or a freed one's address reused
                    self.storages[s.data_ptr()] = (weakref.ref(s), s.nbytes())
        return out

    def alive_bytes(self, exclude: frozenset[int] = frozenset()) -> int:
        gc.collect()
        return sum(n for ptr, (ref, n) in self.storages.items() if ref() is not None and ptr not in exclude)


def kept_after_forward(path, recipe, ids):
    """Bytes of the storages the forward created that are alive before the backward (the loss kept)."""
    model, _ = build(path, recipe, 0.05)
    records: list = []
    if recipe.performance.recompute == "selective":
        for layer in speed.decoder_layers(model):
            if layer.gradient_checkpointing:
                selective.make_selective(layer, records)
    live = LiveStorages()
    with live:
        loss = model(input_ids=ids, labels=ids).loss
    own = frozenset(t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()])
    alive = live.alive_bytes(exclude=own)
    loss.backward()  # the graph (and the selective cache) is consumed
    kept_by_policy = sum(sum(p.kept_bytes.values()) for p in records)
    return alive, kept_by_policy


@pytest.mark.parametrize("fused", [False, True])
def test_planner_predicts_what_selective_layers_keep(builtin_checkpoint, tmp_path, fused):
    """The builtin model (SmolLM2-135M: 30 layers, 9 heads of 64, 3 key/value heads, intermediate 1536), float32
    on CPU, 2 x 24 tokens, LoRA dropout 0.05: the storages alive after the forward with selective minus with
    full checkpointing equal the planner's `selective_kept_per_token` x tokens x layers, plus the attention
    kernel's float32 log-sum-exp (heads x 4 bytes per token), which the planner leaves out (under 1%):
    exact to the byte."""
    from qlora_doctor.memory.activations import selective_kept_per_token
    from qlora_doctor.memory.model import count_parameters, load_model_config, lora_targets

    counts = count_parameters(load_model_config("builtin:smollm2-135m-instruct"))
    heads = load_model_config("builtin:smollm2-135m-instruct")["num_attention_heads"]
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    full, _ = kept_after_forward(builtin_checkpoint, make_recipe(tmp_path, builtin_checkpoint, fused_lora=fused), ids)
    recipe = make_recipe(tmp_path, builtin_checkpoint, fused_lora=fused, recompute="selective")
    sel, by_policy = kept_after_forward(builtin_checkpoint, recipe, ids)
    # fused, v/o/down_proj keep their whole LoRA output and A x (rank wide) too
    targets = lora_targets(counts, "all-linear") if fused else ()  # build()'s LoraConfig: r=4, all-linear
    predicted = selective_kept_per_token(counts, 4, targets, r=4) * tokens * counts.num_layers
    if fused:
        assert predicted - selective_kept_per_token(counts, 4) * tokens * counts.num_layers == (
            3 * 4 * 4 * tokens * counts.num_layers)
    lse = heads * 4 * tokens * counts.num_layers
    assert sel - full == predicted + lse
    if selective._sees_outputs():  # torch >= 2.13 hands the policy each op's output to count
        assert by_policy == predicted + lse  # the policy's own count agrees with the independent one
    assert predicted / (sel - full) > 0.99


# --- the lever, the recipe, the planner ----------------------------------------------------------

def test_recompute_defaults_to_auto_and_refuses_what_it_cannot_compose_with(tmp_path):
    """`auto` (the default) is decided by the memory planner with offload_checkpoints (tests/test_offload_auto.py);
    left undecided it is full recompute."""
    assert make_recipe(tmp_path).performance.recompute == "auto"
    undecided = levers.speed_plan(make_recipe(tmp_path), CPU).recompute
    assert not undecided.on and "not decided by the memory planner" in undecided.reason
    with pytest.raises(InputError) as err:
        make_recipe(tmp_path, recompute="some")
    assert "performance.recompute" in str(err.value)
    with pytest.raises(InputError) as err:
        make_recipe(tmp_path, recompute="selective", torch_compile=True)
    assert "performance.recompute: selective with performance.torch_compile" in str(err.value)
    assert "set `performance.recompute: full`" in str(err.value)
    with pytest.raises(InputError) as err:
        make_recipe(tmp_path, distributed={"strategy": "fsdp"}, recompute="selective")
    assert "performance.recompute: selective with distributed.strategy: fsdp" in str(err.value)


def test_selective_composes_with_fp8_base(tmp_path):
    """fp8_base's float8 GEMM of a 4-bit weight is one custom op reading that weight (trainer/fp8.py), so the
    policy finds it like bitsandbytes' (the fp8 tests run it): the recipe takes the combination, and GEMM_OPS
    names the op as the dispatcher does."""
    from qlora_doctor.trainer import fp8

    recipe = make_recipe(tmp_path, recompute="selective", fp8_base=True)
    assert recipe.performance.recompute == "selective" and recipe.performance.fp8_base
    assert levers.speed_plan(recipe, CPU).recompute.on
    assert fp8.fp8_gemm_4bit is not None  # importing trainer/fp8.py registers the op
    assert torch.ops.qlora_doctor.fp8_gemm_4bit.default.name() in selective.GEMM_OPS


def test_recompute_lever_needs_checkpointed_layers(tmp_path):
    on = levers.speed_plan(make_recipe(tmp_path, recompute="selective"), CPU)
    assert on.recompute.on and on.to_json()["recompute"]["on"]
    off = levers.speed_plan(make_recipe(tmp_path, recompute="selective", checkpoint_layers=0), CPU)
    assert not off.recompute.on and "no layer is checkpointed" in off.recompute.reason


def test_recipe_validation_exits_2_naming_the_key(tmp_path):
    from click.testing import CliRunner

    from qlora_doctor.cli import cli

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: org/model\ndataset:\n  path: d.jsonl\n  format: text\n"
                    "training:\n  output_dir: out\ndistributed:\n  strategy: fsdp\n"
                    "performance:\n  recompute: selective\n")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "performance.recompute: selective with distributed.strategy: fsdp" in result.output
    assert "Traceback" not in result.output


LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


def test_planner_selective_8b_keeps_the_issues_figure_per_layer():
    """Issue #20: at 8 x 2048 tokens of Llama-3-8B in bf16 the kept q, k, v, attention output and
    post-attention residual (here: o_proj's output) are about 0.45 GiB per layer; down_proj's output adds
    0.125 GiB. The planner's selective plan keeps that much more per checkpointed layer than full (before
    the replay consumes it)."""
    from dataclasses import replace

    from qlora_doctor.memory.activations import selective_kept_per_token
    from qlora_doctor.memory.estimate import GIB, TrainSettings, estimate
    from qlora_doctor.memory.model import count_parameters

    counts = count_parameters(LLAMA3_8B)
    tokens = 8 * 2048
    per_layer = selective_kept_per_token(counts, act=2) * tokens
    assert per_layer == (4096 + 1024 + 1024 + 4096 + 4096 + 4096) * 2 * tokens  # q k v o down + attention
    assert per_layer / GIB == pytest.approx(0.5625)
    # fused LoRA (r 16): v/o/down_proj keep A x too, 3 x 16 x 2 bytes a token
    per_layer += 3 * 16 * 2 * tokens
    fast = TrainSettings(micro_batch=8, seq_len=2048, upcast_unquantized=False, liger_kernel=True, fused_lora=True,
                         optim="paged_adamw_8bit")
    full, sel = estimate(counts, fast), estimate(counts, replace(fast, recompute="selective"))
    # The peak is the replay of the last layer: the 31 layers before it still hold their kept outputs, the
    # replayed one has handed its own to its recomputed tensors.
    assert full.peak_phase == sel.peak_phase == "recompute"
    rows = dict(sel.breakdown)["activations: checkpointed layer inputs and kept outputs (selective)"]
    assert rows - dict(full.breakdown)["activations: checkpointed layer inputs"] == 31 * per_layer
    assert sel.total_bytes - full.total_bytes == 31 * per_layer


def test_planner_counts_only_the_selective_layers_kept_outputs():
    """selective_layers: N keeps N layers' outputs; the last checkpointed layer, replayed first, is then a full
    one and hands nothing back, so at its replay all N are alive (with every layer selective, 31 of 32)."""
    from dataclasses import replace

    from qlora_doctor.memory.activations import selective_kept_per_token
    from qlora_doctor.memory.estimate import TrainSettings, estimate, selective_layers
    from qlora_doctor.memory.model import count_parameters, lora_targets

    counts = count_parameters(LLAMA3_8B)
    per_layer = selective_kept_per_token(counts, 2, lora_targets(counts, "all-linear"), r=16) * 8 * 2048  # fused
    fast = TrainSettings(micro_batch=8, seq_len=2048, upcast_unquantized=False, liger_kernel=True, fused_lora=True,
                         recompute="selective")
    full = estimate(counts, replace(fast, recompute="full")).total_bytes
    for layers, alive in (("all", 31), (24, 24), (0.5, 16), (0, 0)):
        s = replace(fast, selective_layers=layers)
        assert selective_layers(counts, s) == (32 if layers == "all" else alive)
        assert estimate(counts, s).total_bytes - full == alive * per_layer, layers
    assert selective_layers(counts, replace(fast, recompute="full", selective_layers=8)) == 0


def test_selective_layers_needs_selective_recompute(tmp_path):
    with pytest.raises(InputError, match="selective_layers"):
        make_recipe(tmp_path, recompute="full", selective_layers=8)
    assert make_recipe(tmp_path, selective_layers=8).performance.selective_layers == 8  # recompute auto may keep
    with pytest.raises(InputError, match="fraction"):
        make_recipe(tmp_path, recompute="selective", selective_layers=1.5)


def test_auto_checkpoint_layers_budgets_selective_layers(tmp_path):
    """`checkpoint_layers: auto` with selective recompute: the fewest selective layers that fit 85% of the GPU.
    Each selective layer frees less than a full one, so more layers must recompute for the same budget."""
    import json as json_

    from qlora_doctor.memory.plan import plan_recipe

    from helpers import machine

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json_.dumps(LLAMA3_8B))
    h100 = machine(gpus=[{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}])
    chosen = {}
    for mode in ("full", "selective"):
        recipe = make_recipe(tmp_path, model=model, checkpoint_layers="auto", recompute=mode)
        recipe = recipe.model_copy(update={"training": recipe.training.model_copy(
            update={"per_device_train_batch_size": 8, "max_seq_length": 2048})})
        plan = plan_recipe(recipe, h100, allow_network=False)
        chosen[mode] = plan.settings.checkpoint_layers
        assert plan.settings.recompute == mode and plan.total_bytes <= 0.85 * h100.nvidia_gpus[0].memory_total_mib * 2**20
    assert isinstance(chosen["full"], int) and isinstance(chosen["selective"], int)
    assert 0 < chosen["full"] < chosen["selective"] < 32


def test_plan_suggests_full_recompute_when_selective_does_not_fit(tmp_path):
    from dataclasses import replace

    from qlora_doctor.memory.estimate import TrainSettings, estimate
    from qlora_doctor.memory.model import count_parameters
    from qlora_doctor.memory.plan import suggest

    counts = count_parameters(LLAMA3_8B)
    s = TrainSettings(micro_batch=8, seq_len=2048, upcast_unquantized=False, liger_kernel=True, fused_lora=True,
                      recompute="selective")
    full_total = estimate(counts, replace(s, recompute="full")).total_bytes
    gpu = (full_total + estimate(counts, s).total_bytes) // 2  # between the two
    out = {x.kind: x for x in suggest(counts, s, gpu)}
    assert out["recompute"].fits and out["recompute"].changes == (("performance.recompute", "full"),)


def test_selective_layers_auto_keeps_the_most_layers_the_gpu_holds(tmp_path):
    """`selective_layers: auto` (the default): on an 80 GB card every layer of the 8B shape at 8 x 2048 keeps
    its outputs (~28 GiB measured on an H100 with only the inputs offloaded; with the kept outputs offloaded too,
    a 24 GB card holds them all); without offload, on a 24 GB card only as many as fit 85% of it, the rest
    recompute fully; the run plan hands the choice to the trainer."""
    import json as json_

    from qlora_doctor.memory.plan import plan_recipe
    from qlora_doctor.runplan import build_run_plan
    from qlora_doctor.sources.requirements import environment_from_pins

    from helpers import machine

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json_.dumps(LLAMA3_8B))
    recipe = make_recipe(tmp_path, model=model, recompute="selective", offload_checkpoints=True,
                         training={"eval_strategy": "no"})
    assert recipe.performance.selective_layers == "auto"
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"per_device_train_batch_size": 8, "max_seq_length": 2048})})
    h100 = machine(gpus=[{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}])
    rtx4090 = machine(gpus=[{"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9",
                             "memory_total_mib": 24564}])
    # as on a GPU machine with the [train] extra: Liger's fused loss (no 8 GiB of float32 logits)
    assert plan_recipe(recipe, h100, allow_network=False, liger_described=True).settings.selective_layers == "all"
    # offloaded, the kept outputs wait in host memory too: the 24 GB card holds every layer's as well
    offloaded = plan_recipe(recipe, rtx4090, allow_network=False, liger_described=True)
    assert offloaded.settings.selective_layers == "all" and offloaded.total_bytes <= 0.85 * 24564 * 2**20
    assert any("GiB of pinned host memory" in n and "kept outputs" in n for n in offloaded.notes)
    recipe = recipe.model_copy(update={"performance": recipe.performance.model_copy(
        update={"offload_checkpoints": False})})
    small = plan_recipe(recipe, rtx4090, allow_network=False, liger_described=True)
    chosen = small.settings.selective_layers
    assert isinstance(chosen, int) and 0 < chosen < 32, chosen
    assert small.total_bytes <= 0.85 * 24564 * 2**20
    assert any(n.startswith(f"selective_layers auto: {chosen} of 32") for n in small.notes)
    env = environment_from_pins({"torch": "2.11.0+cu130", "liger-kernel": "0.8.5", "bitsandbytes": "0.50.2"}, "test")
    run = build_run_plan(recipe, rtx4090, env, where="test", decide_output=False)
    assert run.recipe.performance.selective_layers == chosen and run.levers.selective_layers == chosen
    # where something else is above the budget (here: an evaluation batch's logits), selective layers take
    # what hides under that peak and the note says so, not "within 85%"
    evaluating = make_recipe(tmp_path, model=model, recompute="selective", offload_checkpoints=True)
    evaluating = evaluating.model_copy(update={"training": evaluating.training.model_copy(
        update={"per_device_train_batch_size": 8, "max_seq_length": 2048})})
    over = plan_recipe(evaluating, rtx4090, allow_network=False, liger_described=True)
    assert over.settings.selective_layers not in (0, "auto")
    assert any("the most that leave the prediction where it is without them" in n for n in over.notes)

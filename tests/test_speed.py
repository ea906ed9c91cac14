"""The `performance:` levers (decided by qlora_doctor/recipe/levers.py, applied by trainer/speed.py and fused_lora.py) on a tiny 4-bit Llama on CPU.

bitsandbytes >= 0.48 quantizes NF4 on the CPU, so the same layers as on a GPU are built here; liger-kernel
is not installed in this environment, which is exactly the case the degrade tests need."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from qlora_doctor.core.errors import InputError  # noqa
from qlora_doctor.core.hazards import AttentionHazard, AttentionScope  # noqa: E402
from qlora_doctor.trainer import speed  # noqa: E402
from qlora_doctor.recipe import levers  # noqa: E402
from qlora_doctor.knowledge import workarounds  # noqa: E402
from qlora_doctor.trainer import collate  # noqa: E402
from qlora_doctor.doctor.performance import performance_check  # noqa: E402
from qlora_doctor.trainer.fused_lora import LoraLinear4bitFunction, fuse_lora_layers, is_fused  # noqa: E402
from qlora_doctor.recipe.precision import Precision  # noqa
from qlora_doctor.recipe.schema import recipe_from_dict  # noqa

from helpers import CPU_MACHINE, env, machine  # noqa: E402

CPU = Precision(device="cpu", fp16=False, bf16=False, compute_dtype="float32", compute_capability=None, reason="test")
H100 = Precision(device="cuda", fp16=False, bf16=True, compute_dtype="bfloat16", compute_capability="9.0", reason="test")
LAYERS = 4


def make_recipe(tmp_path, model="org/model", **performance):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    return recipe_from_dict({"model": {"name_or_path": str(model)}, "dataset": {"path": str(data), "format": "text"},
                             "training": {"output_dir": str(tmp_path / "out")}, "performance": performance})


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path


def load_4bit(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype, device_map={"": "cpu"})


def add_lora(model, dropout=0.0, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; non-zero B makes every gradient path count
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


# --- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("performance, message", [
    ({"checkpoint_layers": 1.5}, "performance.checkpoint_layers: a fraction of the layers must be in (0, 1]"),
    ({"checkpoint_layers": -2}, "performance.checkpoint_layers: a layer count must be >= 0"),
    ({"checkpoint_layers": "half"}, "performance.checkpoint_layers: expected one of all"),
    ({"liger_kernel": "yes"}, "performance.liger_kernel: expected one of auto or true or false"),
    ({"fused_lora": 1}, "performance.fused_lora: expected one of auto or true or false"),
    ({"padding_free": None}, "performance.padding_free"),
    ({"upcast_unquantized": "auto"}, "performance.upcast_unquantized"),
    ({"group_by_lenght": True}, "did you mean 'group_by_length'"),
    ({"torch_compile": "true"}, "performance.torch_compile"),
])
def test_bad_performance_options_name_the_key(tmp_path, performance, message):
    with pytest.raises(InputError, match=None) as err:
        make_recipe(tmp_path, **performance)
    assert message in str(err.value)


def test_good_options_and_defaults(tmp_path):
    r = make_recipe(tmp_path, checkpoint_layers=0.25, liger_kernel=False, fused_lora=True)
    assert (r.performance.checkpoint_layers, r.performance.liger_kernel, r.performance.fused_lora) == (0.25, False, True)
    default = make_recipe(tmp_path).performance
    assert (default.upcast_unquantized, default.checkpoint_layers, default.liger_kernel, default.torch_compile) == \
        (False, "all", "auto", False)


@pytest.mark.parametrize("selection, count, expected", [
    ("all", 4, [0, 1, 2, 3]), (2, 4, [0, 1]), (0, 4, []), (9, 4, [0, 1, 2, 3]), (0.5, 32, list(range(16))),
    (1.0, 3, [0, 1, 2]), (0.1, 4, []),
])
def test_checkpointed_indices(selection, count, expected):
    assert levers.checkpointed_indices(selection, count) == expected


# --- liger missing ----------------------------------------------------------------------------------

def test_liger_degrades_cleanly_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(levers, "liger_installed", lambda: False)
    auto = levers.speed_plan(make_recipe(tmp_path), H100, "llama")
    assert not auto.liger_kernel.on and "not installed" in auto.liger_kernel.reason
    check = performance_check(_run_plan(make_recipe(tmp_path), H100))
    assert check.status == "pass" and "liger_kernel (liger-kernel is not installed" in check.detail
    forced = performance_check(_run_plan(make_recipe(tmp_path, liger_kernel=True), H100))
    assert forced.status == "warn" and "pip install liger-kernel" in forced.fix, forced


def _run_plan(recipe, precision):
    """A run plan with the levers decided as `check --recipe` decides them (no knowledge-base hazards)."""
    from qlora_doctor.runplan import RunPlan

    return RunPlan(recipe=recipe, where="test", precision=precision, cudnn_hazards=None, num_processes=1,
                   levers=levers.speed_plan(recipe, precision, levers.recipe_model_type(recipe)))


def test_liger_auto_is_off_on_cpu_even_if_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(levers, "liger_installed", lambda: True)
    plan = levers.speed_plan(make_recipe(tmp_path), CPU, "llama")
    assert not plan.liger_kernel.on and "NVIDIA GPU" in plan.liger_kernel.reason


def test_check_recipe_reports_the_levers(tmp_path):
    from qlora_doctor.doctor.recipe import recipe_checks

    checks = {c.id: c for c in recipe_checks(make_recipe(tmp_path, liger_kernel=True), machine(**CPU_MACHINE))}
    assert checks["recipe.performance"].status == "warn"
    assert "performance.liger_kernel: true but" in checks["recipe.performance"].detail


def test_plain_path_is_all_levers_off(tmp_path):
    r = make_recipe(tmp_path, upcast_unquantized=True, liger_kernel=False, fused_lora=False, padding_free=False,
                    group_by_length=False)
    plan = levers.speed_plan(r, H100, "llama", "sdpa")
    # cuDNN attention on is torch's own choice, so on in the plain path
    assert [lever.name for lever in plan.levers() if lever.on] == ["upcast_unquantized", "checkpoint_layers",
                                                                  "cudnn_attention"]


def test_padding_free_auto_only_with_varlen_attention(tmp_path):
    r = make_recipe(tmp_path)
    assert not levers.speed_plan(r, H100, "llama", "sdpa").padding_free.on
    assert levers.speed_plan(r, H100, "llama", "sdpa").group_by_length.on
    flash = levers.speed_plan(r, H100, "llama", "flash_attention_2")
    assert flash.padding_free.on and not flash.group_by_length.on


def test_trainer_does_not_re_enable_checkpointing(tmp_path):
    overrides = speed.training_arguments_overrides(levers.speed_plan(make_recipe(tmp_path), H100, "llama", "sdpa"))
    assert False in overrides.values()
    assert overrides.get("train_sampling_strategy") == "group_by_length" or overrides.get("group_by_length") is True


# --- dtypes and checkpointing ----------------------------------------------------------------------

def test_no_upcast_keeps_the_compute_dtype_and_peft_upcasts(tmp_path, tiny_llama):
    from peft import prepare_model_for_kbit_training

    ours = speed.prepare_for_training(load_4bit(tiny_llama, torch.bfloat16), make_recipe(tmp_path),
                                      levers.speed_plan(make_recipe(tmp_path), CPU))
    theirs = prepare_model_for_kbit_training(load_4bit(tiny_llama, torch.bfloat16))
    for model, dtype in ((ours, torch.bfloat16), (theirs, torch.float32)):
        assert model.model.embed_tokens.weight.dtype == dtype
        assert model.model.norm.weight.dtype == dtype
        assert model.model.layers[0].input_layernorm.weight.dtype == dtype
        assert model.lm_head.weight.dtype == dtype
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
        assert not any(p.requires_grad for p in model.parameters())


def test_selective_checkpointing_recomputes_exactly_the_chosen_layers(tmp_path, tiny_llama):
    r = make_recipe(tmp_path, checkpoint_layers=2)
    model = add_lora(speed.prepare_for_training(load_4bit(tiny_llama), r, levers.speed_plan(r, CPU)))
    model.train()
    layers = speed.decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
    calls = [0] * LAYERS
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [2, 2, 1, 1]  # checkpointed layers run again in the backward pass


# --- fused LoRA ---------------------------------------------------------------------------------------

def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_gradients_equal_peft(tiny_llama):
    model = add_lora(load_4bit(tiny_llama))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_peft, grads_peft = loss_and_grads(model, ids)
    fused, skipped = fuse_lora_layers(model)
    assert (fused, skipped) == (7 * LAYERS, [])
    loss_fused, grads_fused = loss_and_grads(model, ids)
    assert loss_fused == pytest.approx(loss_peft, rel=1e-5)
    assert set(grads_fused) == set(grads_peft)
    for name, grad in grads_peft.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with model.disable_adapter():  # falls back to peft's forward: the base model alone
        base = model(input_ids=ids).logits
    for module in model.modules():  # peft's forward again
        if is_fused(module):
            del module.forward
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_fused_lora_dropout_matches_a_reference_with_the_same_mask(tiny_llama):
    """With dropout the mask is drawn in forward and drawn again in backward from the saved RNG state;
    the gradients must be those of y = Wx + s*B(A(mask*x/(1-p))) with that one mask."""
    import bitsandbytes.functional as bnb_f

    layer = add_lora(load_4bit(tiny_llama), dropout=0.3).base_model.model.model.layers[0].mlp.down_proj
    base = layer.get_base_layer()
    a0, b0 = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    p, s = 0.3, float(layer.scaling["default"])
    xf, af, bf = (t.clone().requires_grad_(True) for t in (x, a0, b0))
    torch.manual_seed(123)
    y = LoraLinear4bitFunction.apply(xf, af, bf, base.weight, base.weight.quant_state, s, p, torch.float32)
    g = torch.randn_like(y)
    torch.manual_seed(999)  # the backward must not depend on the RNG state at backward time
    y.backward(g)
    torch.manual_seed(123)
    _, mask = torch.native_dropout(x.reshape(-1, 128), p, True)
    assert 0 < mask.float().mean() < 1
    xr, ar, br = (t.clone().requires_grad_(True) for t in (x, a0, b0))
    w = bnb_f.dequantize_4bit(base.weight, base.weight.quant_state)
    dropped = xr * mask.view_as(xr) / (1 - p)
    yr = xr @ w.t() + s * (dropped @ ar.t()) @ br.t()
    yr.backward(g)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for ours, ref in ((xf, xr), (af, ar), (bf, br)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_fast_path_loss_follows_the_baseline(tmp_path, tiny_llama):
    """A few AdamW steps: peft's prepare + peft's LoRA vs our prepare + fused LoRA + selective
    checkpointing (dropout 0, float32 on CPU, so both compute the same function)."""
    from peft import prepare_model_for_kbit_training

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    r = make_recipe(tmp_path, checkpoint_layers=0.5)
    curves = []
    for fast in (False, True):
        base = load_4bit(tiny_llama)
        if fast:
            base = speed.prepare_for_training(base, r, levers.speed_plan(r, CPU))
        else:
            base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
        model = add_lora(base)
        if fast:
            assert speed.apply_after_peft(model, levers.speed_plan(r, CPU)).fused_lora.on
        model.train()
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            optim.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optim.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it learns, so the comparison means something
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


# --- padding-free -------------------------------------------------------------------------------------

def test_flattening_collator_and_its_loss_equal_padded(tiny_llama):
    from qlora_doctor.trainer.data import PaddingCollator

    features = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, 6, 7, 8]},
                {"input_ids": [9, 10, 11], "attention_mask": [1] * 3, "labels": [9, 10, 11]}]
    flat = collate.flattening_collator()(features)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, 6, 7, 8, -100, 10, 11]]
    model = add_lora(load_4bit(tiny_llama))
    model.eval()
    padded = PaddingCollator(pad_token_id=0)(features)
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_flat = model(**flat, use_cache=False).loss  # with a cache, packed rows are not detected
    assert loss_flat.item() == pytest.approx(loss_padded.item(), rel=1e-4)


def test_load_for_training_applies_the_levers(tmp_path, tiny_llama):
    from qlora_doctor.trainer.model import load_for_training

    r = make_recipe(tmp_path, model=tiny_llama, checkpoint_layers=1)
    model = load_for_training(r, CPU, str(tiny_llama), levers.speed_plan(r, CPU))
    layers = speed.decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True] + [False] * (LAYERS - 1)
    q_proj = layers[0].self_attn.q_proj
    assert "forward" in vars(q_proj)  # routed through the fused function
    assert model.base_model.model.model.norm.weight.dtype == torch.float32  # CPU compute dtype


def test_fused_lora_is_off_under_fsdp(tmp_path):
    """FSDP hands bitsandbytes' 4-bit weight back as a flat shard without quant_state (seen on 2 H100s):
    only peft's own layer, which restores it from the module, may run there."""
    r = make_recipe(tmp_path)
    fsdp = r.model_copy(update={"distributed": r.distributed.model_copy(update={"strategy": "fsdp"})})
    assert levers.speed_plan(r, H100, "llama").fused_lora.on
    lever = levers.speed_plan(fsdp, H100, "llama").fused_lora
    assert not lever.on and "FSDP" in lever.reason


def test_a_weight_without_quant_state_is_not_fused(tiny_llama):
    from qlora_doctor.trainer.fused_lora import fusable_reason

    model = add_lora(load_4bit(tiny_llama))
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert fusable_reason(layer) is None
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(base.weight.data.clone(), requires_grad=False)  # as FSDP's flat views are
    assert "quant_state" in fusable_reason(layer)


def test_fsdp_adapter_save_writes_what_peft_writes(tmp_path, tiny_llama):
    """The FSDP path saves the adapter from the gathered full state dict itself (peft's selection misses every
    key under nested FSDP wrappers): same keys and tensors as peft's own save, loadable by PeftModel."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from qlora_doctor.trainer import outputs

    model = add_lora(load_4bit(tiny_llama))
    peft_dir, ours_dir = tmp_path / "peft", tmp_path / "ours"
    ours_dir.mkdir()
    model.save_pretrained(peft_dir)
    full = {k: v for k, v in model.state_dict().items()}  # what FSDP's FULL_STATE_DICT gathers: clean names
    assert outputs.save_adapter_from_state_dict(model, full, ours_dir) == LAYERS * 7 * 2
    theirs, ours = load_file(peft_dir / "adapter_model.safetensors"), load_file(ours_dir / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    reloaded = PeftModel.from_pretrained(load_4bit(tiny_llama), ours_dir)
    b = next(p for n, p in reloaded.named_parameters() if n.endswith("q_proj.lora_B.default.weight"))
    assert torch.equal(b, next(p for n, p in model.named_parameters() if n.endswith("q_proj.lora_B.default.weight")))
    with pytest.raises(RuntimeError, match="no LoRA tensors"):
        outputs.save_adapter_from_state_dict(model, {"lm_head.weight": torch.zeros(1)}, ours_dir)


def test_auto_checkpoint_layers_is_a_recipe_value_and_all_until_planned(tmp_path):
    r = make_recipe(tmp_path, checkpoint_layers="auto")
    assert r.performance.checkpoint_layers == "auto"
    assert levers.checkpointed_indices("auto", LAYERS) == list(range(LAYERS))
    with pytest.raises(InputError, match="checkpoint_layers"):
        make_recipe(tmp_path, checkpoint_layers="automatic")


# --- cudnn_attention ------------------------------------------------------------------------------

H100_GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}


@pytest.mark.parametrize("gpu, torch_version, fires", [
    (H100_GPU, "2.11.0+cu130", True),    # the GPU machine's stack: NaN grad_q rule (pytorch#196678)
    (H100_GPU, "2.14.0+cu130", True),
    (H100_GPU, "2.15.0+cu130", False),   # past the rule's range
    (None, "2.11.0+cu130", False),       # the default test machine: an A100, compute capability 8.0
])
def test_cudnn_attention_hazards_come_from_the_knowledge_base(gpu, torch_version, fires):
    m = machine(gpus=[gpu]) if gpu else machine()
    hazards = workarounds.cudnn_attention_hazards(m, env(torch=torch_version))
    assert [str(h).split(":")[0] for h in hazards] == (["cudnn-sdpa-nan-grad-q-hopper"] if fires else [])
    if fires:  # the rule's workaround_scope: masked calls with key length L % 128 == 64 (pytorch#196678)
        assert hazards[0].scope == AttentionScope(attn_mask=True, modulo=128, remainders=(64,))


SCOPED = AttentionHazard("cudnn-sdpa-nan-grad-q-hopper: cuDNN attention backward returns NaN grad_q",
                         AttentionScope(attn_mask=True, modulo=128, remainders=(64,)))
UNSCOPED = AttentionHazard("cudnn-fsdp-internal-error: CUDNN_STATUS_INTERNAL_ERROR")


def test_cudnn_attention_auto_is_off_only_where_an_unscoped_rule_fires(tmp_path):
    r = make_recipe(tmp_path)
    off = levers.speed_plan(r, H100, "llama", "sdpa", cudnn_hazards=(UNSCOPED,)).cudnn_attention
    assert not off.on and "cudnn-fsdp-internal-error" in off.reason
    assert not levers.speed_plan(r, H100, "llama", "sdpa", cudnn_hazards=(SCOPED, UNSCOPED)).cudnn_attention.on
    gated = levers.speed_plan(r, H100, "llama", "sdpa", cudnn_hazards=(SCOPED,))
    assert gated.cudnn_attention.on and levers.cudnn_gated(gated)
    assert gated.cudnn_attention.reason == ("on, except calls with an attention mask and key length L % 128 == 64 "
                                            "(cudnn-sdpa-nan-grad-q-hopper), which run the flash/efficient kernels")
    assert levers.speed_plan(r, H100, "llama", "sdpa", cudnn_hazards=()).cudnn_attention.on
    forced = levers.speed_plan(make_recipe(tmp_path, cudnn_attention=True), H100, "llama", "sdpa",
                              cudnn_hazards=(UNSCOPED,)).cudnn_attention
    assert forced.on and "despite" in forced.reason
    forced_scoped = levers.speed_plan(make_recipe(tmp_path, cudnn_attention=True), H100, "llama", "sdpa",
                                      cudnn_hazards=(SCOPED,))
    assert forced_scoped.cudnn_attention.on and not levers.cudnn_gated(forced_scoped)  # the user's call: no gate
    assert not levers.speed_plan(make_recipe(tmp_path, cudnn_attention=False), H100, "llama", "sdpa",
                                cudnn_hazards=()).cudnn_attention.on
    assert not levers.speed_plan(r, CPU, "llama", "sdpa", cudnn_hazards=(SCOPED,)).cudnn_attention.on


def test_cudnn_attention_off_is_set_in_torch_for_cuda_runs_only(tmp_path):
    off = levers.speed_plan(make_recipe(tmp_path), H100, "llama", "sdpa", cudnn_hazards=(UNSCOPED,))
    on = levers.speed_plan(make_recipe(tmp_path), H100, "llama", "sdpa", cudnn_hazards=())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        speed.apply_process_settings(off, "cpu")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        speed.apply_process_settings(on, "cuda")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        speed.apply_process_settings(off, "cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.nn.functional.scaled_dot_product_attention is sdpa  # off: nothing wrapped
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


@pytest.mark.parametrize("length, masked, routed", [
    (192, True, True), (64, True, True), (2112, True, True),   # the lengths pytorch#196678 names
    (192, False, False),                                      # no mask tensor: cuDNN is clean (is_causal)
    (128, True, False), (200, True, False), (2048, True, False),
])
def test_the_cudnn_gate_routes_only_the_calls_the_rule_names(tmp_path, monkeypatch, length, masked, routed):
    """A scoped rule keeps cuDNN attention on for the process and sends only the calls it names to the other
    kernels: the gate wraps torch's SDPA, and what the kernel selection sees during the call is recorded by
    the function underneath (on CPU torch runs the math kernel either way; the outputs are equal)."""
    real = torch.nn.functional.scaled_dot_product_attention
    seen: list[bool] = []

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    plan = levers.speed_plan(make_recipe(tmp_path), H100, "llama", "sdpa", cudnn_hazards=(SCOPED,))
    speed.apply_process_settings(plan, "cuda")
    gated = torch.nn.functional.scaled_dot_product_attention
    assert gated is not recording and torch.backends.cuda.cudnn_sdp_enabled()
    q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] if masked else None
    out = gated(q, k, v, attn_mask=mask, is_causal=not masked)
    assert seen == [not routed] and torch.backends.cuda.cudnn_sdp_enabled()  # restored after the call
    assert torch.equal(out, real(q, k, v, attn_mask=mask, is_causal=not masked))
    positional = gated(q, k, v, mask) if masked else None  # transformers passes the mask by keyword; others not
    assert positional is None or seen[-1] == (not routed)
    speed.gate_cudnn_attention((SCOPED.scope,))()  # installing again wraps the same original; its undo restores it
    assert torch.nn.functional.scaled_dot_product_attention is recording


def test_a_run_plan_carries_the_hazards_scopes_to_launched_ranks():
    from qlora_doctor.core.hazards import AttentionHazard as H

    assert H.from_json(SCOPED.to_json()) == SCOPED and H.from_json(UNSCOPED.to_json()) == UNSCOPED
    assert H.from_json("cudnn-x: y") == H("cudnn-x: y")  # a plan written before scopes existed


def test_check_recipe_says_which_attention_calls_leave_cudnn_on_an_h100_with_torch_2_11(tmp_path, monkeypatch):
    from qlora_doctor.sources import installed as packages
    from qlora_doctor.doctor.recipe import recipe_checks

    monkeypatch.setattr(packages, "installed_environment", lambda with_conflicts=True: env(torch="2.11.0+cu130"))
    checks = {c.id: c for c in recipe_checks(make_recipe(tmp_path), machine(gpus=[H100_GPU]))}
    assert ("cudnn_attention: on, except calls with an attention mask and key length L % 128 == 64 "
            "(cudnn-sdpa-nan-grad-q-hopper)") in checks["recipe.performance"].detail


def test_a_described_environment_decides_liger_not_this_machine(tmp_path, monkeypatch):
    """check -r FILE --recipe: liger-kernel in FILE turns the lever on for a described GPU, whatever this
    machine has installed (issue #14)."""
    from qlora_doctor.runplan import build_run_plan
    from qlora_doctor.sources.requirements import environment_from_pins

    monkeypatch.setattr(levers, "liger_installed", lambda: False)
    pins = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2",
            "accelerate": "1.15.0", "datasets": "5.2.0"}
    h100 = machine(gpus=[H100_GPU])
    with_liger = build_run_plan(make_recipe(tmp_path), h100, environment_from_pins({**pins, "liger-kernel": "0.8.5"},
                                                                                 "r.txt"), where="r")
    without = build_run_plan(make_recipe(tmp_path), h100, environment_from_pins(pins, "r.txt"), where="r")
    assert with_liger.levers.liger_kernel.on and "requirements judged" in with_liger.levers.liger_kernel.reason
    assert not without.levers.liger_kernel.on and "not in the requirements" in without.levers.liger_kernel.reason

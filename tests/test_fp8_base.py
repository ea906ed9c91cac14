"""`performance.fp8_base` (qlora_doctor/trainer/fp8.py): float8 GEMMs for the frozen 4-bit base layers.

On CPU with real NF4 layers (bitsandbytes quantizes on the CPU) and torchao's `emulate` mode, which runs the
float8 GEMMs as float32 matmuls of the float8 values: the numerics are the FP8 path's, only the kernel differs.
The refusals (recipe validation, `check --recipe`) need no torchao; the rest is skipped without it.

Tolerances: e4m3 keeps 3 mantissa bits, so rounding to it moves an element by up to 2^-4 = 6.25% (uniform, so
about 3.6% RMS), e5m2 (the gradient) by up to 2^-3 = 12.5%. A GEMM output's relative error is then about
5% RMS (two rounded operands per product, independent errors over the sum), an input gradient's about 8%,
and a LoRA gradient collects one or two of these per layer it passes: measured 6-13% relative (Frobenius)
on this model. The tests allow 25% and a cosine of 0.98 to float32: a wiring mistake (a missing scale, a
transposed weight, the bf16 path silently taken) is off by 100% or exactly 0%, which both bounds catch. The
GEMMs themselves are checked bit for bit against torchao's own float8 linear function.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


from qlora_doctor.core.errors import CheckFailed, InputError  # noqa: E402
from qlora_doctor.doctor.performance import performance_check  # noqa: E402
from qlora_doctor.recipe import levers  # noqa: E402
from qlora_doctor.recipe.levers import Lever  # noqa: E402
from qlora_doctor.recipe.precision import Precision  # noqa: E402
from qlora_doctor.runplan import RunPlan  # noqa: E402

from helpers import CPU_MACHINE, env, machine  # noqa: E402
from lever_support import CPU, OpCounter, make_recipe, nonzero_lora_b, save_tiny_llama  # noqa: E402



def gpu(capability):
    return Precision(device="cuda", fp16=False, bf16=True, compute_dtype="bfloat16", compute_capability=capability,
                     reason="test")


H100, A100, L4, UNKNOWN_CC = gpu("9.0"), gpu("8.0"), gpu("8.9"), gpu(None)
H100_GPU = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}
LAYERS = 2
PROJECTIONS = 7  # q, k, v, o, gate, up, down


def run_plan(recipe, precision):
    return RunPlan(recipe=recipe, where="test", precision=precision, cudnn_hazards=None, num_processes=1,
                   levers=levers.speed_plan(recipe, precision))


# --- refusals: the recipe, the lever, check --recipe --------------------------------------------------

@pytest.mark.parametrize("extra, message, fix", [
    ({"performance": {"torch_compile": True}}, "performance.fp8_base: true with performance.torch_compile: true",
     "set `performance.torch_compile: false` or `performance.fp8_base: false`"),
    ({"quantized": False}, "performance.fp8_base: true with quantization.load_in_4bit: false",
     "set `quantization.load_in_4bit: true` or `performance.fp8_base: false`"),
    ({"distributed": {"strategy": "fsdp"}}, "performance.fp8_base: true with distributed.strategy: fsdp",
     "set `distributed.strategy: ddp`"),
])
def test_the_recipe_refuses_what_fp8_base_cannot_be_combined_with(tmp_path, extra, message, fix):
    kwargs = {k: v for k, v in extra.items() if k != "performance"}
    with pytest.raises(InputError) as err:
        make_recipe(tmp_path, fp8_base=True, **kwargs, **extra.get("performance", {}))
    assert message in str(err.value) and fix in str(err.value)
    make_recipe(tmp_path, fp8_base=False, **kwargs, **extra.get("performance", {}))  # fine without fp8_base


def test_the_recipe_takes_fp8_base_with_selective_recompute(tmp_path, monkeypatch):
    """The float8 GEMM is one op the selective policy keeps (trainer/fp8.py, fp8_gemm_4bit): no refusal, both
    levers on, offloaded or not."""
    monkeypatch.setattr(levers, "torchao_installed", lambda: True)
    for offload in (False, True):
        recipe = make_recipe(tmp_path, fp8_base=True, recompute="selective", offload_checkpoints=offload)
        plan = levers.speed_plan(recipe, H100)
        assert plan.fp8_base.on and plan.recompute.on, (plan.fp8_base, plan.recompute)
        assert performance_check(run_plan(recipe, H100)).status == "pass"


def test_fp8_base_is_off_by_default(tmp_path):
    recipe = make_recipe(tmp_path)
    assert recipe.performance.fp8_base is False
    assert not levers.speed_plan(recipe, H100).fp8_base.on


@pytest.mark.parametrize("precision, installed, on, reason", [
    (H100, True, True, "float8 e4m3 base GEMMs (torchao, tensorwise scales) on compute capability 9.0"),
    (L4, True, True, "compute capability 8.9"),
    (H100, False, False, "torchao is not installed (`pip install 'torchao>=0.18,<0.19'`)"),
    (A100, True, False, "compute capability 8.0, without FP8 tensor cores (needs >= 8.9"),
    (UNKNOWN_CC, True, False, "compute capability is unknown"),
    (CPU, True, False, "training runs on the CPU"),
])
def test_the_lever_needs_fp8_tensor_cores_and_torchao(tmp_path, monkeypatch, precision, installed, on, reason):
    monkeypatch.setattr(levers, "torchao_installed", lambda: installed)
    lever = levers.speed_plan(make_recipe(tmp_path, fp8_base=True), precision).fp8_base
    assert lever.on is on and reason in lever.reason, lever


@pytest.mark.parametrize("precision, installed, detail, fix", [
    (A100, True, "compute capability 8.0", "set `performance.fp8_base: false`"),
    (CPU, True, "training runs on the CPU", "set `performance.fp8_base: false`"),
    (H100, False, "torchao is not installed", "pip install 'torchao>=0.18,<0.19'"),
])
def test_check_recipe_fails_where_fp8_cannot_run_with_the_fix(tmp_path, monkeypatch, precision, installed, detail,
                                                               fix):
    monkeypatch.setattr(levers, "torchao_installed", lambda: installed)
    check = performance_check(run_plan(make_recipe(tmp_path, fp8_base=True), precision))
    assert check.status == "fail" and check.id == "recipe.performance"
    assert check.detail.startswith("performance.fp8_base: true but") and detail in check.detail
    assert check.fix == fix or check.fix.startswith(fix), check.fix
    assert check.sources


def test_check_recipe_passes_on_an_fp8_gpu_and_states_the_trade(tmp_path, monkeypatch):
    from qlora_doctor.doctor.recipe import recipe_checks

    monkeypatch.setattr(levers, "torchao_installed", lambda: True)
    check = performance_check(run_plan(make_recipe(tmp_path, fp8_base=True), H100))
    assert check.status == "pass" and "fp8_base" in check.detail.split(";")[0], check.detail
    checks = {c.id: c for c in recipe_checks(make_recipe(tmp_path, fp8_base=True), machine(gpus=[H100_GPU]),
                                             env(torch="2.11.0+cu130", torchao="0.18.0"))}
    assert checks["recipe.performance"].status == "pass"
    trade = checks["recipe.sanity.fp8-base-numerics"]
    assert trade.status == "warn" and trade.title.startswith("FP8 base GEMMs: faster on compute capability >= 8.9")
    assert "within 0.7% of float32" in trade.detail and trade.sources
    assert "recipe.sanity.fp8-base-numerics" not in {c.id for c in recipe_checks(make_recipe(tmp_path),
                                                                                machine(gpus=[H100_GPU]))}


def test_check_r_judges_torchao_in_the_described_requirements(tmp_path, monkeypatch):
    from qlora_doctor.doctor.recipe import recipe_checks

    monkeypatch.setattr(levers, "torchao_installed", lambda: True)  # this machine has it; the file does not
    checks = {c.id: c for c in recipe_checks(make_recipe(tmp_path, fp8_base=True), machine(gpus=[H100_GPU]),
                                             env(torch="2.11.0+cu130"))}
    check = checks["recipe.performance"]
    assert check.status == "fail" and "not in the requirements judged" in check.detail
    assert check.fix == "add `torchao>=0.18,<0.19` to the requirements"


def test_check_recipe_on_a_cpu_machine_refuses_fp8(tmp_path):
    from qlora_doctor.doctor.recipe import recipe_checks

    checks = {c.id: c for c in recipe_checks(make_recipe(tmp_path, fp8_base=True), machine(**CPU_MACHINE))}
    assert checks["recipe.performance"].status == "fail"
    assert "training runs on the CPU" in checks["recipe.performance"].detail


def test_applying_without_torchao_is_refused_with_the_command(monkeypatch):
    from qlora_doctor.trainer import fp8

    monkeypatch.setattr(fp8, "torchao_installed", lambda: False)
    with pytest.raises(CheckFailed, match=r"pip install 'torchao>=0.18,<0.19'"):
        fp8.apply_fp8_base(torch.nn.Linear(16, 16))


def test_the_memory_planner_counts_the_float8_copies():
    from qlora_doctor.memory.estimate import TrainSettings, estimate
    from qlora_doctor.memory.model import count_parameters
    from qlora_doctor.recipe.builtin import builtin_config

    counts = count_parameters(builtin_config("builtin:smollm2-135m-instruct"))
    settings = TrainSettings(micro_batch=4, seq_len=512, upcast_unquantized=False, fused_lora=True, lora_dropout=0.0)
    plain, fp8 = estimate(counts, settings), estimate(counts, TrainSettings(**{**vars(settings), "fp8_base": True}))
    rows = dict(fp8.breakdown)
    assert rows["float8 copies of the largest weight (fp8_base)"] == 2 * counts.linear_largest
    assert "float8 copies of the largest weight (fp8_base)" not in dict(plain.breakdown)
    grown = fp8.peak_allocated_bytes - plain.peak_allocated_bytes
    # the two weight copies, and at most the float8 gradient of one down projection's backward
    assert 2 * counts.linear_largest <= grown <= 2 * counts.linear_largest + 4 * 512 * counts.hidden_size


# --- the float8 GEMMs (torchao emulate) --------------------------------------------------------------

@pytest.fixture(scope="module")
def torchao():
    return pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """2 layers, grouped-query attention, random weights; every dimension a multiple of 16."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-fp8"), LAYERS, intermediate_size=128)


def nf4_linear(out_features, in_features, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, requires_grad=False,
                                     quant_type="nf4")
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_the_gemms_are_torchaos_float8_linear_without_the_weight_gradient(torchao, recipe):
    """Forward output and input gradient equal, bit for bit, those of torchao's own float8 linear autograd
    function (matmul_with_hp_or_float8_args, what Float8Linear runs) on the dequantized weight."""
    import bitsandbytes.functional as bnb_f
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    from qlora_doctor.trainer.fp8 import Fp8BaseGemm, Fp8BaseMatmul

    layer = nf4_linear(48, 32)
    weight = bnb_f.dequantize_4bit(layer.weight, layer.weight.quant_state)
    gemm = Fp8BaseGemm.create(recipe, emulate=True)
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(24, 48, generator=torch.Generator().manual_seed(2))

    ours_x = x.clone().requires_grad_(True)
    ours = Fp8BaseMatmul.apply(ours_x, layer.weight, layer.weight.quant_state, gemm)
    ours.backward(grad)
    ref_x = x.clone().requires_grad_(True)
    ref_w = weight.clone().requires_grad_(True)
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    c = gemm.config
    mm = LinearMMConfig(*(ScaledMMConfig(True, g.use_fast_accum, False, c.pad_inner_dim)
                          for g in (c.gemm_config_output, c.gemm_config_grad_input, c.gemm_config_grad_weight)))
    ref = matmul_with_hp_or_float8_args.apply(ref_x, ref_w.t(), mm, c)
    ref.backward(grad)
    assert torch.equal(ours, ref) and torch.equal(ours_x.grad, ref_x.grad)
    # and it is a float8 result, not the float32 one
    exact = x @ weight.t()
    assert 1e-3 < ((ours - exact).norm() / exact.norm()).item() < 0.1


def build(path, tmp_path, monkeypatch, fp8, fused=True, dropout=0.0, checkpoint="all", recompute="full",
          cache=False):
    """The model as `qlora-doctor run` builds it (load_for_training), fp8_base forced on where asked (the CPU
    has no FP8 tensor cores: torchao emulates), with the same non-zero LoRA B everywhere."""
    from qlora_doctor.trainer.model import load_for_training

    decide = levers.decide_fp8_base
    monkeypatch.setattr(levers, "decide_fp8_base", lambda setting, precision, described=None: (
        Lever("fp8_base", True, "test: emulated") if setting else decide(setting, precision, described)))
    recipe = make_recipe(tmp_path, model=path, fp8_base=fp8, fused_lora=fused, checkpoint_layers=checkpoint,
                         recompute=recompute, fp8_weight_cache=cache,
                         lora={"r": 4, "lora_alpha": 8, "lora_dropout": dropout, "target_modules": "all-linear"})
    torch.manual_seed(1)
    model = load_for_training(recipe, CPU, str(path), levers.speed_plan(recipe, CPU))
    nonzero_lora_b(model)
    model.train()
    return model


def loss_and_grads(model, seed=3):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(5)  # dropout draws
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_load_for_training_switches_every_4bit_layer_and_nothing_else(torchao, tiny_llama, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    from qlora_doctor.trainer.fp8 import is_fp8
    from qlora_doctor.trainer.fused_lora import is_fused

    model = build(tiny_llama, tmp_path, monkeypatch, fp8=True)
    four_bit = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == LAYERS * PROJECTIONS and all(is_fp8(m) for _, m in four_bit)
    assert sum(is_fp8(m) for m in model.modules()) == LAYERS * PROJECTIONS  # not lm_head, not the LoRA layers
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    assert sum(is_fused(m) for m in model.modules()) == LAYERS * PROJECTIONS  # fused LoRA still on, over FP8
    plain = build(tiny_llama, tmp_path, monkeypatch, fp8=False)
    assert not any(is_fp8(m) for m in plain.modules())


@pytest.mark.parametrize("fused, dropout", [(True, 0.0), (False, 0.0), (True, 0.1)])
def test_lora_gradients_are_close_to_float32(torchao, tiny_llama, tmp_path, monkeypatch, fused, dropout):
    """Loss within 1% and every LoRA gradient within 25% relative / cosine >= 0.98 of the float32 path (module
    docstring); and not equal to it, so the float8 GEMMs really ran."""
    ref_loss, ref = loss_and_grads(build(tiny_llama, tmp_path, monkeypatch, fp8=False, fused=fused, dropout=dropout))
    loss, grads = loss_and_grads(build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused, dropout=dropout))
    assert loss == pytest.approx(ref_loss, rel=0.01) and loss != ref_loss
    assert set(grads) == set(ref) and len(ref) == 2 * LAYERS * PROJECTIONS
    for name, grad in ref.items():
        rel = ((grads[name] - grad).norm() / grad.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0).item()
        assert 0 < rel < 0.25 and cosine > 0.98, (name, rel, cosine)


def test_fused_unfused_and_checkpointed_take_the_same_float8_gemms(torchao, tiny_llama, tmp_path, monkeypatch):
    """Fused LoRA (base GEMM from BASE_GEMM_ATTRIBUTE) and peft's layer (the base layer's forward), with every
    layer recomputed or none: the same float8 GEMMs, so the same loss and gradients (float32 rounding apart)."""
    runs = {(fused, ckpt): loss_and_grads(build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused,
                                                checkpoint=ckpt))
            for fused in (True, False) for ckpt in ("all", 0)}
    ref_loss, ref = runs[(True, "all")]
    for key, (loss, grads) in runs.items():
        assert loss == pytest.approx(ref_loss, rel=1e-6), key
        for name, grad in ref.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def test_an_optimizer_step_trains_through_the_float8_layers(torchao, tiny_llama, tmp_path, monkeypatch):
    model = build(tiny_llama, tmp_path, monkeypatch, fp8=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        optim.zero_grad()
        loss, _ = loss_and_grads(model)
        losses.append(loss)
        optim.step()
    assert losses[-1] < losses[0]


def test_layers_whose_sizes_scaled_mm_cannot_take_keep_bitsandbytes(torchao):
    from qlora_doctor.trainer.fp8 import apply_fp8_base, is_fp8

    model = torch.nn.Sequential(nf4_linear(48, 32), nf4_linear(40, 48))  # 40 is not a multiple of 16
    switched, skipped = apply_fp8_base(model)
    assert switched == 1 and is_fp8(model[0]) and not is_fp8(model[1])
    assert skipped == ["1: 48 x 40 is not a multiple of 16 both ways (torch._scaled_mm)"]
    x = torch.randn(3, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_a_cast_that_fails_to_compile_falls_back_to_eager(torchao, monkeypatch):
    from qlora_doctor.trainer import fp8

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(fp8.torch, "compile", broken_compile)
    layer = nf4_linear(32, 32)
    compiled = fp8.Fp8BaseGemm.create(emulate=True, compile_casts=True)
    eager = fp8.Fp8BaseGemm.create(emulate=True, compile_casts=False)
    x = torch.randn(8, 32)
    with pytest.warns(RuntimeWarning, match="compiling a float8 cast failed .*no C\\+\\+ compiler"):
        out = compiled.forward(x, layer.weight, layer.weight.quant_state)
    assert torch.equal(out, eager.forward(x, layer.weight, layer.weight.quant_state))
    assert compiled.fallbacks() and all("no C++ compiler" in f for f in compiled.fallbacks())
    assert not compiled.casts["input"].compiled and not eager.fallbacks()


def test_compiled_casts_give_the_eager_casts_bits(torchao):
    """What the GPU runs: each cast compiled (torch.compile, here inductor's CPU backend), in bf16, over layers
    of different shapes (one recompile for dynamic sizes), forward and input gradient: equal to eager, bit for
    bit, and the weight's float8 copy stays column-major (no extra copy before torch._scaled_mm)."""
    import bitsandbytes.functional as bnb_f

    from qlora_doctor.trainer.fp8 import Fp8BaseGemm

    compiled = Fp8BaseGemm.create(emulate=True, compile_casts=True)
    eager = Fp8BaseGemm.create(emulate=True, compile_casts=False)
    for seed, (out_features, in_features) in enumerate([(64, 32), (32, 64)]):
        layer = nf4_linear(out_features, in_features, seed=seed)
        w, qs = layer.weight, layer.weight.quant_state
        x = torch.randn(24, in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
        g = torch.randn(24, out_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed + 9))
        assert torch.equal(compiled.forward(x, w, qs), eager.forward(x, w, qs))
        assert torch.equal(compiled.grad_input(g, w, qs), eager.grad_input(g, w, qs))
    # the float8 weights come out in the layouts torch._scaled_mm takes as mat2 (column-major) with no copy
    forward_w, _ = compiled._weight8("weight", w, qs, torch.bfloat16)
    backward_w, _ = compiled._weight8("weight_for_grad_input", w, qs, torch.bfloat16)
    assert forward_w.t().stride() == (1, in_features) and backward_w.t().stride() == (1, out_features)
    assert torch.equal(forward_w.t().float(), backward_w.float())  # one cast, transposed
    assert not compiled.fallbacks() and all(c.compiled for c in compiled.casts.values())


def test_the_tensorwise_cast_is_torchaos_without_its_subclass(torchao):
    """cast_tensorwise (compiled on CUDA; eager here) returns torchao's hp_tensor_to_float8_dynamic's data and
    scale, bit for bit, for activations, weights and gradients; only the amax is reduced per row first."""
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import LinearMMConfig

    from qlora_doctor.trainer.fp8 import cast_tensorwise

    for seed, (rows, cols) in enumerate([(24, 32), (7, 96), (1, 16)]):
        x = torch.randn(rows, cols, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed)) * 10 ** seed
        for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            data, scale = cast_tensorwise(x, dtype)
            ref = hp_tensor_to_float8_dynamic(x, dtype, LinearMMConfig())
            assert data.dtype == dtype and data.stride() == x.stride()
            assert torch.equal(data.view(torch.uint8), ref._data.view(torch.uint8)) and torch.equal(scale, ref._scale)


def test_tensorwise_runs_without_torchaos_subclass_and_rowwise_with_it(torchao):
    from qlora_doctor.trainer.fp8 import Fp8BaseGemm

    assert Fp8BaseGemm.create("tensorwise", emulate=True).direct
    assert not Fp8BaseGemm.create("rowwise", emulate=True).direct


def test_compiled_casts_survive_a_llama_layers_shapes_inside_and_outside_the_op(torchao):
    """On an H200 with selective recompute, dynamo's default recompile limit (8) was hit in the first steps: all
    casts share torchao's one function, and the casts inside the `fp8_gemm_4bit` op compile their own graphs; every
    cast then fell back to eager (13% slower than bf16). Creating compiled casts raises the limit, so five weight
    shapes at two token counts, forward (inside the op) and input gradient (outside), all stay compiled."""
    import torch._dynamo

    from qlora_doctor.trainer.fp8 import RECOMPILE_LIMIT, Fp8BaseGemm

    torch._dynamo.reset()
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: 8}):  # torch's default; restored after
        compiled = Fp8BaseGemm.create(emulate=True, compile_casts=True)
        assert getattr(torch._dynamo.config, name) == RECOMPILE_LIMIT
        run_shapes(compiled)
    assert not compiled.fallbacks() and all(c.compiled for c in compiled.casts.values())


def run_shapes(compiled):
    for tokens in (24, 40):
        for seed, (out_features, in_features) in enumerate([(64, 32), (16, 32), (96, 32), (32, 96), (32, 64)]):
            layer = nf4_linear(out_features, in_features, seed=seed)
            w, qs = layer.weight, layer.weight.quant_state
            x = torch.randn(tokens, in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
            g = torch.randn(tokens, out_features, dtype=torch.bfloat16)
            compiled.forward(x, w, qs)
            compiled.grad_input(g, w, qs)


# --- with selective recompute (trainer/selective.py) -----------------------------------------------

FP8_GEMM = "qlora_doctor::fp8_gemm_4bit"
WHOLE_LORA = "qlora_doctor::lora_gemm_4bit"  # fused, selective: v/o/down_proj's whole LoRA forward (float8 GEMM inside)


def counted_loss_and_grads(model, seed=3):
    """loss_and_grads, and the ops that ran."""
    counter = OpCounter()
    with counter:
        loss, grads = loss_and_grads(model, seed)
    return loss, grads, counter.counts


@pytest.mark.parametrize("fused, dropout", [(True, 0.0), (False, 0.0), (True, 0.1), (False, 0.1)])
def test_selective_recompute_keeps_the_float8_gemms_and_changes_nothing(torchao, tiny_llama, tmp_path, monkeypatch,
                                                                       fused, dropout):
    """fp8_base with recompute: selective: the loss and every LoRA gradient of full recompute, bit for bit; the
    float8 GEMM is one op (fp8_gemm_4bit) that runs 7 times per layer in the forward, and in the replay 7 times
    under full recompute but only for gate/up (2) under selective; bitsandbytes' own GEMM never runs."""
    runs = {recompute: counted_loss_and_grads(build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused,
                                                    dropout=dropout, recompute=recompute))
            for recompute in ("full", "selective")}
    (ref_loss, ref, full), (loss, grads, selective) = runs["full"], runs["selective"]
    assert loss == ref_loss
    assert set(grads) == set(ref) and len(ref) == 2 * LAYERS * PROJECTIONS
    for name, grad in ref.items():
        assert torch.equal(grads[name], grad), name
    whole = 3 * LAYERS if fused else 0  # forward only: the replay runs none of them
    assert selective.get(WHOLE_LORA, 0) == whole and full.get(WHOLE_LORA, 0) == 0
    assert full.get(FP8_GEMM) == 2 * PROJECTIONS * LAYERS
    assert selective.get(FP8_GEMM) + whole == (PROJECTIONS + 2) * LAYERS
    assert "bitsandbytes::gemm_4bit" not in full and "bitsandbytes::gemm_4bit" not in selective
    # the forward's and the replay's dequantizations run inside the op: the only ones outside are the backward's
    # input-gradient GEMMs, one per projection, in both
    assert full.get("bitsandbytes::dequantize_4bit") == selective.get("bitsandbytes::dequantize_4bit") == (
        PROJECTIONS * LAYERS)


class TwoProjections(torch.nn.Module):
    """A kept projection (q_proj) and a recomputed one (gate_proj), named as the selective policy names them."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.gate_proj = nf4_linear(32, 32, seed=0), nf4_linear(32, 32, seed=1)

    def forward(self, x):  # the last silu saves gate_proj's output, so that the replay must produce it
        silu = torch.nn.functional.silu
        return silu(self.gate_proj(silu(self.q_proj(x))))


@pytest.mark.parametrize("compile_casts", [False, True])
def test_the_float8_gemm_is_one_op_the_selective_policy_keeps(torchao, monkeypatch, compile_casts):
    """Under selective checkpointing the policy sees fp8_gemm_4bit (not its dequantization, casts and GEMM),
    keeps q_proj's output and replays gate_proj's GEMM: the output and input gradient of no checkpointing, bit
    for bit, also with the casts compiled (as on the GPU: torch.compile'd code inside the custom op's kernel,
    which SAC's dispatch mode calls). The op's kernel runs are counted without a dispatch mode of the test's
    own: under one, torch.compile skips the backward's casts (they would fall back to eager)."""
    from torch.utils.checkpoint import checkpoint

    from qlora_doctor.trainer import selective
    from qlora_doctor.trainer.fp8 import Fp8BaseGemm, apply_fp8_base, fp8_gemms

    torch._dynamo.reset()  # a fresh process's compile caches: earlier tests' casts count against recompile_limit
    model = TwoProjections()
    assert apply_fp8_base(model, emulate=True, compile_casts=compile_casts) == (2, [])
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(24, 32, generator=torch.Generator().manual_seed(4))
    runs: list = []
    impl = Fp8BaseGemm._forward_impl
    monkeypatch.setattr(Fp8BaseGemm, "_forward_impl", lambda *args: runs.append(1) or impl(*args))

    def run(checkpointed):
        xr, records = x.clone().requires_grad_(True), []
        runs.clear()
        if checkpointed:
            out = checkpoint(model, xr, use_reentrant=False, context_fn=selective.selective_context_fn(model, records))
        else:
            out = model(xr)
        out.backward(grad)
        return out.detach(), xr.grad, len(runs), records

    out, grad_x, gemms_run, _ = run(False)
    sel_out, sel_grad_x, sel_gemms_run, records = run(True)
    assert torch.equal(sel_out, out) and torch.equal(sel_grad_x, grad_x)
    assert gemms_run == 2 and sel_gemms_run == 3  # the replay runs gate_proj's only
    if selective._sees_outputs():  # torch >= 2.13 hands the policy each op's output to count
        assert [p.kept_bytes["projections"] for p in records] == [24 * 32 * 4]  # q_proj's float32 output
    gemms = fp8_gemms(model)
    assert len(gemms) == 1 and not gemms[0].fallbacks(), gemms[0].fallbacks()
    assert all(c.compiled for c in gemms[0].casts.values()) == compile_casts


# --- performance.fp8_weight_cache -------------------------------------------------------------------------------

def test_the_weight_cache_needs_fp8_base_and_is_off_by_default(tmp_path, monkeypatch):
    with pytest.raises(InputError) as err:
        make_recipe(tmp_path, fp8_weight_cache=True)
    assert "performance.fp8_weight_cache: true with performance.fp8_base: false" in str(err.value)
    assert "set `performance.fp8_base: true` or remove performance.fp8_weight_cache" in str(err.value)
    monkeypatch.setattr(levers, "torchao_installed", lambda: True)
    assert not levers.speed_plan(make_recipe(tmp_path, fp8_base=True), H100).fp8_weight_cache.on
    plan = levers.speed_plan(make_recipe(tmp_path, fp8_base=True, fp8_weight_cache=True), H100)
    assert plan.fp8_base.on and plan.fp8_weight_cache.on
    assert plan.to_json()["fp8_weight_cache"]["on"] is True
    # where fp8_base cannot run, neither does its cache, and the reason says why
    plan = levers.speed_plan(make_recipe(tmp_path, fp8_base=True, fp8_weight_cache=True), A100)
    assert not plan.fp8_weight_cache.on and "fp8_base is off" in plan.fp8_weight_cache.reason


def test_the_memory_planner_counts_the_weight_cache():
    from qlora_doctor.memory.estimate import TrainSettings, estimate
    from qlora_doctor.memory.model import count_parameters
    from qlora_doctor.recipe.builtin import builtin_config

    counts = count_parameters(builtin_config("builtin:smollm2-135m-instruct"))
    fp8 = TrainSettings(micro_batch=4, seq_len=512, upcast_unquantized=False, fused_lora=True, lora_dropout=0.0,
                        fp8_base=True)
    plain, cached = estimate(counts, fp8), estimate(counts, TrainSettings(**{**vars(fp8), "fp8_weight_cache": True}))
    # 2 bytes a parameter: the float8 cast in both layouts torch._scaled_mm takes
    assert dict(cached.breakdown)["float8 weight cache (fp8_weight_cache)"] == 2 * counts.linear
    assert cached.peak_allocated_bytes - plain.peak_allocated_bytes == 2 * counts.linear


@pytest.mark.parametrize("fused, recompute", [(True, "full"), (False, "full"), (True, "selective")])
def test_the_weight_cache_trains_the_same_bits_and_dequantizes_each_weight_once(torchao, tiny_llama, tmp_path,
                                                                              monkeypatch, fused, recompute):
    """With fp8_weight_cache the loss and every LoRA gradient are those without it, bit for bit, over two steps'
    backward passes; each 4-bit weight is dequantized once (its first GEMM) and never again, and the cache holds
    the weight's float8 cast in both layouts, 2 bytes per parameter."""
    from qlora_doctor.trainer.fp8 import Fp8BaseGemm, fp8_gemms

    dequantized: list = []  # every dequantization for a float8 GEMM, inside the op or not
    weight = Fp8BaseGemm._weight
    monkeypatch.setattr(Fp8BaseGemm, "_weight", lambda self, w, *a: dequantized.append(w.data_ptr()) or
                        weight(self, w, *a))
    runs, calls = {}, {}
    for cache in (False, True):
        model = build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused, recompute=recompute, cache=cache)
        dequantized.clear()
        first = counted_loss_and_grads(model, seed=3)
        model.zero_grad(set_to_none=True)
        second = counted_loss_and_grads(model, seed=4)
        runs[cache], calls[cache] = (first, second, model), list(dequantized)
    assert len(calls[True]) == len(set(calls[True])) == PROJECTIONS * LAYERS  # each weight once, in two steps
    assert len(calls[False]) >= 2 * 2 * PROJECTIONS * LAYERS  # forward and backward GEMM, each step
    for (loss, grads, _), (ref_loss, ref, _) in zip(runs[True][:2], runs[False][:2]):
        assert loss == ref_loss
        assert set(grads) == set(ref)
        for name, grad in ref.items():
            assert torch.equal(grads[name], grad), name
    (_, _, first), (_, _, second), model = runs[True]
    # the first step's dequantizations: one per weight, inside the op or in the backward, wherever it came first
    dequantize = "bitsandbytes::dequantize_4bit"
    assert first.get(dequantize, 0) <= PROJECTIONS * LAYERS and dequantize not in second
    (gemm,) = fp8_gemms(model)
    # two float8 layouts per weight (torch._scaled_mm's mat2 for the output GEMM and for the input gradient's)
    assert gemm.cache_weights and len(gemm.cached) == 2 * PROJECTIONS * LAYERS
    import bitsandbytes as bnb

    base = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert gemm.cached_bytes() == 2 * base
    (uncached,) = fp8_gemms(runs[False][2])
    assert not uncached.cached and runs[False][1][2].get(dequantize, 0) > 0


@pytest.mark.parametrize("fused, recompute", [(True, "full"), (False, "full"), (True, "selective")])
def test_projections_reading_one_input_share_its_float8_cast_and_train_the_same_bits(torchao, tiny_llama, tmp_path,
                                                                                    monkeypatch, fused, recompute):
    """q/k/v_proj read one normed hidden state and gate/up_proj another: the direct path casts each once (4 input
    casts for a Llama layer's 7 GEMMs, forward and recomputed forward alike; selective recompute replays only
    gate/up, one cast for both), and the loss and every LoRA gradient equal, bit for bit, those of torchao's
    subclass path, which casts every GEMM's input."""
    from qlora_doctor.trainer import fp8

    class Counting:
        def __init__(self, cast):
            self.cast, self.calls = cast, 0

        def __call__(self, tensor):
            self.calls += 1
            return self.cast(tensor)

    model = build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused, recompute=recompute)
    (gemm,) = fp8.fp8_gemms(model)
    assert gemm.direct
    counting = gemm.casts["input"] = Counting(gemm.casts["input"])
    lookups = []
    input8 = fp8.Fp8BaseGemm._input8
    monkeypatch.setattr(fp8.Fp8BaseGemm, "_input8", lambda self, x2: lookups.append(1) or input8(self, x2))
    loss, grads = loss_and_grads(model)
    if recompute == "full":
        assert lookups and len(lookups) % (PROJECTIONS * LAYERS) == 0  # every forward GEMM, replays included
        assert counting.calls * PROJECTIONS == 4 * len(lookups)
    else:  # the forward's 7 GEMMs a layer (4 casts), then the replay's gate and up (1 cast)
        assert len(lookups) == (PROJECTIONS + 2) * LAYERS and counting.calls == (4 + 1) * LAYERS
    assert gemm.shared_input is None or gemm.shared_input[0]() is not None  # nothing kept past its input's life

    create = fp8.Fp8BaseGemm.create.__func__
    monkeypatch.setattr(fp8.Fp8BaseGemm, "create", classmethod(lambda cls, *a, **k: create(cls, *a, **k, direct=False)))
    reference = build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused, recompute=recompute)
    assert not fp8.fp8_gemms(reference)[0].direct
    ref_loss, ref_grads = loss_and_grads(reference)
    assert loss == ref_loss and set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name


# --- SwiGLU's row maxima for the largest casts (trainer/fp8_swiglu.py) --------------------------------------

@pytest.mark.parametrize("fused, recompute", [(True, "full"), (False, "full"), (True, "selective")])
def test_swiglu_row_maxima_feed_the_largest_casts_and_change_no_bit(torchao, tiny_llama, tmp_path, monkeypatch, fused,
                                                                    recompute):
    """apply_fp8_base routes the SwiGLU MLPs through SiluMulRowAmax (here transformers' MLP stands where Liger's
    would: the CPU has no Liger). Its notes serve down_proj's input cast in every forward (the replay of full
    recompute too; selective recompute keeps down_proj's output, so its replay casts nothing) and gate's and up's
    output-gradient casts, and the loss and every LoRA gradient are those of the same model whose casts read the
    tensors for their amax, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from qlora_doctor.trainer import fp8, fp8_swiglu

    monkeypatch.setattr(fp8_swiglu, "liger_swiglu_forward", lambda: LlamaMLP.forward)
    note = fp8_swiglu.RowAmaxNotes.note
    runs = {}
    for notes in (True, False):
        monkeypatch.setattr(fp8_swiglu.RowAmaxNotes, "note", note if notes else lambda self, tensor, row_amax: None)
        model = build(tiny_llama, tmp_path, monkeypatch, fp8=True, fused=fused, recompute=recompute)
        mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
        assert len(mlps) == LAYERS and all(fp8_swiglu.is_routed(m) for m in mlps)
        before = fp8_swiglu.ROW_AMAX.used
        loss, grads = loss_and_grads(model)
        runs[notes] = loss, grads, fp8_swiglu.ROW_AMAX.used - before
    forwards = 2 if recompute == "full" else 1
    assert runs[True][2] == (forwards + 2) * LAYERS and runs[False][2] == 0
    (loss, grads, _), (ref_loss, ref_grads, _) = runs[True], runs[False]
    assert loss == ref_loss and set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
    assert not fp8_swiglu.ROW_AMAX.notes  # every note dropped with its tensor


def test_swiglu_is_routed_only_where_every_projection_takes_the_notes(torchao, tiny_llama, tmp_path, monkeypatch):
    """Rowwise casts go through torchao's subclass, which reads no notes: its MLPs keep their forward."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from qlora_doctor.trainer import fp8, fp8_swiglu

    monkeypatch.setattr(fp8_swiglu, "liger_swiglu_forward", lambda: LlamaMLP.forward)
    monkeypatch.setattr(fp8, "RECIPE", "rowwise")
    create = fp8.Fp8BaseGemm.create.__func__
    monkeypatch.setattr(fp8.Fp8BaseGemm, "create", classmethod(lambda cls, recipe=fp8.RECIPE, **k: create(cls, "rowwise", **k)))
    model = build(tiny_llama, tmp_path, monkeypatch, fp8=True)
    assert not fp8.fp8_gemms(model)[0].direct
    assert not any(fp8_swiglu.is_routed(m) for m in model.modules())


def test_swiglu_forward_and_backward_and_their_row_maxima():
    """silu(a) * b and its gradients as Liger computes them (silu in float32, each result rounded once to the
    input dtype; da and db written into a and b), with each row's max |value|."""
    from qlora_doctor.trainer.fp8_swiglu import silu_mul, silu_mul_backward

    g = torch.Generator().manual_seed(0)
    a, b, dc = (torch.randn(6, 40, generator=g).to(torch.bfloat16) for _ in range(3))
    c, amax = silu_mul(a, b)
    assert c.dtype == torch.bfloat16 and torch.equal(amax, c.float().abs().amax(dim=-1))
    assert torch.equal(c, torch.nn.functional.silu(a.float()).to(torch.bfloat16) * b)
    a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    (torch.nn.functional.silu(a64) * b64).backward(dc.double())
    a_buffer, b_buffer = a.clone(), b.clone()
    da, db, amax_a, amax_b = silu_mul_backward(dc, a_buffer, b_buffer)
    assert da is a_buffer and db is b_buffer  # in place, as Liger's
    for ours, exact, maxima in ((da, a64.grad, amax_a), (db, b64.grad, amax_b)):
        assert torch.allclose(ours.double(), exact, rtol=2 ** -7, atol=1e-6)  # one bf16 rounding
        assert torch.equal(maxima, ours.float().abs().amax(dim=-1))


def test_a_row_maxima_note_holds_for_its_tensor_alive_and_unchanged_only():
    from qlora_doctor.trainer.fp8_swiglu import RowAmaxNotes

    notes = RowAmaxNotes()
    x = torch.randn(4, 8)
    notes.note(x.view(2, 16), x.abs().amax(dim=-1))
    assert notes.row_amax(x.reshape(8, 4)) is not None and notes.row_amax(x) is not None  # views of all of it
    assert notes.row_amax(x[:2]) is None  # part of it
    assert notes.row_amax(x.clone()) is None  # another tensor
    assert notes.used == 2
    x.mul_(2)  # changed by a torch op: the note no longer holds
    assert notes.row_amax(x) is None
    y = torch.randn(3, 5)
    notes.note(y, y.abs().amax(dim=-1))
    assert len(notes.notes) == 2
    del y
    assert len(notes.notes) == 1  # dropped with its tensor

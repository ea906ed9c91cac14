"""Memory planner: parameter counts on the meta device, the estimate's shape and calibration, fit and
suggestions, the doctor's check and `qlora-doctor plan`. CPU-only and offline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import machine, write_machine
from qlora_doctor.cli import cli
from qlora_doctor.core.errors import InputError
from qlora_doctor.doctor.memory import memory_fit_check
from qlora_doctor.runplan import build_run_plan
from qlora_doctor.memory.estimate import GIB, TrainSettings, estimate
from qlora_doctor.memory.model import count_parameters, load_model_config, lora_targets
from qlora_doctor.memory.plan import plan_config, plan_for, plan_recipe

TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, vocab_size=1000, tie_word_embeddings=True)
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
GPU_24GB = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "memory_total_mib": 24564}
GPU_80GB = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}


def test_counts_tiny_llama_exactly():
    c = count_parameters(TINY)
    h, kv, inter, layers, vocab = 64, 32, 128, 2, 1000
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter
    assert c.linear == layers * per_layer == 2 * 36864
    assert c.linear_largest == h * inter
    assert c.linear_tensors == 7 * layers
    assert c.embedding == vocab * h
    assert c.lm_head == 0 and c.tied_embeddings
    assert c.norms == (2 * layers + 1) * h
    assert c.other == 0
    assert (c.q_dim, c.kv_dim, c.num_layers, c.gated_mlp) == (64, 32, 2, True)
    untied = count_parameters({**TINY, "tie_word_embeddings": False})
    assert untied.lm_head == vocab * h and not untied.tied_embeddings
    assert untied.total == c.total + vocab * h


def test_counts_llama3_8b_match_the_published_size():
    c = count_parameters(LLAMA3_8B)
    assert c.total == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    assert c.linear == 32 * 218_103_808


def test_builtin_model_config_is_read_without_download():
    config = load_model_config("builtin:smollm2-135m-instruct")
    c = count_parameters(config)
    assert c.tied_embeddings and c.num_layers == 30 and c.total == 134_515_008


def test_lora_targets_follow_peft_matching():
    c = count_parameters(TINY)
    assert [t.name for t in lora_targets(c, "all-linear")] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert [t.name for t in lora_targets(c, ("q_proj", "v_proj"))] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert [t.name for t in lora_targets(c, r".*\.mlp\.(up|down)_proj")] == ["mlp.up_proj", "mlp.down_proj"]
    assert lora_targets(c, ("nonexistent",)) == ()


def _est(cache_at_start_bytes=None, **changes):
    base = TrainSettings(micro_batch=4, seq_len=2048, optim="adamw_torch", lora_r=16)
    return estimate(count_parameters(LLAMA3_8B), replace(base, **changes), cache_at_start_bytes)


def test_more_tokens_need_more_memory():
    assert _est(micro_batch=2).total_bytes < _est(micro_batch=4).total_bytes < _est(micro_batch=8).total_bytes
    assert _est(seq_len=512).total_bytes < _est(seq_len=2048).total_bytes < _est(seq_len=8192).total_bytes


def test_checkpointing_reduces_activations():
    def activations(e):
        return sum(b for n, b in e.breakdown if n.startswith("activations"))

    on, off = _est(gradient_checkpointing=True), _est(gradient_checkpointing=False)
    assert activations(on) * 5 < activations(off)
    assert on.total_bytes < off.total_bytes


def test_double_quant_and_8bit_states_save_memory():
    assert _est(double_quant=True).total_bytes < _est(double_quant=False).total_bytes
    single = dict(_est(double_quant=False).breakdown)["quantization constants"]
    assert single == 4 * count_parameters(LLAMA3_8B).linear // 64  # one fp32 absmax per 64 weights
    assert _est(optim="paged_adamw_8bit").total_bytes < _est(optim="adamw_torch").total_bytes
    assert _est(lora_r=8).total_bytes < _est(lora_r=64).total_bytes


def test_breakdown_sums_to_the_total():
    e = _est()
    assert sum(b for _, b in e.breakdown) == e.total_bytes
    assert e.peak_allocated_bytes < e.peak_reserved_bytes < e.total_bytes


def test_reserved_peak_is_never_below_what_training_starts_with():
    # The 8B fast-path point that missed by 15%: a step small enough to fit in the cache it starts with.
    small = dict(micro_batch=1, seq_len=512, lora_r=8, upcast_unquantized=False, liger_kernel=True, fused_lora=True)
    default = _est(**small)
    loaded = dict(default.breakdown)
    at_start = (loaded["4-bit weights (NF4, 2 per byte)"] + loaded["quantization constants (double quant)"]
                + loaded["embeddings, lm_head, norms (bfloat16)"]
                + loaded["cuBLAS workspaces (forward and backward threads)"] + default.trainable_params * 4)
    # by default the cache loading leaves: one bf16 copy of the largest weight (the MLP's 14336 x 4096)
    assert default.reserved_at_start_bytes == at_start + 14336 * 4096 * 2
    assert default.peak_phase == "recompute" and default.peak_reserved_bytes > default.reserved_at_start_bytes
    assert _est(**small, cache_at_start_bytes=0).peak_reserved_bytes == default.peak_reserved_bytes

    held = _est(**small, cache_at_start_bytes=int(1.48 * GIB))
    assert held.peak_phase == "start"
    assert held.peak_reserved_bytes == held.reserved_at_start_bytes == at_start + int(1.48 * GIB)
    assert held.peak_allocated_bytes == default.peak_allocated_bytes  # the step itself is the same
    cache_row = dict(held.breakdown)["allocator cache left by loading (reserved from the start, not filled by the step)"]
    assert cache_row == held.peak_reserved_bytes - held.peak_allocated_bytes
    assert "allocator fragmentation (reserved - allocated)" not in dict(held.breakdown)
    assert sum(b for _, b in held.breakdown) == held.total_bytes
    # a large step reuses that cache: the same start changes nothing at 8 x 2048 tokens
    large = dict(small, micro_batch=8, seq_len=2048)
    assert _est(**large, cache_at_start_bytes=int(1.48 * GIB)).peak_reserved_bytes == _est(**large).peak_reserved_bytes


H100_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "memory_accuracy_h100.json"


def _memory_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_table", H100_RESULTS.parent.parent / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESULTS = H100_RESULTS.parent
# (results, measured points, points left out of the reserved comparison, committed table, its command's flags)
MEASURED_RESULTS = [
    ("memory_accuracy_h100.json", 28, ["fast llama-3-8b s512 b1 gc r8"], "memory_table_h100.md", " --fit"),
    ("memory_accuracy_8b_rerun_h100.json", 13, [], "memory_table_8b_rerun_h100.md", ""),
    ("memory_accuracy_70b_h100.json", 1, [], "memory_table_70b_h100.md", ""),
]


@pytest.mark.parametrize("results, count, left_out", [r[:3] for r in MEASURED_RESULTS])
def test_every_measured_h100_point_within_10_percent(results, count, left_out):
    """The guard the README cites: every point of the committed H100 results (runs through the trainer's
    Trainer path, plain and fast path: the 28-point grid, the rerun of its 8B points, the 70B point),
    replayed through the current planner, within 10% of the measured peak reserved memory, and its
    allocated peak within 2%.

    The grid replaces the issue's two calibration points (Llama-3-8B, seq 2048, r=16, plain path: batch 8 ->
    44.4 GiB allocated / 57.5 GiB reserved, batch 4 -> 26.6 / 32.9 GiB). They came from a different loop
    than `qlora-doctor run` (one that keeps the compute-dtype logits alive through backward); the same runs
    through the Trainer measured 40.5 / 50.9 and 24.7 / 29.1 GiB, which the planner now predicts, so the
    issue's figures are 14% and 11% off in reserved memory and no longer a valid reference.

    Points that recorded the allocator cache they started with (the rerun) are replayed from it. One point
    of the grid is left out of the reserved comparison and must stay the only one: it did not record its
    start, and its reserved peak holds cache carried over from the previous point of the bench process
    (memory_table.inherited_cache says why, with numbers); its allocated peak is still compared."""
    table = _memory_table()
    _, points = table.load([RESULTS / results])
    measured = [p for p in points if table.is_measured(p)]
    assert len(measured) == count
    off, excluded = [], []
    for p in measured:
        est, m = table.replay(p), p["measured"]
        reserved = table.error_pct(est.peak_reserved_bytes, m["max_memory_reserved_bytes"])
        allocated = table.error_pct(est.peak_allocated_bytes, m["max_memory_allocated_bytes"])
        if abs(allocated) > 2:
            off.append(f"{p['name']}: allocated {allocated:+.1f}%")
        if table.inherited_cache(p, est):
            excluded.append(p["name"])
        elif abs(reserved) > 10:
            off.append(f"{p['name']}: reserved {reserved:+.1f}%")
    assert not off, off
    assert excluded == left_out


def test_the_8b_point_that_missed_is_bound_by_the_cache_it_started_with():
    """8B, seq 512, batch 1, checkpointing, r 8, fast path: 6.1 GiB predicted for the step, 7.25 GiB
    reserved, because the point started with 6.94 GiB reserved (1.48 GiB cached). Replayed from that start
    it is within 5%; the planner's step alone is not within 10%."""
    table = _memory_table()
    _, points = table.load([RESULTS / "memory_accuracy_8b_rerun_h100.json"])
    point = next(p for p in points if p["name"] == "fast llama-3-8b s512 b1 gc r8")
    m = point["measured"]
    assert table.start_cache(point) == m["reserved_at_start_bytes"] - m["allocated_at_start_bytes"] > 1.4 * GIB
    est = table.replay(point)
    assert est.peak_phase == "start"
    # the planner's allocated start state is the measured one (within 0.5%), the cache comes from the record
    assert est.reserved_at_start_bytes == pytest.approx(m["reserved_at_start_bytes"], rel=0.005)
    assert abs(table.error_pct(est.peak_reserved_bytes, m["max_memory_reserved_bytes"])) < 5
    step_alone = estimate(table.counts_of(point), table.settings_of(point))
    assert table.error_pct(step_alone.peak_reserved_bytes, m["max_memory_reserved_bytes"]) < -10


def test_inherited_cache_is_told_apart_from_the_points_own_fragmentation():
    table = _memory_table()
    _, points = table.load([H100_RESULTS])
    by_name = {p["name"]: p for p in points}
    carried = by_name["fast llama-3-8b s512 b1 gc r8"]
    est = table.replay(carried)
    assert "cache left by the previous point" in table.inherited_cache(carried, est)
    # a large but genuine fragmentation (the plain path's logits) is not mistaken for carried cache
    plain = by_name["plain llama-3-8b s2048 b8 gc r16"]
    assert table.inherited_cache(plain, table.replay(plain)) is None
    # newer results record the cache at the start of the point: the replay starts from it, nothing is left out
    recorded = {**carried, "measured": {**carried["measured"], "reserved_at_start_bytes": 7 * GIB,
                                        "allocated_at_start_bytes": 5 * GIB}}
    assert table.start_cache(recorded) == 2 * GIB and table.start_cache(carried) is None
    from_start = table.replay(recorded)
    assert table.inherited_cache(recorded, from_start) is None
    assert from_start.peak_phase == "start" and from_start.peak_reserved_bytes > est.peak_reserved_bytes


def test_loads_are_told_apart_by_their_reserved_peak():
    """What the load of each worker left, from `load_peak_reserved_bytes`: the grid's 8B worker loaded a
    checkpoint from disk and peaked one weight in flight above the model (which is what the planner's
    load_cache_bytes rests on); the grid's 1B worker and the rerun's 8B worker first wrote the random
    checkpoint from the GPU (a peak of the whole model in bf16): the rerun's start cache comes from that."""
    from qlora_doctor.memory.estimate import load_cache_bytes, loaded_model_bytes

    table = _memory_table()
    fresh = {}
    for results in ("memory_accuracy_h100.json", "memory_accuracy_8b_rerun_h100.json"):
        _, points = table.load([RESULTS / results])
        fresh.update({(results, p["shape"]): p for p in points if p.get("fresh_process")})
    from_disk = fresh[("memory_accuracy_h100.json", "llama-3-8b")]
    counts, settings = table.counts_of(from_disk), table.settings_of(from_disk)
    gap = from_disk["load_peak_reserved_bytes"] - loaded_model_bytes(counts, settings)
    largest = counts.linear_largest
    assert load_cache_bytes(counts, settings) == largest * 2
    assert gap == pytest.approx(largest * 2 + largest // 2, rel=0.05)  # that weight in bf16 + its 4-bit copy
    assert "loaded from disk" in table.load_note(from_disk)
    for key in (("memory_accuracy_h100.json", "llama-3.2-1b"), ("memory_accuracy_8b_rerun_h100.json", "llama-3-8b")):
        point = fresh[key]
        assert point["load_peak_reserved_bytes"] >= table.counts_of(point).total * 2, key
        assert "wrote the random checkpoint from the GPU" in table.load_note(point), key


@pytest.mark.parametrize("results, table_file, flags", [(r[0], r[3], r[4]) for r in MEASURED_RESULTS])
def test_committed_h100_table_is_what_the_current_planner_predicts(results, table_file, flags):
    table = _memory_table()
    runs, points = table.load([RESULTS / results])
    committed = (RESULTS / table_file).read_text()
    assert table.table(runs, points) in committed, (
        f"bench/results/{table_file} is stale: regenerate it with `python3 bench/memory_table.py "
        f"bench/results/{results}{flags} > bench/results/{table_file}`")


def test_fragmentation_fit_reproduces_the_shipped_constants():
    from qlora_doctor.memory.estimate import FRAGMENTATION_BYTES, FRAGMENTATION_LOGITS, FRAGMENTATION_WORKING

    table = _memory_table()
    _, points = table.load([H100_RESULTS])
    logits, working, constant = table.least_squares(table.fit_rows(points))
    assert logits == pytest.approx(FRAGMENTATION_LOGITS, abs=0.01)
    assert working == pytest.approx(FRAGMENTATION_WORKING, abs=0.01)
    assert constant * GIB == pytest.approx(FRAGMENTATION_BYTES, abs=0.01 * GIB)


def test_fits_is_judged_against_the_gpu():
    settings = TrainSettings(micro_batch=8, seq_len=2048, optim="adamw_torch")
    assert plan_config(LLAMA3_8B, settings, gpu_bytes=80 * GIB).fits is True
    too_small = plan_config(LLAMA3_8B, settings, gpu_bytes=24 * GIB)
    assert too_small.fits is False and too_small.suggestions
    unknown = plan_config(LLAMA3_8B, settings, gpu_bytes=None)
    assert unknown.fits is None and unknown.suggestions == ()


def test_suggestions_fit_by_the_planners_own_estimate():
    counts = count_parameters(LLAMA3_8B)
    settings = TrainSettings(micro_batch=8, seq_len=4096, grad_accum=2, gradient_checkpointing=False,
                             optim="adamw_torch")
    gpu = 24 * GIB
    plan = plan_for(counts, settings, "24 GB card", gpu)
    assert plan.fits is False
    kinds = {s.kind: s for s in plan.suggestions}
    assert {"micro_batch", "seq_len", "gradient_checkpointing", "optimizer"} <= set(kinds)
    keys = {"training.per_device_train_batch_size": "micro_batch", "training.gradient_accumulation_steps":
            "grad_accum", "training.max_seq_length": "seq_len", "training.gradient_checkpointing":
            "gradient_checkpointing", "training.optim": "optim", "training.per_device_eval_batch_size":
            "eval_micro_batch"}
    for suggestion in plan.suggestions:
        changed = replace(settings, **{keys[k]: v for k, v in suggestion.changes})
        if suggestion.kind in ("micro_batch", "seq_len"):
            # without checkpointing even one sequence of 4096 is too much: they add checkpointing
            assert ("training.gradient_checkpointing", True) in suggestion.changes
        assert estimate(counts, changed).total_bytes == suggestion.total_bytes
        assert (suggestion.total_bytes <= gpu) == suggestion.fits
    batch = dict(kinds["micro_batch"].changes)
    assert batch["training.per_device_train_batch_size"] * batch["training.gradient_accumulation_steps"] == 16
    # the largest: one more sequence per micro-batch (among divisors of 16) would not fit
    b = batch["training.per_device_train_batch_size"]
    bigger = [d for d in range(b + 1, 8) if 16 % d == 0]
    for d in bigger:
        assert estimate(counts, replace(settings, micro_batch=d, grad_accum=16 // d,
                                        gradient_checkpointing=True)).total_bytes > gpu
    seq = dict(kinds["seq_len"].changes)["training.max_seq_length"]
    assert seq % 128 == 0 and seq < 4096
    at_batch = dict(kinds["seq_len"].changes).get("training.per_device_train_batch_size", 8)
    assert estimate(counts, replace(settings, micro_batch=at_batch, seq_len=seq + 128,
                                    gradient_checkpointing=True)).total_bytes > gpu


def test_suggestions_keep_the_recipes_checkpointing_when_that_suffices():
    settings = TrainSettings(micro_batch=8, seq_len=2048, grad_accum=1, optim="adamw_torch")
    plan = plan_config(LLAMA3_8B, settings, gpu_bytes=24 * GIB)
    batch = next(s for s in plan.suggestions if s.kind == "micro_batch")
    assert batch.fits and dict(batch.changes) == {"training.per_device_train_batch_size": 2,
                                                  "training.gradient_accumulation_steps": 4}


def test_a_model_too_big_for_any_setting_says_so():
    plan = plan_config(LLAMA3_8B, TrainSettings(micro_batch=1, seq_len=512), gpu_bytes=4 * GIB)
    assert plan.fits is False
    assert [s.kind for s in plan.suggestions] == ["gpu"]
    assert "more memory or a smaller model" in plan.suggestions[0].text


# --- recipes, the doctor's check, the CLI -----------------------------------------------------------

def _recipe_dir(tmp_path: Path, config: dict, batch: int = 8, seq: int = 2048, optim: str = "adamw_torch") -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "r.yaml").write_text(
        "model:\n  name_or_path: model\n"
        "dataset:\n  path: train.jsonl\n  format: text\n"
        f"training:\n  output_dir: out\n  per_device_train_batch_size: {batch}\n"
        f"  max_seq_length: {seq}\n  optim: {optim}\n")
    return tmp_path / "r.yaml"


def _recipe(tmp_path: Path, config: dict, **kw):
    from qlora_doctor.recipe.schema import load_recipe

    return load_recipe(_recipe_dir(tmp_path, config, **kw))


def test_plan_recipe_resolves_precision_for_the_machine(tmp_path):
    recipe = _recipe(tmp_path, LLAMA3_8B)
    on_h100 = plan_recipe(recipe, machine(gpus=[GPU_80GB]))
    assert on_h100.settings.compute_dtype == "bfloat16" and on_h100.settings.mixed_precision
    assert on_h100.fits is True and on_h100.gpu_name == GPU_80GB["name"]
    on_t4 = plan_recipe(recipe, machine(gpus=[{"name": "Tesla T4", "compute_capability": "7.5",
                                               "memory_total_mib": 15360}, GPU_80GB]))
    assert on_t4.settings.compute_dtype == "float16"
    assert on_t4.gpu_name == "Tesla T4" and on_t4.fits is False  # the smallest GPU is judged


def test_memory_check_fails_with_suggestions_and_passes(tmp_path):
    recipe = _recipe(tmp_path, LLAMA3_8B)
    failed = _fit(recipe, machine(gpus=[GPU_24GB]))
    assert failed is not None and failed.status == "fail"
    assert "per_device_train_batch_size" in failed.fix and "max_seq_length" in failed.fix
    passed = _fit(recipe, machine(gpus=[GPU_80GB]))
    assert passed is not None and passed.status == "pass"


def test_memory_check_unknown_without_gpu_memory_and_absent_without_gpu(tmp_path):
    recipe = _recipe(tmp_path, LLAMA3_8B)
    unknown = _fit(recipe, machine(gpus=[{"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}]))
    assert unknown is not None and unknown.status == "unknown"
    assert _fit(recipe, machine(gpus=[], driver_version="")) is None


def test_hub_model_without_hub_is_a_clear_input_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="config of hub model 'qlora-doctor-test/none' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set.*local folder"):
        load_model_config("qlora-doctor-test/none")


def test_local_folder_without_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        load_model_config(str(tmp_path))


def test_cli_plan_exit_codes(tmp_path):
    recipe = str(_recipe_dir(tmp_path, LLAMA3_8B))
    runner = CliRunner()
    fits = runner.invoke(cli, ["plan", recipe, "--machine", str(write_machine(tmp_path / "h100.json", gpus=[GPU_80GB]))])
    assert fits.exit_code == 0, fits.output
    assert "fits NVIDIA H100 80GB HBM3" in fits.output
    small = write_machine(tmp_path / "4090.json", gpus=[GPU_24GB])
    short = runner.invoke(cli, ["plan", recipe, "--machine", str(small), "--json"])
    assert short.exit_code == 1, short.output
    data = json.loads(short.output)
    assert data["fits"] is False and data["gpu_bytes"] == 24564 * 2**20
    assert sum(row["bytes"] for row in data["breakdown"]) == data["total_bytes"]
    assert any(s["kind"] == "micro_batch" and s["fits"] for s in data["suggestions"])


def test_cli_plan_bad_input_exits_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["plan", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2, missing.output
    recipe = _recipe_dir(tmp_path, LLAMA3_8B)
    (tmp_path / "model" / "config.json").unlink()
    no_config = runner.invoke(cli, ["plan", str(recipe), "--machine",
                                    str(write_machine(tmp_path / "m.json", gpus=[GPU_80GB]))])
    assert no_config.exit_code == 2, no_config.output
    assert "has no config.json" in no_config.output


def test_doctor_recipe_checks_include_the_memory_fit(tmp_path):
    from qlora_doctor.doctor.recipe import recipe_checks

    recipe = _recipe(tmp_path, LLAMA3_8B, batch=8, seq=4096)
    on_4090 = {c.id: c for c in recipe_checks(recipe, machine(gpus=[GPU_24GB]))}
    assert on_4090["recipe.memory"].status == "fail"
    on_cpu = {c.id for c in recipe_checks(recipe, machine(gpus=[], driver_version=""))}
    assert "recipe.memory" not in on_cpu


def _fit(recipe, m):
    """The memory check on the run plan `check --recipe` builds (offline)."""
    return memory_fit_check(build_run_plan(recipe, m, where="test"), m)


def test_doctor_check_does_not_wait_for_the_hub(tmp_path):
    from qlora_doctor.recipe.schema import load_recipe

    path = _recipe_dir(tmp_path, LLAMA3_8B)
    path.write_text(path.read_text().replace("name_or_path: model", "name_or_path: qlora-doctor-test/none"))
    check = _fit(load_recipe(path), machine(gpus=[GPU_80GB]))
    assert check is not None and check.status == "unknown"
    assert "not in the local Hugging Face cache" in check.detail


def test_a_large_evaluation_batch_can_be_the_peak():
    train_only = TrainSettings(micro_batch=1, seq_len=2048, optim="adamw_torch")
    with_eval = replace(train_only, eval_micro_batch=8)
    counts = count_parameters(LLAMA3_8B)
    assert estimate(counts, with_eval).peak_phase == "eval"
    assert estimate(counts, with_eval).total_bytes > estimate(counts, train_only).total_bytes
    assert estimate(counts, replace(train_only, eval_micro_batch=1)).peak_phase == "loss"
    gpu = estimate(counts, replace(train_only, eval_micro_batch=2)).total_bytes
    plan = plan_for(counts, with_eval, "card", gpu)
    fix = next(s for s in plan.suggestions if s.kind == "eval_batch")
    assert fix.fits and dict(fix.changes) == {"training.per_device_eval_batch_size": 2}


# --- the fast path: `performance:` levers (qlora_doctor/trainer/speed.py) ------------------------------

FAST = dict(upcast_unquantized=False, liger_kernel=True, fused_lora=True)


def _liger_available(monkeypatch):
    """liger-kernel as on the GPU machine (installed, patches llama); it is not installed here."""
    from qlora_doctor.recipe import levers as speed

    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    monkeypatch.setattr(speed, "liger_supported_model_types", lambda: frozenset({"llama", "qwen2"}))


def _rows(e, prefix):
    return sum(b for n, b in e.breakdown if n.startswith(prefix))


def test_fast_path_8b_is_far_below_the_plain_path(tmp_path, monkeypatch):
    _liger_available(monkeypatch)
    recipe = _recipe(tmp_path, LLAMA3_8B, batch=8, seq=2048)
    h100 = machine(gpus=[GPU_80GB])
    with_eval = plan_recipe(recipe, h100)
    s = with_eval.settings
    assert (s.upcast_unquantized, s.liger_kernel, s.fused_lora, s.checkpoint_layers) == (False, True, True, "all")
    # Evaluation still builds full logits (Liger's forward does outside training): with them gone from
    # training, an evaluation batch of 8 is this recipe's peak.
    assert s.eval_micro_batch == 8 and with_eval.peak_phase == "eval"
    counts = count_parameters(LLAMA3_8B)
    fast = plan_for(counts, replace(s, eval_micro_batch=None), None, None)
    plain = plan_for(counts, replace(s, eval_micro_batch=None, upcast_unquantized=True, liger_kernel=False,
                                     fused_lora=False), None, None)
    assert plain.total_bytes / GIB > 45 and fast.total_bytes / GIB < 16  # measured: 50.9 and 15.4 GiB reserved
    assert fast.calibration == "fast" and plain.calibration == "plain"
    parts = dict(fast.breakdown)
    assert "logits and loss buffers" not in parts  # no b*s*vocab logits at all
    assert "lm_head weight cast for autocast" not in parts
    assert parts["embeddings, lm_head, norms (bfloat16)"] == 2 * (count_parameters(LLAMA3_8B).total
                                                                 - count_parameters(LLAMA3_8B).linear)
    # the checkpointed inputs are bf16: half of the plain path's float32 residual stream
    assert parts["activations: checkpointed layer inputs"] < 0.6 * dict(plain.breakdown)[
        "activations: checkpointed layer inputs"]


def test_liger_chunk_follows_liger_kernels_formula():
    from qlora_doctor.memory.activations import liger_chunk_tokens

    # inc_factor = cdiv(128256, 4096) = 32; next_power_of_2(cdiv(16384, 32)) = 512
    assert liger_chunk_tokens(8 * 2048, 128256, 4096) == 512
    assert liger_chunk_tokens(3 * 1000, 128256, 4096) == 128  # cdiv(3000, 32) = 94 -> 128
    assert liger_chunk_tokens(20, 1000, 64) == 2  # cdiv(1000, 64) = 16; cdiv(20, 16) = 2
    assert liger_chunk_tokens(5, 100, 4096) == 5  # one chunk never exceeds the tokens


@pytest.mark.parametrize("gc", [True, False])
def test_each_lever_moves_the_prediction_the_right_way(gc):
    plain = dict(micro_batch=4, gradient_checkpointing=gc, lora_dropout=0.05)
    fast = {**plain, **FAST}
    base, all_on = _est(**plain), _est(**fast)
    assert all_on.total_bytes < base.total_bytes
    for lever, value in (("upcast_unquantized", False), ("liger_kernel", True), ("fused_lora", True)):
        on_plain = _est(**{**plain, lever: value})
        off_fast = _est(**{**fast, lever: not value})
        assert on_plain.total_bytes < base.total_bytes, lever
        assert off_fast.total_bytes > all_on.total_bytes, lever
    # Liger's kernels save fewer per-layer tensors too (SwiGLU: gate and up, not the activation).
    no_ckpt = dict(micro_batch=1, gradient_checkpointing=False, upcast_unquantized=False)
    assert (_rows(_est(**no_ckpt, liger_kernel=True), "activations: all layers")
            < _rows(_est(**no_ckpt, liger_kernel=False), "activations: all layers"))
    # fused LoRA: no dropout masks or copies; without dropout peft saves shared inputs too, so less gain
    with_dropout = _rows(_est(**no_ckpt, fused_lora=False), "activations") - _rows(_est(**no_ckpt, fused_lora=True), "activations")
    no_dropout = (_rows(_est(**no_ckpt, lora_dropout=0.0, fused_lora=False), "activations")
                  - _rows(_est(**no_ckpt, lora_dropout=0.0, fused_lora=True), "activations"))
    assert with_dropout > 0 and 0 <= no_dropout < with_dropout


def test_selective_checkpointing_is_between_all_and_none():
    def total(**kw):
        return _est(micro_batch=4, **FAST, **kw).total_bytes

    everything, none = total(checkpoint_layers="all"), total(gradient_checkpointing=False)
    half, quarter = total(checkpoint_layers=0.5), total(checkpoint_layers=8)
    assert everything < half < quarter < none
    assert total(checkpoint_layers=0) == none and total(checkpoint_layers=1.0) == everything
    e = _est(micro_batch=4, checkpoint_layers=0.5)  # the plain path but for this lever
    assert e.calibration == "fast"
    assert any("(16 of 32 layers)" in n for n, _ in e.breakdown)
    assert _est(micro_batch=4, gradient_checkpointing=False).calibration == "plain"


def test_suggestions_turn_on_checkpointing_for_every_layer():
    counts = count_parameters(LLAMA3_8B)
    settings = TrainSettings(micro_batch=8, seq_len=2048, optim="adamw_torch", checkpoint_layers=0.25, **FAST)
    plan = plan_for(counts, settings, "24 GB card", 24 * GIB)
    assert plan.fits is False
    ckpt = next(s for s in plan.suggestions if s.kind == "gradient_checkpointing")
    assert dict(ckpt.changes) == {"training.gradient_checkpointing": True, "performance.checkpoint_layers": "all"}
    assert ckpt.total_bytes == estimate(counts, replace(settings, checkpoint_layers="all")).total_bytes


def _recipe_with(tmp_path, performance: str = "", training: str = "", lora: str = ""):
    path = _recipe_dir(tmp_path, LLAMA3_8B)
    text = path.read_text() + training
    if lora:
        text += f"lora:\n{lora}"
    if performance:
        text += f"performance:\n{performance}"
    path.write_text(text)
    from qlora_doctor.recipe.schema import load_recipe

    return load_recipe(path)


@pytest.mark.parametrize("liger", [True, False])
@pytest.mark.parametrize("performance, training, lora", [
    ("", "", ""),
    ("  upcast_unquantized: true\n  checkpoint_layers: all\n  liger_kernel: false\n  fused_lora: false\n"
     "  padding_free: false\n  group_by_length: false\n", "", ""),
    ("  checkpoint_layers: 0.5\n  liger_kernel: true\n  torch_compile: true\n", "", ""),
    ("  checkpoint_layers: 0\n", "", ""),
    ("", "  gradient_checkpointing: false\n", ""),
    ("  padding_free: true\n", "", "  use_dora: true\n"),
])
def test_planner_decides_levers_exactly_as_the_trainer(tmp_path, monkeypatch, liger, performance, training, lora):
    from qlora_doctor.memory.plan import settings_from_recipe
    from qlora_doctor.recipe import levers as speed
    from qlora_doctor.recipe.precision import resolve_precision

    if liger:
        _liger_available(monkeypatch)
    recipe = _recipe_with(tmp_path, performance, training, lora)
    for m in (machine(gpus=[GPU_80GB]), machine(gpus=[], driver_version=""),
              machine(gpus=[{"name": "Tesla T4", "compute_capability": "7.5", "memory_total_mib": 15360}])):
        trainer = speed.speed_plan(recipe, resolve_precision(recipe, m), "llama")
        s = settings_from_recipe(recipe, m)  # model type read from the recipe's local config.json
        assert s.levers == tuple(trainer.levers())
        assert (s.upcast_unquantized, s.gradient_checkpointing, s.checkpoint_layers, s.liger_kernel, s.fused_lora) == (
            trainer.upcast_unquantized.on, trainer.checkpointing.on, trainer.checkpoint_layers,
            trainer.liger_kernel.on, trainer.fused_lora.on)


def test_plan_notes_say_which_levers_are_assumed(tmp_path):
    recipe = _recipe_with(tmp_path, "  torch_compile: true\n")
    plan = plan_recipe(recipe, machine(gpus=[GPU_80GB]))
    notes = " ".join(plan.notes)
    assert "liger_kernel off (liger-kernel is not installed" in notes  # as in this environment
    assert "every micro-batch is counted as full" in notes  # group_by_length is on by default
    assert "torch_compile" in notes
    data = plan.to_json()
    assert data["settings"]["levers"][0] == {"name": "upcast_unquantized", "on": False,
                                             "reason": "unquantized weights stay in the compute dtype"}
    assert data["calibration"] == "fast"


@pytest.mark.parametrize("batch, gc, dropout, reserved_gib", [(8, True, 0.0, 14.5), (4, False, 0.0, 43.5)])
def test_fast_path_first_principles_check(batch, gc, dropout, reserved_gib):
    # Not fitted: an off-the-shelf probe on one H100 (Llama-3-8B shape, seq 2048, r=16 all-linear, NF4 +
    # double quant, no fp32 upcast, non-reentrant checkpointing, Liger's kernels, peft's LoRA) measured
    # 14.5 GiB reserved at batch 8 with checkpointing and 43.5 GiB at batch 4 without. Its peft LoRA
    # cannot have stored dropout copies and masks (117 KB per token per layer would not fit 43.5 GiB),
    # so it is compared with dropout 0. Not used to fit anything.
    e = _est(micro_batch=batch, gradient_checkpointing=gc, lora_dropout=dropout, upcast_unquantized=False,
             liger_kernel=True)
    assert e.peak_reserved_bytes / GIB == pytest.approx(reserved_gib, rel=0.10)


# --- checkpoint_layers: auto ----------------------------------------------------------------------------

def _auto(recipe, *more):
    from qlora_doctor.recipe.schema import apply_overrides

    return apply_overrides(recipe, ["performance.checkpoint_layers=auto", *more])


def test_auto_checkpointing_recomputes_the_fewest_layers_that_fit_85_percent(tmp_path, monkeypatch):
    from qlora_doctor.memory.plan import AUTO_CHECKPOINT_SHARE

    _liger_available(monkeypatch)
    recipe = _auto(_recipe(tmp_path, LLAMA3_8B, batch=8, seq=2048))
    h100 = machine(gpus=[GPU_80GB])
    plan = plan_recipe(recipe, h100)
    chosen = plan.settings.checkpoint_layers
    assert isinstance(chosen, int) and 0 <= chosen < 32, chosen  # an 80 GB card has room to spare at 8B
    budget = AUTO_CHECKPOINT_SHARE * plan.gpu_bytes
    assert plan.total_bytes <= budget
    counts = count_parameters(LLAMA3_8B)
    if chosen > 0:  # one layer fewer would not fit: the fewest, so the fastest
        assert plan_for(counts, replace(plan.settings, checkpoint_layers=chosen - 1), None, None).total_bytes > budget
    assert any(f"{chosen} of 32 layers recompute" in n for n in plan.notes)
    small = plan_recipe(recipe, machine(gpus=[{**GPU_80GB, "memory_total_mib": 24576}]))
    assert small.settings.checkpoint_layers == "all" or small.settings.checkpoint_layers > chosen


def test_auto_checkpointing_is_all_without_a_gpu_and_under_fsdp(tmp_path):
    recipe = _auto(_recipe(tmp_path, LLAMA3_8B))
    assert plan_recipe(recipe, machine(gpus=[], driver_version="")).settings.checkpoint_layers == "all"
    fsdp = _auto(recipe, "distributed.strategy=fsdp", "distributed.num_processes=2")
    assert plan_recipe(fsdp, machine(gpus=[GPU_80GB, GPU_80GB])).settings.checkpoint_layers == "all"


def test_run_uses_the_planners_choice_for_auto(tmp_path, monkeypatch):
    from qlora_doctor.runplan import build_run_plan

    _liger_available(monkeypatch)
    recipe = _auto(_recipe(tmp_path, LLAMA3_8B, batch=8, seq=2048))
    h100 = machine(gpus=[GPU_80GB])
    resolved = build_run_plan(recipe, h100, where="test").recipe
    assert resolved.performance.checkpoint_layers == plan_recipe(recipe, h100).settings.checkpoint_layers != "auto"
    on_cpu = build_run_plan(recipe, machine(gpus=[], driver_version=""), where="test").recipe
    assert on_cpu.performance.checkpoint_layers == "all"
    plain = _recipe(tmp_path, LLAMA3_8B)
    plain = plain.model_copy(update={"performance": plain.performance.model_copy(
        update={"offload_checkpoints": False, "recompute": "full"})})
    assert build_run_plan(plain, h100, where="test").recipe is plain  # nothing `auto`: the recipe as it was
    # the defaults (offload_checkpoints and recompute auto) are decided against the host's memory
    defaults = _recipe(tmp_path, LLAMA3_8B)
    big_host = machine(gpus=[GPU_80GB], host_memory_mib=256 * 1024)
    decided = build_run_plan(defaults, big_host, where="test")
    assert decided.recipe.performance.offload_checkpoints is True
    assert decided.recipe.performance.recompute == "selective"
    assert decided.levers.offload_checkpoints.on and decided.levers.recompute.on
    # `plan` lists them among the levers that are on, with what decided them
    levers = {lever.name: lever for lever in decided.memory.settings.levers}
    assert levers["offload_checkpoints"].on and levers["recompute"].on
    assert levers["recompute"].reason.startswith("offload_checkpoints auto: on, recompute auto: selective")
    unknown = build_run_plan(defaults, h100, where="test")
    assert unknown.recipe.performance.offload_checkpoints is False
    assert unknown.recipe.performance.recompute == "full"
    assert any("host's memory is unknown" in note for note in unknown.memory.notes)


@pytest.mark.parametrize("name", ["8b_s512_b1_built_in_process.json", "8b_s512_b1_loaded_from_disk.json"])
def test_the_point_the_grid_left_out_remeasured_cleanly_is_within_10_percent(name):
    """The grid's one excluded point (8B, seq 512, batch 1), measured again on an H100 in a fresh process with
    the fixed bench (bench/results/memory_recheck_h100/): 6.16 GiB reserved, the planner 6.14 GiB."""
    table = _memory_table()
    _, points = table.load([RESULTS / "memory_recheck_h100" / name])
    (p,) = [p for p in points if table.is_measured(p)]
    assert p["name"] == "fast llama-3-8b s512 b1 gc r8"
    est, m = table.replay(p), p["measured"]
    assert m["reserved_at_start_bytes"] - m["allocated_at_start_bytes"] < 0.2 * 2**30  # no inherited cache
    assert abs(table.error_pct(est.peak_reserved_bytes, m["max_memory_reserved_bytes"])) < 10
    assert abs(table.error_pct(est.peak_allocated_bytes, m["max_memory_allocated_bytes"])) < 2

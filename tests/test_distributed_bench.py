"""bench/distributed_scaling.py without a GPU: its measures (tokens/s after warm-up, per-step token
accounting, loss comparison), the FSDP point the real memory planner picks for two H100s, and that a
failing or stopped part still leaves the JSON with what was measured."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import distributed_scaling as bench  # noqa: E402
from scaling_measures import (choose_fsdp_point, compare_losses, step_losses, step_token_check,  # noqa: E402
                              timed_throughput)

from helpers import machine  # noqa: E402

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}
H200 = {"name": "NVIDIA H200", "compute_capability": "9.0", "memory_total_mib": 143771}


def history(ends: list[float], tokens: int = 16384) -> list[dict]:
    return [{"step": i + 1, "tokens": tokens, "seconds": 0.0, "ended_at": end} for i, end in enumerate(ends)]


# --- measures -------------------------------------------------------------------------------------

def test_tokens_per_second_leave_out_the_warm_up_steps():
    # step 1 compiles (12 s), step 2 still slow (3 s), then 2 s a step
    steps = history([12.0, 15.0, 17.0, 19.0, 21.0, 23.0])
    timed = timed_throughput(steps, warmup=2)
    assert timed["timed_steps"] == 4 and timed["first_timed_step"] == 3
    assert timed["seconds"] == 8.0 and timed["tokens"] == 4 * 16384
    assert timed["tokens_per_second"] == 8192.0 and timed["warmup_seconds"] == 15.0
    # counting from train begin would have included the compile: 6 steps in 23 s
    assert timed_throughput(steps, warmup=1)["tokens_per_second"] == pytest.approx(5 * 16384 / 11.0, abs=0.1)


def test_tokens_per_second_needs_a_step_after_warm_up_and_a_clock_start():
    assert timed_throughput(history([1.0, 2.0]), warmup=2)["timed_steps"] == 0
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        timed_throughput(history([1.0, 2.0]), warmup=0)


def test_token_check_flags_a_doubled_micro_batch_and_a_short_step():
    assert step_token_check(history([1.0, 2.0]), 16384)["ok"] is True
    doubled = history([1.0, 2.0], tokens=2 * 16384)  # the unpinned n_gpu=2 run
    assert step_token_check(doubled, 16384) == {
        "expected_per_step": 16384, "steps": 2, "ok": False,
        "wrong_steps": [{"step": 1, "tokens": 32768}, {"step": 2, "tokens": 32768}]}
    assert step_token_check([], 16384)["ok"] is False


def test_losses_compare_by_step_and_expose_a_constant_factor():
    ddp = step_losses([{"step": 1, "loss": 12.5, "epoch": 0.1}, {"step": 2, "loss": 11.0}])
    assert ddp == {1: 12.5, 2: 11.0}
    close = compare_losses({1: 12.52, 2: 10.9}, ddp, steps=2, tolerance=0.15)
    assert close["agree"] is True and close["max_abs_diff"] == 0.1 and close["per_step_diff"] == [0.02, -0.1]
    doubled = compare_losses({s: 2 * v for s, v in ddp.items()}, ddp, steps=2, tolerance=0.15)
    assert doubled["agree"] is False and doubled["ratio_median"] == 2.0
    missing = compare_losses({1: 12.5}, ddp, steps=2, tolerance=0.15)
    assert missing["agree"] is False and missing["steps_compared"] == 1


def test_first_visible_gpu_keeps_the_users_choice():
    assert bench.first_visible_gpu({}) == "0"
    assert bench.first_visible_gpu({"CUDA_VISIBLE_DEVICES": "3, 5"}) == "3"
    assert bench.first_visible_gpu({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == "GPU-1a2b"


# --- the fsdp point -------------------------------------------------------------------------------

def test_fsdp_point_skips_rows_over_by_a_hair_or_without_rank_margin():
    rows = [{"seq": 1, "one_gpu_fits": True, "one_gpu_gib": 70.0, "strategy_check": "warn", "per_rank_gib": 55.0},
            {"seq": 2, "one_gpu_fits": False, "one_gpu_gib": 79.7, "strategy_check": "pass", "per_rank_gib": 61.0},
            {"seq": 3, "one_gpu_fits": False, "one_gpu_gib": 90.0, "strategy_check": "pass", "per_rank_gib": 72.0},
            {"seq": 4, "one_gpu_fits": False, "one_gpu_gib": 83.0, "strategy_check": "pass", "per_rank_gib": 64.4},
            {"seq": 5, "one_gpu_fits": False, "one_gpu_gib": 86.0, "strategy_check": "pass", "per_rank_gib": 67.0}]
    assert choose_fsdp_point(rows, 79.6, one_gpu_excess_gib=2.0, rank_margin_gib=8.0)["seq"] == 4
    assert choose_fsdp_point(rows[:3], 79.6, one_gpu_excess_gib=2.0, rank_margin_gib=8.0) is None


@pytest.fixture
def llama70b_dir(tmp_path) -> Path:
    from memory_accuracy import COMMON, SHAPES

    folder = tmp_path / "llama-3-70b"
    folder.mkdir()
    config = {**COMMON, **SHAPES["llama-3-70b"], "architectures": ["LlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def plan_rows(tmp_path: Path, model_dir: Path, gpu: dict = H100) -> tuple[list[dict], float]:
    from qlora_doctor.recipe.schema import load_recipe

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a b c"}\n' * 4)

    def recipe_for(seq: int, batch: int):
        path = tmp_path / f"fsdp-{seq}-{batch}.yaml"
        bench.write_recipe(path, model_dir, data, tmp_path / "run", steps=2, batch=batch, grad_accum=1, seq=seq,
                           strategy="fsdp", port=29541, optim="adamw_torch")
        return load_recipe(path)

    return bench.fsdp_candidate_rows(recipe_for, machine(gpus=[gpu, gpu]), layers=80)


@pytest.mark.parametrize("gpu, card_gib, liger, expected", [(H100, 79.65, True, (24576, 1)),
                                                            (H100, 79.65, False, (14336, 1)),
                                                            (H200, 140.40, True, (61440, 1))])
def test_the_planner_picks_a_70b_point_one_card_cannot_hold_and_two_fsdp_ranks_can(
        tmp_path, llama70b_dir, monkeypatch, gpu, card_gib, liger, expected):
    """What the bench will train on the 2 x H100 and 2 x H200 machines (Liger installed there; without it,
    a shorter sequence), with the planner and the doctor's fsdp check as they run there."""
    from qlora_doctor.recipe import levers as speed

    monkeypatch.setattr(speed, "liger_installed", lambda: liger)
    monkeypatch.setattr(speed, "liger_supported_model_types", lambda: frozenset({"llama"}) if liger else None)
    rows, card = plan_rows(tmp_path, llama70b_dir, gpu)
    assert card == pytest.approx(card_gib, abs=0.01)
    assert [(r["seq"], r["batch"]) for r in rows] == list(bench.FSDP_CANDIDATES)
    assert all(r["liger_kernel"] is liger for r in rows)
    chosen = choose_fsdp_point(rows, card, bench.ONE_GPU_EXCESS_GIB, bench.FSDP_RANK_MARGIN_GIB)
    assert (chosen["seq"], chosen["batch"]) == expected
    assert chosen["one_gpu_fits"] is False and chosen["one_gpu_gib"] >= card + 2.0
    assert chosen["strategy_check"] == "pass" and chosen["per_rank_gib"] <= card - 8.0
    # every cheaper candidate either fits one GPU or is over by less than the excess
    for row in rows[:rows.index(chosen)]:
        assert row["one_gpu_fits"] or row["one_gpu_gib"] < card + 2.0 or row["per_rank_gib"] > card - 8.0


def test_fsdp_part_launches_the_products_fsdp_command_with_the_bench_as_worker(tmp_path, monkeypatch):
    """Everything up to the GPU run: the point chosen on a 2 x H100 machine file, the doctor's report, the
    launcher's own FSDP flags with the in-memory 70B worker swapped in; a crashed run is recorded."""
    import argparse
    import subprocess

    from qlora_doctor.recipe import levers as speed

    monkeypatch.setattr(speed, "liger_installed", lambda: True)
    monkeypatch.setattr(speed, "liger_supported_model_types", lambda: frozenset({"llama"}))
    machine_file = tmp_path / "h100x2.json"
    machine_file.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.12.3",
                                        "driver_version": "580.159.04", "gpus": [H100, H100]}))
    launched = []

    def fake_run_group(argv, env, timeout):
        launched.append((argv, env, timeout))
        return subprocess.CompletedProcess(argv, 1, "", "torch.OutOfMemoryError: CUDA out of memory")

    monkeypatch.setattr(bench, "run_group", fake_run_group)
    args = argparse.Namespace(models_dir=tmp_path / "models", work=tmp_path / "work", out=tmp_path / "out",
                              fsdp_steps=2, fsdp_plan_only=False, machine=machine_file, fsdp_point=None,
                              fsdp_min_s=bench.FSDP_MIN_S, no_cudnn_sdpa=False, fsdp_ranks=2)
    result: dict = {}
    bench.fsdp_part(args, bench.Budget(400), result, lambda: None)

    assert (result["planner"]["chosen"]["seq"], result["planner"]["chosen"]["batch"]) == (24576, 1)
    [(argv, env, timeout)] = launched
    assert argv[argv.index("--num_processes") + 1] == "2" and "--use_fsdp" in argv and "--module" not in argv
    worker = argv.index("--fsdp-worker")
    assert argv[worker - 1] == str(REPO / "bench" / "distributed_scaling.py")
    config = json.loads(argv[worker + 1])
    assert config["num_hidden_layers"] == 80 and config["max_position_embeddings"] >= 24576
    assert argv[worker + 2] == "--run-plan" and "--skip-check" in argv
    plan = json.loads(Path(argv[worker + 3]).read_text())  # the parent's decisions, as the ranks read them
    assert plan["recipe"]["training"]["max_seq_length"] == 24576 and plan["num_processes"] == 2
    assert str(REPO) in env["PYTHONPATH"].split(":") and 300 < timeout <= 400
    assert result["run"]["exit_code"] == 1 and "CUDA out of memory" in result["run"]["error_tail"]
    assert result["adapter_reload"] == {"ok": False, "error": "no adapter_model.safetensors was written"}
    assert (tmp_path / "out" / "fsdp" / "run.log").is_file()


@pytest.mark.parametrize("point, launched_ranks", [("2048x1", 1), ("24576x1", 0)])
def test_fsdp_on_one_card_launches_one_rank_only_where_the_point_fits(tmp_path, monkeypatch, point, launched_ranks):
    """--fsdp-ranks 1 (the save path on one card): the given point, one process; a point one card cannot
    hold is skipped, not launched."""
    import argparse
    import subprocess

    machine_file = tmp_path / "h100.json"
    machine_file.write_text(json.dumps({"os": "linux", "arch": "x86_64", "python": "3.12.3",
                                        "driver_version": "580.159.04", "gpus": [H100]}))
    launched = []
    monkeypatch.setattr(bench, "run_group", lambda argv, env, timeout: launched.append(argv) or
                        subprocess.CompletedProcess(argv, 1, "", "stopped by the test"))
    args = argparse.Namespace(models_dir=tmp_path / "models", work=tmp_path / "work", out=tmp_path / "out",
                              fsdp_steps=2, fsdp_plan_only=False, machine=machine_file, fsdp_point=point,
                              fsdp_min_s=bench.FSDP_MIN_S, no_cudnn_sdpa=False, fsdp_ranks=1)
    result: dict = {}
    bench.fsdp_part(args, bench.Budget(400), result, lambda: None)

    assert result["ranks"] == 1 and len(launched) == launched_ranks
    if launched:
        assert launched[0][launched[0].index("--num_processes") + 1] == "1"
        assert result["planner"]["chosen"]["seq"] == 2048
    else:
        assert result["skipped"] == f"{point} does not fit one card"


# --- robustness -----------------------------------------------------------------------------------

def run_main(monkeypatch, out: Path, ddp, fsdp) -> dict:
    monkeypatch.setattr(bench, "ddp_part", ddp)
    monkeypatch.setattr(bench, "fsdp_part", fsdp)
    monkeypatch.setattr(sys, "argv", ["distributed_scaling.py", "--out", str(out), "--budget-s", "300"])
    bench.main()
    return json.loads((out / "distributed_scaling.json").read_text())


def test_a_failing_part_keeps_its_measurements_and_the_next_part_runs(monkeypatch, tmp_path):
    def ddp(args, budget, result, save):
        result["one_gpu"] = {"timed": {"tokens_per_second": 8000.0}}
        save()
        raise RuntimeError("NCCL error: unhandled system error")

    def fsdp(args, budget, result, save):
        result["planner"] = {"chosen": {"seq": 26624, "batch": 1}}

    data = run_main(monkeypatch, tmp_path / "out", ddp, fsdp)
    assert data["ddp"]["one_gpu"]["timed"]["tokens_per_second"] == 8000.0
    assert data["ddp"]["error"] == "RuntimeError: NCCL error: unhandled system error"
    assert "raise RuntimeError" in data["ddp"]["traceback"]
    assert data["fsdp"]["planner"]["chosen"]["seq"] == 26624 and data["finished"] is True


def test_a_stopped_bench_writes_what_it_has(monkeypatch, tmp_path):
    def ddp(args, budget, result, save):
        result["ddp_speedup"] = 1.9

    def fsdp(args, budget, result, save):
        result["planner"] = {"chosen": None}
        raise bench.Stopped("signal SIGTERM after 530 s")

    before = signal.getsignal(signal.SIGTERM)
    data = run_main(monkeypatch, tmp_path / "out", ddp, fsdp)
    assert signal.getsignal(signal.SIGTERM) is before  # the bench's handler is not left behind
    assert data["ddp"]["ddp_speedup"] == 1.9 and data["fsdp"]["planner"] == {"chosen": None}
    assert data["stopped"] == "signal SIGTERM after 530 s" and data["finished"] is False

"""bench/peer_unsloth.py without a GPU (and without unsloth): its settings match train_throughput.py's,
its step accounting, and that a mode which cannot run (unsloth missing, a child past its time) still
leaves the JSON with an "error" and the traceback or log tail instead of hanging."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import peer_unsloth as peer

TT = peer.throughput_module()
HAS_UNSLOTH = importlib.util.find_spec("unsloth") is not None


def test_defaults_are_train_throughputs_quick_shape_and_optimizer_settings():
    args = peer.parse_args(["--out", "x.json"])
    assert (args.shape, args.seq, args.batch, args.warmup, args.steps) == ("8b", 2048, 8, 2, 4)
    assert args.shape in TT.SHAPES
    assert args.lr == inspect.signature(TT.train_points).parameters["lr"].default
    assert (args.lora_r, args.lora_alpha) == (16, 16)
    assert args.models_dir == TT.parse_args(["--out", "x.json"]).models_dir  # reuses its checkpoint
    assert [peer.MODES[m] for m in args.modes.split(",")] == ["unsloth", True]


def test_bad_modes_and_steps_are_usage_errors():
    with pytest.raises(SystemExit) as err:
        peer.parse_args(["--out", "x.json", "--modes", "unsloth,offload"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        peer.parse_args(["--out", "x.json", "--steps", "0"])


def test_help_needs_neither_torch_nor_unsloth():
    code = ("import sys; sys.argv = ['peer_unsloth.py', '--help']; sys.path.insert(0, 'bench'); import peer_unsloth\n"
            "try:\n    peer_unsloth.main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--modes" in out.stdout and "HEAVY []" in out.stdout


def test_tokens_per_second_leave_out_warm_up_and_mfu_uses_the_4n_basis():
    point = {"shape": "8b", "seq": 2048, "batch": 8}
    peer.record_steps(point, [30.0, 2.0, 1.5, 1.5, 1.5, 1.5], [12.0] * 6, warmup=2, tt=TT)
    assert point["warmup_seconds"] == [30.0, 2.0] and point["steps_timed"] == 4
    assert point["tokens_per_s"] == pytest.approx(8 * 2048 / 1.5, abs=0.1)
    n = TT.matmul_params(TT.SHAPES["8b"])
    assert point["mfu_4n"] == pytest.approx(point["tokens_per_s"] * 4 * n / 989e12, abs=1e-4)
    early = {"shape": "8b", "seq": 2048, "batch": 8}
    peer.record_steps(early, [30.0], [12.0], warmup=2, tt=TT)  # killed during warm-up: no rate
    assert early["steps_timed"] == 0 and "tokens_per_s" not in early


def test_batches_are_train_throughputs_unpadded_rows_with_labels():
    args = peer.parse_args(["--out", "x.json", "--device", "cpu", "--shape", "tiny-8b", "--seq", "16", "--batch", "3",
                            "--warmup", "1", "--steps", "2"])
    data = peer.batches(TT, args)
    assert len(data) == 3
    rows = TT.random_rows(9, [16], TT.SHAPES["tiny-8b"]["vocab_size"], seed=1).rows
    assert data[1]["input_ids"].tolist() == rows[3:6]
    assert bool(data[0]["attention_mask"].all()) and bool((data[2]["labels"] == data[2]["input_ids"]).all())


def test_json_is_written_whole(tmp_path):
    path = tmp_path / "deep" / "r.json"
    peer.write_json(path, {"points": [1]})
    peer.write_json(path, {"points": [1, 2]})
    assert json.loads(path.read_text()) == {"points": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def run_peer(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "o" / "peer.json"
    cmd = [sys.executable, str(REPO / "bench" / "peer_unsloth.py"), "--out", str(out), "--device", "cpu",
           "--shape", "tiny-8b", "--seq", "16", "--batch", "2", "--models-dir", str(tmp_path / "models"), *extra]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.mark.skipif(HAS_UNSLOTH, reason="checks the failure path; unsloth is installed here")
def test_missing_unsloth_gives_an_error_point_with_its_traceback(tmp_path):
    res = run_peer(tmp_path, "--modes", "unsloth")
    assert res["build"]["exit_code"] == 0 and "error" not in res["build"]
    assert (tmp_path / "models" / "llama-tiny-8b" / "tokenizer.json").is_file()  # unsloth loads one
    [point] = res["points"]
    assert point["error"] == "ModuleNotFoundError: No module named 'unsloth'"
    assert "import unsloth" in point["traceback"] and point["exit_code"] == 1
    assert point["variant"] == "unsloth_offload_ckpt" and point["use_gradient_checkpointing"] == "unsloth"
    assert (tmp_path / "o" / "peer_logs" / "unsloth.log").is_file()


def test_a_child_past_its_time_is_killed_and_the_modes_are_skipped(tmp_path):
    res = run_peer(tmp_path, "--build-timeout-s", "0.3")  # the build child cannot even import torch
    assert res["build"]["error"].startswith("timed out after 0.3 s (killed)")
    assert res["build"]["exit_code"] == -9
    assert [p["error"] for p in res["points"]] == ["skipped: the checkpoint build failed"] * 2


def test_every_throughput_variant_is_a_recipe_the_schema_accepts(tmp_path):
    """A variant the recipe refuses would only show on the GPU, in a call that costs device time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, performance in module.VARIANTS.items():
        if performance is not None:
            module.make_recipe(str(tmp_path), performance, tmp_path, 8, 2048, 6, "paged_adamw_8bit", 2e-4, 1)


def test_memorise_batches_are_the_loss_curves_rows_and_defaults_stay_the_timing_rows():
    args = peer.parse_args(["--out", "x.json", "--device", "cpu", "--shape", "tiny-1b", "--seq", "8", "--batch", "4",
                            "--warmup", "0", "--steps", "5", "--data", "memorise"])
    data = peer.batches(TT, args)
    rows = TT.memorised_rows(20, 8, seed=7, vocab=TT.SHAPES["tiny-1b"]["vocab_size"]).rows
    assert [r for b in data for r in b["input_ids"].tolist()] == rows
    assert data[4]["input_ids"].tolist() == data[0]["input_ids"].tolist()  # 16 rows cycled: step 5 repeats step 1
    default = peer.parse_args(["--out", "x.json"])
    assert (default.data, default.schedule, default.max_grad_norm) == ("random", "constant", 0.0)
    with pytest.raises(SystemExit):
        peer.parse_args(["--out", "x.json", "--max-grad-norm", "-1"])


def test_cosine_schedule_is_the_trainers(tmp_path):
    """The hand loop's learning rates step for step equal the Trainer's with the bench's loss-curve settings
    (cosine, no warm-up, weight decay 0), so the peer's loss curve is comparable with the plain path's."""
    import torch
    from transformers import Trainer, TrainingArguments

    steps = 7
    args = peer.parse_args(["--out", "x.json", "--warmup", "0", "--steps", str(steps), "--lr", "3e-3",
                            "--schedule", "cosine"])
    ours, schedule = peer.optimizer_and_schedule([torch.nn.Parameter(torch.zeros(2))], args, fused=False)
    targs = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, lr_scheduler_type="cosine",
                              max_steps=steps, warmup_steps=0, report_to="none", use_cpu=True)
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=targs)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0}  # per group; its default says 0.01
    assert ours.param_groups[0]["weight_decay"] == 0.0
    mine, theirs = [], []
    for _ in range(steps):
        mine.append(ours.param_groups[0]["lr"])
        theirs.append(trainer.optimizer.param_groups[0]["lr"])
        schedule.step()
        trainer.lr_scheduler.step()
    assert mine == pytest.approx(theirs) and mine[0] == 3e-3 and mine[-1] < mine[0] / 10
    constant, none = peer.optimizer_and_schedule([torch.nn.Parameter(torch.zeros(2))],
                                                 peer.parse_args(["--out", "x.json"]), fused=False)
    assert none is None and constant.defaults["weight_decay"] == 0.0


def _loss_run(tmp_path: Path, peer_points: list[dict], peer_meta: dict | None = None) -> tuple[int, dict]:
    import loss_plot

    ref = [12.0, 9.0, 5.0, 1.0]
    curves = tmp_path / "curves.json"
    curves.write_text(json.dumps({"loss_curves": {
        "shape": "1b", "seq": 512, "batch": 4, "steps": 4, "lr": 3e-3, "data": "16 fixed rows", "tolerance": 0.01,
        "abs_tolerance": 0.05, "reference_variant": "baseline", "variants": ["fast"],
        "curves": {"baseline": ref, "fast": [12.0, 9.1, 5.0, 1.01]}, "errors": {}}}))
    peer_json = tmp_path / "unsloth.json"
    meta = {"shape": "1b", "seq": 512, "batch": 4, "data": "memorise", **(peer_meta or {})}
    peer_json.write_text(json.dumps({"meta": meta, "points": peer_points}))
    out = tmp_path / "all.json"
    rc = loss_plot.main(["--curves", str(curves), "--peer", str(peer_json), "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_loss_plot_compares_ours_and_the_peer_with_the_plain_curve(tmp_path):
    rc, got = _loss_run(tmp_path, [{"variant": "unsloth_offload_ckpt", "losses": [12.0, 9.5, 6.0, 2.0]}])
    assert rc == 0 and got["problems"] == []
    assert got["variants"] == ["fast", "unsloth_offload_ckpt"]
    assert got["compared"]["fast"]["within_tolerance"] is True  # 0.01 apart: inside the absolute 0.05
    peer_cmp = got["compared"]["unsloth_offload_ckpt"]
    assert peer_cmp["last_mean"] == 7.375 and peer_cmp["last_mean_reference"] == 6.75  # means of the last (4) steps
    assert peer_cmp["last_mean_rel_diff"] == pytest.approx(0.625 / 6.75, abs=1e-4)
    assert peer_cmp["within_tolerance"] is False and peer_cmp["max_abs_step_diff"] == 1.0


def test_loss_plot_names_a_peer_run_on_rows_in_order_apart_from_one_in_the_trainers_order(tmp_path):
    point = {"variant": "unsloth_offload_ckpt", "losses": [12.0, 9.5, 6.0, 2.0]}
    rc, got = _loss_run(tmp_path, [point], {"order": "sequential"})
    assert rc == 0 and got["variants"] == ["fast", "unsloth_offload_ckpt (sequential rows)"]
    rc, got = _loss_run(tmp_path, [point], {"order": "trainer"})
    assert rc == 0 and got["variants"] == ["fast", "unsloth_offload_ckpt"]


def test_loss_plot_refuses_a_peer_curve_of_other_rows_or_length(tmp_path):
    rc, got = _loss_run(tmp_path, [{"variant": "unsloth_offload_ckpt", "losses": [12.0, 9.5, 6.0]}])
    assert rc == 1 and got["variants"] == ["fast"]
    assert any("3 losses for 4 steps" in p for p in got["problems"])
    rc, got = _loss_run(tmp_path, [{"variant": "unsloth_offload_ckpt", "losses": [1.0] * 4}], {"data": "random"})
    assert rc == 1 and "unsloth_offload_ckpt" not in got["curves"]
    assert any("not the reference's memorised ones" in p for p in got["problems"])


def test_trainer_order_is_the_order_the_benchs_trainer_trains_on(tmp_path):
    """--order trainer feeds the peer the rows in the order the plain path's Trainer (train_throughput's
    baseline_trainer_parts, run for real on CPU) draws them, so the two loss curves are step-for-step comparable."""
    from transformers import Trainer

    batch, steps = 2, 6
    args = peer.parse_args(["--out", "x.json", "--device", "cpu", "--shape", "tiny-1b", "--seq", "16", "--batch",
                            str(batch), "--warmup", "0", "--steps", str(steps), "--data", "memorise",
                            "--order", "trainer"])
    order = peer.trainer_order(batch * steps, batch, steps)
    assert sorted(order) == list(range(batch * steps)) and order != sorted(order)
    ours = [r for b in peer.batches(TT, args, order) for r in b["input_ids"].tolist()]

    path = TT.build_model("tiny-1b", "cpu", str(tmp_path / "models"))
    model, targs, inner = TT.baseline_trainer_parts(path, "cpu", batch, steps, "adamw_torch", 3e-3, 1, tmp_path)
    seen: list[list[int]] = []

    def recording(features):
        seen.extend(list(f["input_ids"]) for f in features)
        return inner(features)

    data = TT.memorised_rows(batch * steps, 16, seed=7, vocab=TT.SHAPES["tiny-1b"]["vocab_size"])
    Trainer(model=model, args=targs, train_dataset=data, data_collator=recording).train()
    assert seen == ours

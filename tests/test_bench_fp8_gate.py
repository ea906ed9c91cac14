"""bench/fp8_demo_gate.py without a GPU: the run it asks `qlora-doctor run` for, the losses it reads back from a
finished run (metrics.json) and from a stopped one (the Trainer's log lines), the comparison of a stopped run on
its first steps, and a run the CLI refuses kept as a problem, not a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import fp8_demo_gate as gate

# what transformers 5's Trainer prints with logging_steps 1 (values as strings), between progress bars
LOG = """  0%|          | 0/200 [00:00<?, ?it/s]
{'loss': '2.632', 'grad_norm': '1.866', 'learning_rate': '0', 'epoch': '0.02', 'num_input_tokens_seen': 237}
{'loss': '3.951', 'grad_norm': '2.179', 'learning_rate': '2e-05', 'epoch': '0.04', 'num_input_tokens_seen': 481}
{'eval_loss': '0.8896', 'eval_runtime': '1.075', 'epoch': '1'}
{'loss': '0.8302', 'grad_norm': '1.702', 'learning_rate': '0.0003732', 'epoch': '1.02'}
"""


def test_each_variant_runs_the_recipe_with_its_fp8_setting_and_a_loss_at_every_step(tmp_path):
    args = gate.parse_args(["--out", str(tmp_path), "--steps", "7", "--set", "training.seed=3"])
    assert args.variants == "bf16,fp8"
    fp8 = gate.run_command(args, "fp8", tmp_path)
    assert fp8[1:5] == ["-m", "qlora_doctor.cli", "run", "demo"]
    assert {f"--set=training.output_dir={tmp_path / 'fp8'}", "--set=training.max_steps=7",
            "--set=training.logging_steps=1", "--set=training.seed=3",
            "--set=performance.fp8_base=true"} <= set(fp8)
    assert "--set=performance.fp8_base=false" in gate.run_command(args, "bf16", tmp_path)
    with pytest.raises(SystemExit):
        gate.parse_args(["--out", str(tmp_path), "--variants", "bf16,fp16"])


def test_losses_come_from_metrics_in_step_order_or_from_the_log_of_a_stopped_run(tmp_path):
    history = [{"step": 2, "loss": 1.5}, {"step": 1, "loss": 2.5}, {"step": 2, "eval_loss": 9.0}]
    assert gate.losses_of({"train_loss_history": history}) == [2.5, 1.5]
    assert gate.losses_from_log(LOG) == ([2.632, 3.951, 0.8302], [0.8896])
    stopped = gate.point_of("fp8", tmp_path, None, LOG)
    assert stopped["partial"] and stopped["losses"] == [2.632, 3.951, 0.8302]
    assert stopped["error"] == "timed out after 3 logged steps"


def test_a_stopped_run_is_compared_on_its_first_steps_and_fails_the_gate(tmp_path):
    ref = [3.0, 2.0, 1.0, 0.5]
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "metrics.json").write_text(json.dumps(
        {"train_loss_history": [{"step": i + 1, "loss": x} for i, x in enumerate(ref)], "eval_history": [],
         "eval_loss_before": 3.3, "eval_loss_after": 0.4}))
    (tmp_path / "bf16.log").write_text("")
    (tmp_path / "fp8.log").write_text("{'loss': '3.0', 'x': 1}\n{'loss': '2.01', 'x': 1}\n{'loss': '1.02', 'x': 1}\n")
    rc = gate.main(["--out", str(tmp_path), "--steps", "4", "--rescore"])
    got = json.loads((tmp_path / "gate.json").read_text())
    assert rc == 1 and got["problems"] == ["fp8: timed out after 3 logged steps"]
    assert got["compared"]["fp8"]["steps_compared"] == 3
    assert got["compared"]["fp8"]["within_tolerance"] is True  # agrees where it ran, but ran 3 of 4 steps
    assert got["points"][0]["eval_loss_after"] == 0.4


def test_a_run_the_cli_refuses_is_a_problem_with_its_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: builtin:smollm2-135m-instruct}\ntraining: {learning_rate: fast}\n")
    rc = gate.main(["--out", str(tmp_path / "g"), "--recipe", str(bad), "--steps", "2", "--variants", "bf16"])
    got = json.loads((tmp_path / "g" / "gate.json").read_text())
    assert rc == 1 and got["points"][0]["exit_code"] == 2
    assert got["problems"][0].startswith("bf16: exit 2 after 0 logged steps: ") and "learning_rate" in got["problems"][0]

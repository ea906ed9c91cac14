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

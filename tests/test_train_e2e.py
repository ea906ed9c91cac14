"""End to end on the CPU: a few steps of a demo-like recipe through `qlora-doctor run`, then every
output file, --resume, generate and merge. Marked slow, but part of the default run (~2 min on 2 cores).

One trained folder is shared by the tests of this module (module fixture); the builtin model is
converted once per cache (tests/trainer_support.py).
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.trainer import outputs
from qlora_doctor.recipe.schema import load_recipe
from tests.trainer_support import builtin_checkpoint, write_tiny_recipe  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(builtin_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("e2e")
    recipe = write_tiny_recipe(folder)
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "eval loss:" in result.output
    return folder


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_output_file_exists_and_parses(trained):
    out = trained / "out"
    for name in (*outputs.ADAPTER_FILES, "tokenizer.json", outputs.RECIPE, outputs.REPORT, outputs.LOCKFILE,
                 outputs.MANIFEST, outputs.METRICS, outputs.LOSS_PLOT):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"

    report = _json(out / outputs.REPORT)
    assert report["status"] in ("pass", "warn") and report["checks"]

    manifest = _json(out / outputs.MANIFEST)
    assert manifest["status"] == "completed"
    assert manifest["skip_check"] is False
    assert manifest["started_at"] <= manifest["finished_at"]
    assert manifest["command"].startswith("qlora-doctor run ")
    assert manifest["machine"]["gpu_vendor"] in ("none", "nvidia", "amd", "apple")

    ran = load_recipe(out / outputs.RECIPE)
    assert ran.training.max_steps == 4
    assert ran.training.fp16 in (True, False) and ran.training.bf16 in (True, False)  # `auto` resolved
    assert ran.quantization.bnb_4bit_compute_dtype != "auto"
    assert Path(ran.dataset.path).is_absolute()

    pins = [line for line in (out / outputs.LOCKFILE).read_text().splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==\S+", p) for p in pins), pins[:5]
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        assert f"{name}=={version(name)}" in pins

    assert (out / outputs.LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = _json(out / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["r"] == 8


def test_metrics_show_the_loss_going_down(trained):
    metrics = _json(trained / "out" / outputs.METRICS)
    assert metrics["steps"] == 4
    assert [r["step"] for r in metrics["train_loss_history"]] == [1, 2, 3, 4]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.1, metrics
    assert metrics["train_tokens"] > 0 and metrics["train_tokens_per_second"] > 0
    peak = metrics["peak_memory"]
    assert (peak.get("max_rss_bytes") or peak.get("max_memory_allocated_bytes")) > 100 * 2**20
    assert metrics["wall_seconds"] >= metrics["train_step_seconds"] > 0


def test_adapter_loads_with_peft_and_changes_the_model(trained, builtin_checkpoint):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(builtin_checkpoint, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(trained / "out"))
        after = tuned(input_ids=ids).logits
    assert any("lora_B" in name for name, _ in tuned.named_parameters())
    assert (after - before).abs().max() > 1e-3


def test_resume_continues_from_the_last_complete_checkpoint(trained, tmp_path, monkeypatch):
    folder = tmp_path / "resume"
    shutil.copytree(trained, folder)
    recipe = write_tiny_recipe(folder, max_steps=6)
    out = folder / "out"
    assert outputs.last_complete_checkpoint(out) == out / "checkpoint-4"
    # A checkpoint cut off while saving (no trainer_state.json) must be skipped.
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"partial")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from checkpoint-4" in result.output
    metrics = _json(out / outputs.METRICS)
    assert metrics["steps"] == 6
    assert metrics["resumed_from"].endswith("checkpoint-4")
    # The history before the resume comes back from the checkpoint's trainer state.
    assert [r["step"] for r in metrics["train_loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert _json(out / outputs.MANIFEST)["resumed_from"].endswith("checkpoint-4")
    assert outputs.last_complete_checkpoint(out) == out / "checkpoint-6"


def test_generate_compare_and_merge(trained, tmp_path):
    out = trained / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", str(out), "--prompt", "Where is Korrowen Island?", "--compare",
                                 "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["answer"] and answer["base_answer"]
    assert answer["answer"] != answer["base_answer"]
    again = runner.invoke(cli, ["generate", str(out), "--prompt", "Where is Korrowen Island?",
                                "--max-new-tokens", "12", "--json"])
    assert json.loads(again.stdout)["answer"] == answer["answer"]  # greedy: deterministic

    merged = tmp_path / "merged"
    result = runner.invoke(cli, ["merge", str(out), "--to", str(merged)])
    assert result.exit_code == 0, result.output
    _check_merged_matches_adapter(out, merged)


def _check_merged_matches_adapter(out: Path, merged: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_doctor.trainer.builtin import resolve_model_path

    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(load_recipe(out / outputs.RECIPE).model.name_or_path),
                                                dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(out))
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-3)
    assert (merged / "tokenizer.json").is_file()


@pytest.mark.gpu
def test_gpu_run_uses_cuda(builtin_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    recipe = write_tiny_recipe(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    metrics = _json(tmp_path / "out" / outputs.METRICS)
    assert metrics["peak_memory"]["device"] == "cuda"
    assert metrics["peak_memory"]["max_memory_allocated_bytes"] > 0
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    manifest = _json(tmp_path / "out" / outputs.MANIFEST)
    assert manifest["precision"]["device"] == "cuda"
    assert manifest["precision"]["compute_dtype"] in ("bfloat16", "float16")

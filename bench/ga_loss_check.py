"""Does the logged training loss (and so metrics.json) stay the same under gradient accumulation?

Runs `qlora-doctor run` four times on a Llama-3.2-1B-shaped model with random weights: per-device batch
4 x accumulation 1 and batch 2 x accumulation 2 (same effective batch, same rows), each with Liger's
fused kernels on and off. On the first step both see the same 4 rows, so their losses must agree.

    python3 bench/ga_loss_check.py --out $OUT/ga_loss_check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from gpu_train_recipes import save_tokenizer, write_recipe  # noqa: E402
from memory_accuracy import COMMON, SHAPES, save_random_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model_dir = Path("/tmp/models") / args.shape
    if not (model_dir / "config.json").is_file():
        save_random_checkpoint({**COMMON, **SHAPES[args.shape]}, model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        save_tokenizer(model_dir)
    results = []
    for liger in ("true", "false"):
        for batch, accumulation in ((4, 1), (2, 2)):
            work = Path("/tmp/ga-check") / f"liger-{liger}-b{batch}-ga{accumulation}"
            work.mkdir(parents=True, exist_ok=True)
            recipe = work / "recipe.yaml"
            write_recipe(recipe, model_dir, work / "run", steps=3, batch=batch, seq=512)
            argv = [sys.executable, "-m", "qlora_doctor.cli", "run", str(recipe), "--overwrite",
                    "--set", f"training.gradient_accumulation_steps={accumulation}",
                    "--set", f"performance.liger_kernel={liger}", "--set", "performance.group_by_length=false",
                    "--set", 'training.eval_strategy="no"']
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            metrics_file = work / "run" / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
            results.append({"liger_kernel": liger, "batch": batch, "gradient_accumulation_steps": accumulation,
                            "exit_code": proc.returncode, "train_tokens": metrics.get("train_tokens"),
                            "losses": [h.get("loss") for h in metrics.get("train_loss_history", [])],
                            "grad_norms": [h.get("grad_norm") for h in metrics.get("train_loss_history", [])],
                            "stderr_tail": proc.stderr[-800:] if proc.returncode else ""})
            print(json.dumps(results[-1]), flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

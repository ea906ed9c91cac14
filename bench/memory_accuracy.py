"""Measure QLoRA peak GPU memory on a grid of runs and put it beside the memory planner's prediction.

For each model shape (Llama-3.2-1B, Llama-3-8B; Llama-3-70B with --with-70b) this builds a model with
random weights from a `LlamaConfig`, saves it once with `save_pretrained` under --models-dir (the same
folders and format as bench/gpu_train_recipes.py), loads it in 4-bit through the trainer's own
`qlora_doctor.trainer.model.load_for_training` (BitsAndBytesConfig from the recipe, the `performance:`
levers applied by `qlora_doctor/trainer/speed.py`, `get_peft_model`, fused LoRA), trains 3 steps with the
transformers Trainer on random tokens (TrainingArguments from the trainer's `training_arguments_kwargs`
plus `speed.training_arguments_overrides`, as `qlora-doctor run` does), and records
`torch.cuda.max_memory_allocated` / `max_memory_reserved` next to the planner's prediction for the same
recipe. Points the planner predicts do not fit the GPU are recorded as skipped, not run.

Two variants (--variant): `fast`, the recipe's default `performance:` section (the path `qlora-doctor
run` takes: no fp32 upcast, Liger where installed, fused LoRA, ...), and `plain`, every lever off in the
recipe (peft's prepare_model_for_kbit_training path, on which the planner was first calibrated). Each
point records the levers as the trainer decided them (`levers`, from speed.py, with the fused-LoRA
outcome) and as the planner decided them (`planner_levers`); `levers_match` says whether they agree.

    python3 bench/memory_accuracy.py                  # the fast-path grid
    python3 bench/memory_accuracy.py --variant fast,plain --budget-s 420   # both, ~8 minutes on one H100
    python3 bench/memory_accuracy.py --points 4       # the first 4 points only (1B shape): a quick check
    python3 bench/memory_accuracy.py --with-70b       # also the 70B point (built directly in 4-bit)
    python3 bench/memory_accuracy.py --shapes tiny --variant fast,plain   # try the script on a CPU
    python3 bench/memory_table.py $OUT/memory_accuracy.json --fit   # the README table, refit per path

Unattended by design: each shape runs in its own subprocess (a crash loses only that shape's remaining
points), an out-of-memory error is caught and recorded per point, results are written after every
point, and points past the time budget (--budget-s) are recorded as skipped.

Between points of one shape the 4-bit base stays loaded: the LoRA adapters are removed with
`unload()`, what the levers did to the base is undone (Liger's per-module forwards and its patches of
transformers' llama module, the plain path's float32 upcast, checkpointing flags), the allocator cache is
emptied (before and after the undo, so the undo's casts do not pin this run's cached blocks) and the peak
counters reset, so each point's peak counts the base weights plus that run; `reserved_at_start_bytes`
records what was reserved when the counters were reset (bench/memory_table.py leaves a point that
started with cache out of the comparison). Plain points run before fast ones. `fresh_process` marks the
first point of each shape.

The 70B point: 140 GB of bf16 weights cannot be saved or loaded on the machine in time, so the base is
built directly in 4-bit on the GPU (meta-device model, linear layers replaced by bnb Linear4bit and
filled layer by layer with random weights quantized on the spot), then handed to the same
`load_for_training` (its `load_base` step replaced by that model), so prepare + LoRA + Trainer are the
trainer's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False),
    # For trying this script on a CPU (no memory numbers): --shapes tiny
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
}
COMMON = dict(model_type="llama", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
              bos_token_id=1, eos_token_id=2)


VARIANTS = ("fast", "plain")
PLAIN_PERFORMANCE = dict(upcast_unquantized=True, checkpoint_layers="all", liger_kernel=False, fused_lora=False,
                         padding_free=False, group_by_length=False, torch_compile=False)
"""The recipe's `performance:` section for the plain path (PerformanceSection's docstring); fast: defaults."""


@dataclass(frozen=True)
class Point:
    shape: str
    seq: int
    batch: int
    checkpointing: bool
    r: int
    variant: str = "fast"
    checkpoint_layers: str | int | float = "all"
    """performance.checkpoint_layers (fast variant only)."""

    @property
    def name(self) -> str:
        ckpt = "nogc" if not self.checkpointing else "gc" if self.checkpoint_layers == "all" else f"gc{self.checkpoint_layers}"
        return f"{self.variant} {self.shape} s{self.seq} b{self.batch} {ckpt} r{self.r}"


def grid(variant: str = "fast") -> list[Point]:
    """fast: >= 16 points over seq 512/2048/8192, batch 1/4/8, checkpointing on/off, r 8/64 (plus the two
    r=16 calibration points of the issue) and two of selective checkpointing; plain: the two calibration
    points and three more (checkpointing off included), enough to see that its prediction still holds.
    Cheap 1B points first so that --points N is quick."""
    one, eight = "llama-3.2-1b", "llama-3-8b"
    if variant == "plain":
        return [Point(one, 2048, 4, True, 64, "plain"), Point(one, 2048, 4, False, 8, "plain"),
                Point(eight, 2048, 4, True, 16, "plain"), Point(eight, 2048, 8, True, 16, "plain"),
                Point(eight, 512, 4, False, 8, "plain")]
    return [
        Point(one, 512, 1, True, 8), Point(one, 2048, 4, True, 64), Point(one, 512, 4, False, 8),
        Point(one, 2048, 1, False, 64), Point(one, 512, 8, True, 64), Point(one, 2048, 1, True, 8),
        Point(one, 2048, 8, True, 8), Point(one, 8192, 1, True, 8), Point(one, 8192, 4, True, 64),
        Point(one, 2048, 4, False, 8), Point(one, 8192, 1, False, 8), Point(one, 2048, 8, False, 64),
        Point(eight, 512, 1, True, 8), Point(eight, 2048, 4, True, 16), Point(eight, 2048, 8, True, 16),
        Point(eight, 2048, 1, True, 64), Point(eight, 8192, 1, True, 8), Point(eight, 8192, 4, True, 64),
        Point(eight, 512, 4, False, 8), Point(eight, 2048, 1, False, 64), Point(eight, 512, 8, False, 8),
        Point(one, 2048, 8, True, 16, checkpoint_layers=0.5), Point(eight, 2048, 4, True, 16, checkpoint_layers=0.5),
    ]


POINT_70B = Point("llama-3-70b", 2048, 1, True, 16)


def tiny_grid(variant: str) -> list[Point]:
    return [Point("tiny", 64, 2, True, 8, variant), Point("tiny", 64, 2, False, 8, variant)] + (
        [Point("tiny", 64, 2, True, 8, variant, checkpoint_layers=1)] if variant == "fast" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default: $OUT/memory_accuracy.json, else bench/results/memory_accuracy.json)")
    parser.add_argument("--variant", default="fast",
                        help="fast (the recipe's default performance: levers), plain (all off), or fast,plain")
    parser.add_argument("--points", type=int, default=None, help="run only the first N grid points of each variant")
    parser.add_argument("--with-70b", action="store_true", help="also the Llama-3-70B point, built in 4-bit")
    parser.add_argument("--shapes", default=None, help="comma-separated shapes to run (default: the grid's)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per point")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="stop starting points after this many seconds (recorded as skipped)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora-doctor-memory-bench",
                        help="scratch files (point lists, results, the Trainer's output_dir)")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/models"),
                        help="where the random models are saved once, one folder per shape (~19 GB); the "
                             "folders bench/gpu_train_recipes.py uses")
    parser.add_argument("--build-4bit", default="llama-3-70b",
                        help="shapes built directly in 4-bit in memory instead of saved and loaded")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results-file", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
    else:
        run_parent(args)


# --- the parent: choose points, one worker per shape, write the JSON ---------------------------------

def run_parent(args: argparse.Namespace) -> None:
    started = time.time()
    out = args.out or (Path(os.environ["OUT"]) / "memory_accuracy.json" if os.environ.get("OUT")
                       else REPO / "bench" / "results" / "memory_accuracy.json")
    variants = args.variant.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variant {args.variant}: unknown {unknown}; use fast, plain or fast,plain")
    points = []
    for variant in variants:
        some = tiny_grid(variant) if args.shapes == "tiny" else grid(variant)
        if args.shapes and args.shapes != "tiny":
            wanted = set(args.shapes.split(","))
            some = [p for p in some if p.shape in wanted]
        points += some[:args.points] if args.points is not None else some
    # One worker per shape; within it plain points first: few, and the calibration points among them must
    # not fall to --budget-s. What the plain path does to the base is undone after each point (each point
    # records `base_embedding_dtype` to show it).
    points.sort(key=lambda p: -VARIANTS.index(p.variant))
    if args.with_70b:
        points.append(POINT_70B)
    result: dict[str, Any] = {
        "tool": "qlora-doctor bench/memory_accuracy.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        **environment(),
        "shapes": {name: {**COMMON, **SHAPES[name]} for name in dict.fromkeys(p.shape for p in points)},
        "settings": "NF4 + double quant, bf16 compute + autocast (auto), LoRA all-linear dropout 0.05, "
                    "adamw_torch, performance: defaults (fast) or all levers off (plain: "
                    "prepare_model_for_kbit_training), non-reentrant checkpointing, "
                    f"{args.steps} steps on random tokens",
        "variants": variants,
        "points": [],
    }
    deadline = started + args.budget_s
    args.workdir.mkdir(parents=True, exist_ok=True)
    for shape in dict.fromkeys(p.shape for p in points):
        shape_points = [p for p in points if p.shape == shape]
        plan_file = args.workdir / f"{shape}.points.json"
        results_file = args.workdir / f"{shape}.results.jsonl"
        plan_file.write_text(json.dumps([asdict(p) for p in shape_points]))
        results_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", shape, "--plan-file", str(plan_file),
               "--results-file", str(results_file), "--deadline", str(deadline), "--steps", str(args.steps),
               "--workdir", str(args.workdir), "--models-dir", str(args.models_dir), "--build-4bit", args.build_4bit]
        print(f"[{time.time() - started:6.1f}s] {shape}: {len(shape_points)} point(s)", flush=True)
        proc = subprocess.run(cmd)
        done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
        names = {d["name"] for d in done}
        for p in shape_points:
            if p.name not in names:
                done.append({"name": p.name, **asdict(p), "status": "error",
                             "error": f"worker for {shape} exited {proc.returncode} before this point"})
        result["points"].extend(done)
        result["elapsed_s"] = round(time.time() - started, 1)
        write_json(out, result)
    result["summary"] = summary(result["points"])
    result["elapsed_s"] = round(time.time() - started, 1)
    write_json(out, result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out}")


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel", "triton", "qlora-doctor"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    device = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        device = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"device": device, "versions": versions, "python": platform.python_version()}


def summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"all": _summary(points)}
    for variant in VARIANTS:
        some = [p for p in points if p.get("variant", "plain") == variant]
        if some:
            out[variant] = _summary(some)
    return out


def _summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [p for p in points if p["status"] == "measured" and p.get("measured")]
    errors = [p["error_reserved_pct"] for p in measured]
    return {
        "measured": len(measured),
        "skipped": sum(p["status"] == "skipped" for p in points),
        "oom": sum(p["status"] == "oom" for p in points),
        "errors": sum(p["status"] == "error" for p in points),
        "max_abs_error_reserved_pct": max((abs(e) for e in errors), default=None),
        "within_10pct": sum(abs(e) <= 10 for e in errors),
        "levers_mismatch": sum(p.get("levers_match") is False for p in points),
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --- the worker: one shape, its points ---------------------------------------------------------------

def run_worker(args: argparse.Namespace) -> None:
    import torch

    shape = args.worker
    points = [Point(**p) for p in json.loads(args.plan_file.read_text())]
    config = {**COMMON, **SHAPES[shape]}
    cuda = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    data_file = args.workdir / "data.jsonl"
    data_file.write_text('{"text": "unused: the bench feeds random tokens"}\n')

    base = None
    model_dir = args.models_dir / shape
    restore_llama = snapshot_llama_module()
    load_info: dict[str, Any] = {}
    for index, point in enumerate(points):
        record: dict[str, Any] = {"name": point.name, **asdict(point)}
        try:
            recipe = bench_recipe(point, model_dir, data_file, args.workdir, args.steps)
            machine = this_machine()
            plan = planned(config, recipe, machine, gpu_name, gpu_bytes)
            record["predicted"] = plan
            record["planner_levers"] = plan["levers"]
            if plan["fits"] is False:
                record["status"] = "skipped"
                record["reason"] = "the planner predicts it does not fit"
            elif time.time() > args.deadline:
                record["status"] = "skipped"
                record["reason"] = "time budget (--budget-s) used up"
            else:
                if base is None:
                    t0 = time.time()
                    base = build_base(shape, config, model_dir, recipe, machine,
                                      in_memory=shape in args.build_4bit.split(","))
                    record["built_in_memory"] = shape in args.build_4bit.split(",")
                    load_info = {"load_seconds": round(time.time() - t0, 1),
                                 "load_peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None}
                    record.update(load_info)
                    record["fresh_process"] = True
                else:
                    record["fresh_process"] = False
                record.update(measure(base, recipe, machine, point, config, cuda, restore_llama))
                record["levers_match"] = _same_decisions(record.get("levers"), plan["levers"])
                if record.get("measured"):
                    record["error_reserved_pct"] = round(
                        100 * (plan["peak_reserved_bytes"] / record["measured"]["max_memory_reserved_bytes"] - 1), 2)
                    record["error_allocated_pct"] = round(
                        100 * (plan["peak_allocated_bytes"] / record["measured"]["max_memory_allocated_bytes"] - 1), 2)
        except Exception as err:  # one bad point must not end the grid
            record["status"] = "error"
            record["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        print(f"  {point.name}: {record['status']}"
              + (f", reserved {record['measured']['max_memory_reserved_bytes'] / 2**30:.2f} GiB vs predicted "
                 f"{record['predicted']['peak_reserved_bytes'] / 2**30:.2f} ({record['error_reserved_pct']:+.1f}%)"
                 if record.get("error_reserved_pct") is not None else
                 f" ({record.get('reason') or record.get('error', '')})"), flush=True)
        with open(args.results_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def this_machine() -> Any:
    from qlora_doctor.sources.machine import probe_machine

    return probe_machine()


def bench_recipe(point: Point, model_dir: Path, data_file: Path, workdir: Path, steps: int) -> Any:
    """The recipe the trainer would run for this point (defaults everywhere else)."""
    from qlora_doctor.recipe.schema import recipe_from_dict

    model_dir.mkdir(parents=True, exist_ok=True)  # validation wants the folder to exist
    return recipe_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                         "bnb_4bit_compute_dtype": "auto"},
        "lora": {"r": point.r, "lora_alpha": 2 * point.r, "lora_dropout": 0.05, "target_modules": "all-linear"},
        "dataset": {"path": str(data_file), "format": "text", "eval_split": 0},
        "training": {"output_dir": str(workdir / "run"), "max_steps": steps, "per_device_train_batch_size": point.batch,
                     "gradient_accumulation_steps": 1, "max_seq_length": point.seq,
                     "gradient_checkpointing": point.checkpointing, "optim": "adamw_torch",
                     "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1,
                     "save_strategy": "no", "eval_strategy": "no", "report_to": "none"},
        "performance": PLAIN_PERFORMANCE if point.variant == "plain" else (
            {} if point.checkpoint_layers == "all" else {"checkpoint_layers": point.checkpoint_layers}),
    }, where=f"bench:{point.name}")


def planned(config: dict[str, Any], recipe: Any, machine: Any, gpu_name: str | None,
            gpu_bytes: int | None) -> dict[str, Any]:
    from qlora_doctor.memory.model import count_parameters
    from qlora_doctor.memory.plan import plan_for, settings_from_recipe

    settings = settings_from_recipe(recipe, machine, model_type=config["model_type"])
    plan = plan_for(count_parameters(config), settings, gpu_name, gpu_bytes)
    return {"peak_allocated_bytes": plan.peak_allocated_bytes, "peak_reserved_bytes": plan.peak_reserved_bytes,
            "total_bytes": plan.total_bytes, "fits": plan.fits, "peak_phase": plan.peak_phase,
            "calibration": plan.calibration, "breakdown": [{"name": n, "bytes": b} for n, b in plan.breakdown],
            "levers": {lever.name: {"on": lever.on, "reason": lever.reason} for lever in settings.levers}}


def _same_decisions(trainer: dict[str, Any] | None, planner: dict[str, Any]) -> bool | None:
    """Whether every lever is on/off alike (reasons may differ: the trainer knows the attention
    implementation and how many LoRA layers it fused)."""
    if not trainer:
        return None
    return {k: v["on"] for k, v in trainer.items()} == {k: v["on"] for k, v in planner.items()}


def snapshot_llama_module() -> Any:
    """A function that puts transformers' llama module back as it is now (Liger patches its RoPE and
    classes module-wide)."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward

    def restore() -> None:
        for key, value in saved.items():
            setattr(modeling_llama, key, value)
        modeling_llama.LlamaForCausalLM.forward = forward

    return restore


def undo_levers(base: Any, compute_dtype: Any, restore_llama: Any) -> None:
    """The base as load_base left it: no Liger forwards bound to its modules, no float32 upcast (the
    plain path's prepare casts in place), no checkpointing or input-grad hook."""
    for module in base.modules():
        module.__dict__.pop("forward", None)  # Liger binds its forwards per instance
        module.__dict__.pop("_get_name", None)
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    for param in base.parameters():
        if param.__class__.__name__ != "Params4bit" and param.is_floating_point() and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    restore_llama()


def build_base(shape: str, config: dict[str, Any], model_dir: Path, recipe: Any, machine: Any,
               in_memory: bool) -> Any:
    """The 4-bit base, loaded by the trainer's `load_base` from a saved random checkpoint (or, for 70B,
    built directly in 4-bit)."""
    from qlora_doctor.trainer.model import load_base
    from qlora_doctor.recipe.precision import resolve_precision

    if in_memory:
        return build_4bit_in_memory(config, recipe, machine)
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        save_random_checkpoint(config, model_dir)
    return load_base(recipe, resolve_precision(recipe, machine), str(model_dir), quantized=True)


def save_random_checkpoint(config: dict[str, Any], model_dir: Path) -> None:
    """Random bf16 weights, saved once. Built on the meta device and materialized on the GPU, where
    filling 8B random values takes a second (no CPU-side init). Memory does not depend on the values.

    The model lives only inside `_write_random_checkpoint`, so that when the cache is emptied here nothing
    of it is left on the GPU. (Emptied inside that function, its loop variable still held lm_head's
    weight, 1 GiB at 8B; the freed block then stayed reserved for the load that follows, which can place
    4-bit weights in it and pin it: likely the 1.1-1.5 GiB the points of
    bench/results/memory_accuracy_8b_rerun_h100.json started with. Not rerun on a GPU since.)"""
    import torch

    tmp = model_dir.with_name(model_dir.name + ".partial")
    _write_random_checkpoint(config, tmp, "cuda" if torch.cuda.is_available() else "cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if model_dir.exists():
        for f in model_dir.iterdir():
            f.unlink()
        model_dir.rmdir()
    os.replace(tmp, model_dir)


def _write_random_checkpoint(config: dict[str, Any], folder: Path, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                param.fill_(1.0) if "norm" in type(module).__name__.lower() else param.normal_(std=0.02)
    with torch.device(device):  # its inv_freq buffer was made on the meta device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    if cfg.tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.save_pretrained(folder, safe_serialization=True)


def build_4bit_in_memory(config: dict[str, Any], recipe: Any, machine: Any) -> Any:
    """A 4-bit Llama on the GPU without a checkpoint: meta-device model, its Linear layers replaced by
    bnb Linear4bit (as transformers' integration does), each filled with random bf16 weights that are
    quantized on the spot, one layer at a time; embeddings, norms and lm_head in the compute dtype, as load_base loads them."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_doctor.trainer.model import quantization_config, torch_dtype
    from qlora_doctor.recipe.precision import resolve_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only to try the script
    precision = resolve_precision(recipe, machine)
    qconfig = quantization_config(recipe, precision)
    dtype = torch_dtype(precision.compute_dtype)  # what load_base loads the unquantized weights in
    cfg = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    output = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not output:
                weight = torch.empty(child.out_features, child.in_features, dtype=dtype,
                                     device=device).normal_(std=0.02)
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=qconfig.bnb_4bit_compute_dtype,
                                          compress_statistics=qconfig.bnb_4bit_use_double_quant,
                                          quant_type=qconfig.bnb_4bit_quant_type,
                                          quant_storage=qconfig.bnb_4bit_quant_storage, device="meta")
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False,
                                                 compress_statistics=qconfig.bnb_4bit_use_double_quant,
                                                 quant_type=qconfig.bnb_4bit_quant_type,
                                                 quant_storage=qconfig.bnb_4bit_quant_storage).to(device)
                del weight
                setattr(module, child_name, layer)
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, dtype=dtype, device=device)
                value.fill_(1.0) if "norm" in type(module).__name__.lower() else value.normal_(std=0.02)
                setattr(module, pname, nn.Parameter(value, requires_grad=False))
    if output is not None and cfg.tie_word_embeddings:
        output.weight = model.get_input_embeddings().weight
    rotary_type = type(model.model.rotary_emb)
    with torch.device(device):  # its inv_freq buffer was made on the meta device
        model.model.rotary_emb = rotary_type(config=cfg)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; prepare_model_for_kbit_training reads it
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"70B build left tensors on the meta device: {leftover[:5]}")
    return model


def measure(base: Any, recipe: Any, machine: Any, point: Point, config: dict[str, Any], cuda: bool,
            restore_llama: Any) -> dict[str, Any]:
    """Train `point` on `base` through the trainer's load_for_training and speed levers, as
    `qlora-doctor run` does; the peak counters of the run and the levers as the trainer decided them."""
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    from qlora_doctor.recipe.levers import plan_for_model
    from qlora_doctor.trainer import model as trainer_model
    from qlora_doctor.trainer import speed
    from qlora_doctor.trainer.collate import flattening_collator
    from qlora_doctor.trainer.fused_lora import is_fused
    from qlora_doctor.recipe.precision import resolve_precision
    from qlora_doctor.trainer.arguments import training_arguments_kwargs

    class RandomTokens(Dataset):
        def __init__(self, rows: int, seq: int, vocab: int):
            generator = torch.Generator().manual_seed(0)
            self.ids = torch.randint(3, vocab, (rows, seq), generator=generator)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}

    precision = resolve_precision(recipe, machine)
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()  # a previous point may have enabled it (transformers >= 5.2x renamed the method)
    # The decision load_for_training makes on this base (same call), then what fusing actually did.
    decided = plan_for_model(recipe, precision, base)
    embedding_dtype = str(base.get_input_embeddings().weight.dtype)  # before this point's levers touch it
    model = trainer_model.prepare_lora_model(base, recipe, precision, decided)
    fused = sum(is_fused(m) for m in model.modules())
    levers = decided.to_json()
    levers["fused_lora"] = {"on": fused > 0, "reason": f"{fused} LoRA layers fused" if fused
                            else levers["fused_lora"]["reason"]}
    trainer = None
    started = time.time()
    status, extra = ("measured" if cuda else "ran_without_cuda"), {"levers": levers}
    extra["base_embedding_dtype"] = embedding_dtype
    try:
        kwargs = training_arguments_kwargs(recipe, precision)
        kwargs.update(speed.training_arguments_overrides(decided))  # as trainer/train.py: checkpointing is set
        args = TrainingArguments(**kwargs, label_names=["labels"], disable_tqdm=True)
        data = RandomTokens(point.batch * recipe.training.max_steps, point.seq, config["vocab_size"])
        collator = flattening_collator() if decided.padding_free.on else default_data_collator
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            # The reserved peak starts at what is reserved now: memory_table.py checks it held no cache.
            at_start = {"reserved_at_start_bytes": torch.cuda.memory_reserved(),
                        "allocated_at_start_bytes": torch.cuda.memory_allocated()}
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            extra["measured"] = {
                **at_start,
                "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
                "device_used_after_bytes": total - free,
                "reserved_after_bytes": torch.cuda.memory_reserved(),
            }
        extra["final_loss"] = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None)
    except torch.OutOfMemoryError as err:
        status = "oom"
        extra["error"] = str(err).splitlines()[0][:300]
        extra["max_memory_reserved_at_oom_bytes"] = torch.cuda.max_memory_reserved() if cuda else None
    finally:
        extra["train_seconds"] = round(time.time() - started, 1)
        trainer = None
        model.unload()  # LoRA layers out (fused forwards with them)
        model = None
        gc.collect()
        if cuda:  # else undo_levers' casts land in this run's cached blocks and pin them for the next point
            torch.cuda.empty_cache()
        undo_levers(base, trainer_model.torch_dtype(precision.compute_dtype), restore_llama)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"status": status, **extra}


if __name__ == "__main__":
    main()

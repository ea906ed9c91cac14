"""QLoRA training throughput: the plain transformers+peft+bitsandbytes path (a) against
`qlora-doctor run`'s path (b) and each of its levers, in one process, on the same card.

(a) baseline: 4-bit NF4 + double quant, bf16 compute, peft's `prepare_model_for_kbit_training`
    defaults, LoRA r=16 on all linear layers (dropout 0.05), gradient checkpointing on, the transformers
    Trainer with bf16=True (autocast) -- what a user of the libraries gets.
(b) the trainer's own functions: `load_for_training` (qlora_doctor/trainer/model.py, which applies the
    recipe's `performance:` levers), `training_arguments_kwargs` + `speed.training_arguments_overrides`,
    `speed.make_collator`, the same Trainer. Ablation variants set `performance:` keys one by one.

Models are random weights built from a config (`from_config` in bf16 on the GPU), saved once under
--models-dir and loaded in 4-bit like any checkpoint. Tokens/s count non-padding tokens of timed steps
(after --warmup steps, CUDA synchronized at each step's start and end). MFU uses 4N FLOPs per token
(forward 2N + input-gradient backward 2N, N = matmul parameters incl. lm_head) over 989 TFLOP/s.
Results are rewritten to --out after every point, so a time-out keeps what was measured.

    python3 bench/train_throughput.py --out /tmp/t.json --quick                  # first look (8B, batch 8)
    python3 bench/train_throughput.py --out /tmp/t.json --shapes 8b --batches 4,8 --variants ablation
    python3 bench/train_throughput.py --out /tmp/t.json --device cpu --tiny --loss-steps 5 --varlen   # CPU smoke
    python3 bench/train_throughput.py --out /tmp/t.json --shapes 8b --batches 8 --variants selective  # issue #20
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # qlora_doctor from this checkout

PEAK_FLOPS = 989e12
GIB = 2**30

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "tiny-1b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=512, tie_word_embeddings=True, head_dim=16),
    "tiny-8b": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=512, tie_word_embeddings=False, head_dim=32),
    # The builtin model's shape (builtin:smollm2-135m-instruct), random weights: a CPU-sized real model.
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
}

BENCH_ONLY_CACHE_ON_GPU = "_selective_cache_on_gpu"
BENCH_ONLY_NO_WHOLE_LORA = "_no_whole_lora"
BENCH_ONLY_CACHE_MIN_64KIB = "_cache_min_64kib"
BENCH_ONLY_LIGER_SWIGLU = "_fp8_liger_swiglu"
BENCH_ONLY = (BENCH_ONLY_CACHE_ON_GPU, BENCH_ONLY_NO_WHOLE_LORA, BENCH_ONLY_CACHE_MIN_64KIB, BENCH_ONLY_LIGER_SWIGLU)
"""`performance` keys of a variant that are switches of this bench, not recipe settings."""
"""A variant key that is not a recipe setting: trainer/offload.py's OFFLOAD_SELECTIVE_CACHE off for that variant."""

# Ablation: `performance:` settings of recipe variants (b). "baseline" is the plain path (a).
ALL_OFF = dict(upcast_unquantized=True, liger_kernel=False, fused_lora=False, padding_free=False,
               group_by_length=False, checkpoint_layers="all")
VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "recipe_all_off": ALL_OFF,
    "no_upcast": {**ALL_OFF, "upcast_unquantized": False},
    "liger": {**ALL_OFF, "liger_kernel": True},
    "fused_lora": {**ALL_OFF, "fused_lora": True},
    "no_upcast+liger": {**ALL_OFF, "upcast_unquantized": False, "liger_kernel": True},
    "fast": {},  # every default: the path `qlora-doctor run` takes
    "fast_ckpt_0.75": {"checkpoint_layers": 0.75},
    "fast_ckpt_0.5": {"checkpoint_layers": 0.5},
    "fast_ckpt_0.25": {"checkpoint_layers": 0.25},
    "fast_no_ckpt": {"checkpoint_layers": 0},
    # performance.recompute: selective (qlora_doctor/trainer/selective.py): checkpointed layers keep their
    # q/k/v/o/down GEMM outputs and the attention output, the replay recomputes only gate/up.
    "fast_selective": {"recompute": "selective"},
    "fast_selective_ckpt_0.75": {"recompute": "selective", "checkpoint_layers": 0.75},
    "fast_selective_ckpt_0.5": {"recompute": "selective", "checkpoint_layers": 0.5},
    "fast_compile": {"torch_compile": True},
    "fast_cudnn": {"cudnn_attention": True},  # cuDNN attention left on where the knowledge base turns it off
    # performance.fp8_base (qlora_doctor/trainer/fp8.py): the 4-bit base layers' forward and input-gradient GEMMs
    # in float8 (torchao, tensorwise scales, compiled casts: the first step compiles them, keep --warmup >= 1).
    "fast_fp8": {"fp8_base": True},
    # performance.offload_checkpoints (qlora_doctor/trainer/offload.py): checkpointed layers' inputs in pinned host
    # memory, copied on side streams, prefetched one layer ahead (unsloth's offloaded checkpointing); unmeasured
    "fast_offload": {"offload_checkpoints": True},
    "fast_fp8_offload": {"fp8_base": True, "offload_checkpoints": True},
    "fast_fp8_ckpt_0.5": {"fp8_base": True, "checkpoint_layers": 0.5},
    # fp8_base with selective recompute: the float8 GEMM is one op (qlora_doctor::fp8_gemm_4bit) the policy keeps
    "fast_fp8_selective": {"fp8_base": True, "recompute": "selective"},
    "fast_fp8_selective_offload": {"fp8_base": True, "recompute": "selective", "offload_checkpoints": True},
    # performance.fp8_weight_cache: each weight's float8 cast kept in both layouts (2 bytes per base
    # parameter), not dequantized and cast again at every GEMM; the same bits (tests/test_fp8_base.py)
    "fast_fp8_cache": {"fp8_base": True, "fp8_weight_cache": True},
    "fast_fp8_cache_selective_offload": {"fp8_base": True, "fp8_weight_cache": True, "recompute": "selective",
                                         "offload_checkpoints": True},
    # the same with Liger's own SwiGLU (trainer/fp8_swiglu.py ROUTE off): the casts read their tensors for the amax
    "fast_fp8_cache_selective_offload_liger_swiglu": {"fp8_base": True, "fp8_weight_cache": True,
                                                      "recompute": "selective", "offload_checkpoints": True,
                                                      BENCH_ONLY_LIGER_SWIGLU: True},
    # selective recompute with the checkpointed layers' inputs on the host: less recompute at offload's memory
    "fast_selective_offload": {"recompute": "selective", "offload_checkpoints": True},
    # selective recompute on the first 3/4 or half of the (offloaded) checkpointed layers, full on the rest
    "fast_selective_offload_0.75": {"recompute": "selective", "selective_layers": 0.75, "offload_checkpoints": True},
    "fast_selective_offload_0.5": {"recompute": "selective", "selective_layers": 0.5, "offload_checkpoints": True},
    # as fast_selective_offload, but the selective layers' kept outputs stay on the GPU (only the inputs move):
    # what offload_checkpoints did before it moved the kept outputs too (trainer/offload.py OFFLOAD_SELECTIVE_CACHE)
    "fast_selective_offload_inputs": {"recompute": "selective", "offload_checkpoints": True,
                                      BENCH_ONLY_CACHE_ON_GPU: True},
    # the default, but v/o/down_proj keep only their base GEMM output as q/k do (trainer/fused_lora.py
    # WHOLE_LORA_OP off): what the whole-LoRA op brings
    "fast_no_whole_lora": {BENCH_ONLY_NO_WHOLE_LORA: True},
    # every layer recomputed whole, nothing offloaded: the reference loss curve of the default's
    "fast_full_recompute": {"recompute": "full", "offload_checkpoints": False},
    # the default as call 2 of bench/results/fastpath_h100_2026-12-06b ran it: kept tensors down to 64 KiB moved to
    # the host, the whole-LoRA op's A x among them (offload.CACHE_MIN_BYTES, STAY_ON_DEVICE: its loss curve lagged)
    "fast_cache_min_64kib": {BENCH_ONLY_CACHE_MIN_64KIB: True},
    "fast_selective_no_offload": {"recompute": "selective", "offload_checkpoints": False},
    "fast_full_offload": {"recompute": "full", "offload_checkpoints": True},
}
ABLATION = ["baseline", "no_upcast", "liger", "fused_lora", "no_upcast+liger", "fast", "fast_ckpt_0.5",
            "fast_no_ckpt"]
SELECTIVE = ["fast", "fast_selective", "fast_selective_ckpt_0.75", "fast_selective_ckpt_0.5", "fast_ckpt_0.5",
             "fast_no_ckpt"]
"""`--variants selective`: full vs selective recompute (issue #20), with the partial-checkpointing points
between them and no checkpointing as the bound."""
FP8 = ["baseline", "fast", "fast_fp8", "fast_fp8_ckpt_0.5"]
"""`--variants fp8`: float8 base GEMMs against the plain and the default path (issue #20, item 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file (rewritten after every point)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (tiny-1b, tiny-8b) for a CPU smoke run")
    p.add_argument("--quick", action="store_true", help="8B, batch 8, baseline and fast, 4 timed steps")
    p.add_argument("--shapes", default="8b",
                   help="comma list of 1b, 8b, 135m (with --tiny: tiny-1b, tiny-8b); \"\": none (only --loss-steps)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--variants", default="baseline,fast",
                   help=f"comma list, or `ablation` ({','.join(ABLATION)}), `selective` ({','.join(SELECTIVE)}) or "
                        f"`fp8` ({','.join(FP8)}); "
                        f"known: {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per point")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--long-seq", type=int, default=0, help="also run baseline and fast at this sequence length, batch 1")
    p.add_argument("--varlen", action="store_true", help="variable-length data (uniform 128..seq): padded vs ours")
    p.add_argument("--varlen-shape", default=None, help="shape for --varlen and --loss-steps (default 1b / tiny-1b)")
    p.add_argument("--varlen-batch", type=int, default=8)
    p.add_argument("--loss-steps", type=int, default=0,
                   help="loss curves of --loss-reference and each --loss-variant over this many steps")
    p.add_argument("--loss-seq", type=int, default=512)
    p.add_argument("--loss-batch", type=int, default=4)
    p.add_argument("--loss-lr", type=float, default=3e-3,
                   help="learning rate of the loss-curve runs (LoRA on random weights moves slowly at 2e-4)")
    p.add_argument("--loss-tolerance", type=float, default=0.05,
                   help="allowed relative difference of the mean loss over the last 10 steps")
    p.add_argument("--loss-abs-tolerance", type=float, default=0.0,
                   help="also passes when the last-10 means differ by at most this much (losses near 0)")
    p.add_argument("--loss-reference", default="baseline", help="the reference curve's variant (e.g. fast)")
    p.add_argument("--loss-variant", default="fast",
                   help="comma list: the curves compared with the reference (e.g. fast,fast_fp8_cache)")
    p.add_argument("--loss-data", choices=["pattern", "memorise"], default="pattern",
                   help="pattern: rows repeating a random 16-token pattern (each row new); memorise: 16 fixed "
                        "random rows over the whole vocabulary, cycled (loss from ~ln(vocab) toward 0)")
    p.add_argument("--budget-s", type=float, default=480, help="skip points that would start after this many seconds")
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="LoRA dropout of every variant (0: the same LoRA settings as bench/peer_unsloth.py)")
    p.add_argument("--optim", default=None, help="optimizer for both paths (default: the recipe default on cuda, "
                                                 "adamw_torch on cpu)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.batches, args.variants, args.steps, args.warmup = "8b", "8", "baseline,fast", 4, 1
    if args.tiny:
        args.shapes = ",".join(s if s.startswith("tiny-") else f"tiny-{s}" for s in args.shapes.split(",") if s)
        if args.seq == 2048:
            args.seq = 64
        args.loss_seq = min(args.loss_seq, 64)
    if args.variants == "ablation":
        args.variants = ",".join(ABLATION)
    elif args.variants == "selective":
        args.variants = ",".join(SELECTIVE)
    elif args.variants == "fp8":
        args.variants = ",".join(FP8)
    unknown = [v for v in [*args.variants.split(","), args.loss_reference, *args.loss_variant.split(",")]
               if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return args


# --- environment ----------------------------------------------------------------------------------

def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def matmul_params(shape: dict[str, Any]) -> int:
    h, L, i, v = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return L * per_layer + v * h


def build_model(name: str, device: str, models_dir: str) -> str:
    """Random weights for a shape, saved once (reused when config.json is already there)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(models_dir) / f"llama-{name}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return str(path)
    config = LlamaConfig(**SHAPES[name], max_position_embeddings=131072, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=models_dir if Path(models_dir).is_dir() else None))
    model.save_pretrained(tmp)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return str(path)


# --- data -----------------------------------------------------------------------------------------

class TokenData:
    """A map-style dataset of token rows (lists), as the trainer's data pipeline produces them."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def random_rows(count: int, lengths: list[int], vocab: int, seed: int) -> TokenData:
    rng = random.Random(seed)
    return TokenData([[rng.randrange(3, vocab) for _ in range(lengths[k % len(lengths)])] for k in range(count)])


def memorised_rows(count: int, seq: int, seed: int, vocab: int, distinct: int = 16) -> TokenData:
    """Learnable by memorising: `distinct` fixed random rows over the vocabulary, cycled `count` times over."""
    fixed = random_rows(distinct, [seq], vocab, seed).rows
    return TokenData([fixed[k % distinct] for k in range(count)])


def pattern_rows(count: int, seq: int, seed: int, period: int = 16, alphabet: int = 64) -> TokenData:
    """Learnable: each row repeats a random pattern of `period` tokens drawn from `alphabet` tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        pattern = [rng.randrange(3, 3 + alphabet) for _ in range(period)]
        rows.append((pattern * (seq // period + 1))[:seq])
    return TokenData(rows)


class CountingCollator:
    """Wraps a collator; queues (non-padding tokens, tokens computed) per batch for the timing callback."""

    def __init__(self, inner: Any):
        self.inner, self.queue = inner, collections.deque()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        real = sum(len(f["input_ids"]) for f in features)
        self.queue.append((real, int(batch["input_ids"].numel())))
        return batch


def step_timer(device: str, collator: CountingCollator, losses: list[float]) -> Any:
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int, int]] = []
            self._t = 0.0

        def _sync(self) -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._sync()
            self._t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._sync()
            real, total = collator.queue.popleft() if collator.queue else (0, 0)
            self.steps.append((time.perf_counter() - self._t, real, total))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return StepTimer()


# --- the two paths ----------------------------------------------------------------------------------

def precision_for(device: str) -> Any:
    from qlora_doctor.recipe.precision import Precision

    if device == "cuda":
        return Precision(device="cuda", fp16=False, bf16=True, compute_dtype="bfloat16", compute_capability="9.0",
                         reason="bench: bf16 on the GPU")
    return Precision(device="cpu", fp16=False, bf16=False, compute_dtype="float32", compute_capability=None,
                     reason="bench: float32 on the CPU")


LORA_DROPOUT = 0.05
"""LoRA dropout of every path (`--lora-dropout`; 0 is unsloth's fast path, which bench/peer_unsloth.py runs)."""


def make_recipe(model_path: str, performance: dict[str, Any], work: Path, batch: int, seq: int, steps: int,
                optim: str, lr: float, logging_steps: int) -> Any:
    from qlora_doctor.recipe.schema import recipe_from_dict

    performance = {k: v for k, v in performance.items() if k not in BENCH_ONLY}  # not recipe settings
    data = work / "unused.jsonl"
    data.write_text('{"text": "the bench feeds its own token rows"}\n')
    return recipe_from_dict({
        "model": {"name_or_path": model_path},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": LORA_DROPOUT, "target_modules": "all-linear"},
        "dataset": {"path": str(data), "format": "text", "eval_split": 0},
        "training": {"output_dir": str(work / "out"), "max_steps": steps, "per_device_train_batch_size": batch,
                     "max_seq_length": seq, "optim": optim, "learning_rate": lr, "save_strategy": "no",
                     "eval_strategy": "no", "logging_steps": logging_steps, "warmup_steps": 0},
        "performance": performance,
    })


def _checkpointing_arg() -> str:
    from qlora_doctor.trainer.arguments import training_arguments_accept as _training_arguments_accept

    return "activation_checkpointing" if _training_arguments_accept("activation_checkpointing") else "gradient_checkpointing"


def baseline_trainer_parts(model_path: str, device: str, batch: int, steps: int, optim: str, lr: float,
                           logging_steps: int, work: Path) -> tuple[Any, Any, Any]:
    """(model, TrainingArguments, collator) of the plain path, written as the libraries' docs show it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

    from qlora_doctor.trainer.data import PaddingCollator

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=q, dtype=dtype,
                                                 device_map={"": 0} if device == "cuda" else {"": "cpu"})
    model = prepare_model_for_kbit_training(model)  # defaults: fp32 upcast, gradient checkpointing
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=LORA_DROPOUT, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(work / "baseline"), per_device_train_batch_size=batch, max_steps=steps,
                             bf16=device == "cuda", use_cpu=device == "cpu", optim=optim, learning_rate=lr,
                             warmup_steps=0, logging_steps=logging_steps, save_strategy="no", report_to="none",
                             lr_scheduler_type="cosine", max_grad_norm=0.3, label_names=["labels"],
                             **{_checkpointing_arg(): True})
    return model, args, PaddingCollator(pad_token_id=0)


OFFLOAD_DEFAULTS: dict[str, Any] = {}
"""trainer/offload.py's CACHE_MIN_BYTES and STAY_ON_DEVICE as the module set them (taken before a variant changes
them: one process runs several variants)."""


def ours_trainer_parts(model_path: str, performance: dict[str, Any], device: str, batch: int, seq: int, steps: int,
                       optim: str, lr: float, logging_steps: int, work: Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, TrainingArguments, collator, levers) exactly as `qlora-doctor run` builds them."""
    from transformers import TrainingArguments

    from qlora_doctor.recipe.levers import speed_plan
    from qlora_doctor.runplan import levers_for_loaded
    from qlora_doctor.trainer import speed
    from qlora_doctor.trainer.arguments import training_arguments_kwargs
    from qlora_doctor.trainer.collate import make_collator
    from qlora_doctor.trainer.model import load_for_training

    from qlora_doctor.trainer import offload

    precision = precision_for(device)
    from qlora_doctor.trainer import fused_lora

    offload.OFFLOAD_SELECTIVE_CACHE = not performance.get(BENCH_ONLY_CACHE_ON_GPU, False)
    fused_lora.WHOLE_LORA_OP = not performance.get(BENCH_ONLY_NO_WHOLE_LORA, False)
    from qlora_doctor.trainer import fp8_swiglu

    fp8_swiglu.ROUTE = not performance.get(BENCH_ONLY_LIGER_SWIGLU, False)
    OFFLOAD_DEFAULTS.setdefault("min", offload.CACHE_MIN_BYTES)
    OFFLOAD_DEFAULTS.setdefault("stay", offload.STAY_ON_DEVICE)
    moved = performance.get(BENCH_ONLY_CACHE_MIN_64KIB, False)
    offload.CACHE_MIN_BYTES = (64 << 10) if moved else OFFLOAD_DEFAULTS["min"]
    offload.STAY_ON_DEVICE = {} if moved else OFFLOAD_DEFAULTS["stay"]
    recipe = make_recipe(model_path, performance, work, batch, seq, steps, optim, lr, logging_steps)
    hazards: tuple[Any, ...] = ()
    if device == "cuda":
        from qlora_doctor.runplan import build_run_plan
        from qlora_doctor.sources.machine import probe_machine

        # As `qlora-doctor run` decides: the memory planner resolves every `auto` (checkpoint_layers,
        # selective_layers, offload_checkpoints and recompute against this host's memory) and the knowledge base's
        # cuDNN hazards for this torch and GPU.
        run = build_run_plan(recipe, probe_machine(), where="bench")
        recipe, hazards = run.recipe, run.cudnn_hazards or ()
    model = load_for_training(recipe, precision, model_path, speed_plan(recipe, precision, cudnn_hazards=hazards))
    plan = levers_for_loaded(recipe, precision, model, hazards)  # what the trainer decided after loading
    speed.apply_process_settings(plan, device)  # process-wide: train_points restores torch's default first
    kwargs = training_arguments_kwargs(recipe, precision)
    kwargs.update(speed.training_arguments_overrides(plan), report_to="none")
    args = TrainingArguments(**kwargs, label_names=["labels"])

    class _Tok:  # make_collator reads only the pad token
        pad_token_id, eos_token_id = 0, 2

    return model, args, make_collator(plan, _Tok()), plan.to_json()


@contextlib.contextmanager
def restored_llama_module() -> Any:
    """Liger patches transformers' llama module (RoPE, classes); undo it so the next baseline is plain."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    forward = modeling_llama.LlamaForCausalLM.forward
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(modeling_llama, key, value)
        modeling_llama.LlamaForCausalLM.forward = forward


def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def train_points(variant: str, model_path: str, shape: str, seq: int, batches: list[int], data_for: Any,
                 args: argparse.Namespace, optim: str, lr: float = 2e-4, logging_steps: int = 1000,
                 deadline: float = math.inf) -> list[dict[str, Any]]:
    """One model load, then one Trainer per batch size; every point is recorded, OOMs included."""
    import torch
    from transformers import Trainer

    device = args.device
    steps = args.warmup + args.steps
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    performance = VARIANTS[variant]
    model = None
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(True)  # torch's default; a variant before may have turned it off
        sdpa = torch.nn.functional.scaled_dot_product_attention  # or gated it (trainer/speed.py)
        torch.nn.functional.scaled_dot_product_attention = getattr(sdpa, "__qlora_wrapped__", sdpa)
    if time.perf_counter() > deadline:  # don't even load
        return [dict(shape=shape, seq=seq, batch=b, variant=variant, error="skipped: --budget-s reached")
                for b in batches]
    with restored_llama_module():
        try:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            if performance is None:
                model, targs, inner, levers = (*baseline_trainer_parts(model_path, device, batches[0], steps, optim,
                                                                        lr, logging_steps, work), None)
            else:
                model, targs, inner, levers = ours_trainer_parts(model_path, performance, device, batches[0], seq,
                                                                 steps, optim, lr, logging_steps, work)
            load_s = time.perf_counter() - t0
        except torch.OutOfMemoryError as err:
            model = None
            return [dict(shape=shape, seq=seq, batch=b, variant=variant, error=f"OOM while loading: {err}"[:300])
                    for b in batches]
        oom = False
        for batch in batches:
            point: dict[str, Any] = dict(shape=shape, seq=seq, batch=batch, variant=variant,
                                         load_seconds=round(load_s, 1), levers=levers)
            if oom or time.perf_counter() > deadline:
                point["error"] = "skipped: a smaller batch ran out of memory" if oom else "skipped: --budget-s reached"
                results.append(point)
                continue
            collator = CountingCollator(inner)
            losses: list[float] = []
            timer = step_timer(device, collator, losses)
            targs.per_device_train_batch_size = batch
            trainer = None
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                trainer = Trainer(model=model, args=targs, train_dataset=data_for(batch, steps),
                                  data_collator=collator, callbacks=[timer])
                trainer.train()
                timed = timer.steps[args.warmup:] if len(timer.steps) > args.warmup else timer.steps
                seconds = sum(s for s, _, _ in timed)
                real = sum(r for _, r, _ in timed)
                computed = sum(c for _, _, c in timed)
                point.update(steps_timed=len(timed), step_seconds=[round(s, 4) for s, _, _ in timed],
                             tokens_per_s=round(real / seconds, 1) if seconds else None,
                             padding_waste=round(1 - real / computed, 4) if computed else None,
                             losses=losses or None)
                from qlora_doctor.trainer.fp8 import fp8_gemms  # fp8_base: casts that could not be compiled

                gemms = fp8_gemms(model)
                fallbacks = [f for gemm in gemms for f in gemm.fallbacks()]
                if fallbacks:
                    point["fp8_cast_fallbacks"] = fallbacks
                if gemms:  # how many MLPs run trainer/fp8_swiglu.py's SwiGLU, how many casts took its maxima
                    from qlora_doctor.trainer.fp8_swiglu import ROW_AMAX, is_routed

                    point["fp8_swiglu_mlps"] = sum(is_routed(m) for m in model.modules())
                    point["fp8_casts_given_row_maxima"] = ROW_AMAX.used
                if device == "cuda":
                    point.update(max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                                 max_memory_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
            except torch.OutOfMemoryError as err:
                point["error"] = f"OOM: {str(err).splitlines()[0]}"[:300]
                oom = True
            finally:
                if trainer is not None:
                    trainer.accelerator.free_memory()
                del trainer
                free(device)
            results.append(point)
        del model
    free(device)
    return results


# --- the run --------------------------------------------------------------------------------------

class Results:
    def __init__(self, path: str, meta: dict[str, Any]):
        self.path, self.data = Path(path), {"meta": meta, "points": [], "speedups": [], "varlen": [],
                                            "loss_curves": None, "summary": {}}

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def add_mfu(points: list[dict[str, Any]]) -> None:
    for p in points:
        if p.get("tokens_per_s"):
            n = matmul_params(SHAPES[p["shape"]])
            p["mfu_4n"] = round(p["tokens_per_s"] * 4 * n / PEAK_FLOPS, 4)


def summarize(res: Results) -> None:
    points = [p for p in res.data["points"] if p.get("tokens_per_s")]
    speedups = []
    summary: dict[str, Any] = {}
    for shape, seq in sorted({(p["shape"], p["seq"]) for p in points}):
        group = [p for p in points if (p["shape"], p["seq"]) == (shape, seq)]
        base = {p["batch"]: p for p in group if p["variant"] == "baseline"}
        for p in group:
            if p["variant"] != "baseline" and p["batch"] in base:
                b = base[p["batch"]]
                speedups.append(dict(shape=shape, seq=seq, batch=p["batch"], variant=p["variant"],
                                     tokens_per_s_speedup=round(p["tokens_per_s"] / b["tokens_per_s"], 3),
                                     reserved_ratio=_ratio(p, b, "max_memory_reserved_gib"),
                                     allocated_ratio=_ratio(p, b, "max_memory_allocated_gib")))
        if base:
            best = max(base.values(), key=lambda p: p["tokens_per_s"])
            key = f"{shape}_seq{seq}"
            summary[key] = {"baseline_fastest_batch": best["batch"], "baseline_tokens_per_s": best["tokens_per_s"]}
            for p in group:
                if p["variant"] == "baseline":
                    continue
                entry = summary[key].setdefault(p["variant"], {})
                entry[f"b{p['batch']}_speedup_vs_baseline_fastest"] = round(p["tokens_per_s"] / best["tokens_per_s"], 3)
                if p["batch"] == 8 and 8 in base:
                    entry["b8_reserved_ratio_vs_baseline_b8"] = _ratio(p, base[8], "max_memory_reserved_gib")
    res.data["speedups"], res.data["summary"] = speedups, summary


def _ratio(p: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return round(p[key] / b[key], 3) if p.get(key) and b.get(key) else None


def compare_losses(a: list[float], b: list[float], tolerance: float, abs_tolerance: float) -> dict[str, Any]:
    """Curve `b` against reference `a` (same steps): last-10-step means, their relative difference, the largest
    single-step gap, and whether the means agree within `tolerance` (relative) or `abs_tolerance`."""
    if not a or not b or len(a) != len(b):
        return {"error": f"curves of {len(a)} and {len(b)} steps cannot be compared"}
    tail = min(10, len(a))
    mean_a, mean_b = sum(a[-tail:]) / tail, sum(b[-tail:]) / tail
    return dict(last_mean_reference=round(mean_a, 4), last_mean=round(mean_b, 4),
                last_mean_rel_diff=round(abs(mean_b - mean_a) / mean_a, 4),
                last_mean_abs_diff=round(abs(mean_b - mean_a), 4),
                max_abs_step_diff=round(max(abs(x - y) for x, y in zip(a, b)), 4),
                loss_moved=b[-1] < 0.8 * b[0],
                within_tolerance=(abs(mean_b - mean_a) / mean_a <= tolerance or abs(mean_b - mean_a) <= abs_tolerance))


def loss_curves(args: argparse.Namespace, res: Results, optim: str, deadline: float) -> None:
    """The reference variant's loss curve and each --loss-variant's, on the same batches in the same order, each
    compared with the reference (compare_losses) and all drawn in one plot beside --out."""
    shape = args.varlen_shape or ("tiny-1b" if args.tiny else "1b")
    path = build_model(shape, args.device, args.models_dir)
    n = args.loss_steps
    if args.loss_data == "memorise":
        data = memorised_rows(n * args.loss_batch, args.loss_seq, seed=7, vocab=SHAPES[shape]["vocab_size"])
        described = f"16 fixed random rows of {args.loss_seq} tokens over the vocabulary, cycled, seed 7"
    else:
        data = pattern_rows(n * args.loss_batch, args.loss_seq, seed=7)
        described = "rows repeating a random 16-token pattern over 64 tokens, seed 7"
    saved = (args.warmup, args.steps)
    args.warmup, args.steps = 0, n
    names = [args.loss_reference, *[v for v in args.loss_variant.split(",") if v != args.loss_reference]]
    points: dict[str, dict[str, Any]] = {}
    # The same batches in the same order for every curve (no grouping by length); the baseline is the plain path.
    for name in names:
        key = f"loss_{name}"
        VARIANTS[key] = None if name == "baseline" else {**(VARIANTS[name] or {}), "group_by_length": False}
        points[name] = train_points(key, path, shape, args.loss_seq, [args.loss_batch], lambda b, s: data, args,
                                    optim, lr=args.loss_lr, logging_steps=1, deadline=deadline)[0]
    args.warmup, args.steps = saved
    curves = {name: points[name].get("losses") or [] for name in names}
    ref = curves[args.loss_reference]
    out: dict[str, Any] = {"shape": shape, "seq": args.loss_seq, "batch": args.loss_batch, "steps": n, "lr": args.loss_lr,
                           "optim": optim, "lora_dropout": LORA_DROPOUT, "data": described,
                           "reference_variant": args.loss_reference, "variants": names[1:], "curves": curves,
                           "tolerance": args.loss_tolerance, "abs_tolerance": args.loss_abs_tolerance,
                           "compared": {name: compare_losses(ref, curves[name], args.loss_tolerance,
                                                             args.loss_abs_tolerance) for name in names[1:]},
                           "levers": {name: p.get("levers") for name, p in points.items()},
                           "errors": {name: p.get("error") for name, p in points.items() if p.get("error")}}
    if ref and any(curves[name] for name in names[1:]):
        out["plot"] = plot_losses(args.loss_reference, curves, Path(args.out).parent / "loss_curves.png", out)
    res.data["loss_curves"] = out


CURVE_LABELS = {"baseline": "plain transformers + peft + bitsandbytes (Trainer)"}


def plot_losses(reference: str, curves: dict[str, list[float]], path: Path, info: dict[str, Any]) -> str | None:
    """One panel per compared curve, each drawn over the reference; the title gives the last-10 means."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    others = [name for name in curves if name != reference and curves[name]]
    fig, axes = plt.subplots(len(others), 1, figsize=(7, 3.2 * len(others)), squeeze=False, sharex=True)
    ref = curves[reference]
    for ax, name in zip(axes[:, 0], others):
        ax.plot(range(1, len(ref) + 1), ref, label=CURVE_LABELS.get(reference, reference), color="0.45")
        ax.plot(range(1, len(curves[name]) + 1), curves[name], label=CURVE_LABELS.get(name, name), linestyle="--")
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        got = info.get("compared", {}).get(name, {})
        part = f" (its first {got['steps_compared']} steps)" if got.get("steps_compared", len(ref)) < len(ref) else ""
        ax.set_title(f"{name}: last-10 mean {got.get('last_mean')} vs {got.get('last_mean_reference')}{part}", fontsize=9)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{info['shape']} shape, seq {info['seq']}, batch {info['batch']}, lr {info['lr']}: {info['data']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    started = time.perf_counter()
    deadline = started + args.budget_s
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    optim = args.optim or ("paged_adamw_8bit" if args.device == "cuda" else "adamw_torch")
    global LORA_DROPOUT
    LORA_DROPOUT = args.lora_dropout
    meta = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "device": args.device,
            "card": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
            "versions": versions(), "optim": optim, "lora_dropout": LORA_DROPOUT, "peak_flops": PEAK_FLOPS, "warmup_steps": args.warmup,
            "timed_steps": args.steps, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    res = Results(args.out, meta)
    res.write()
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    if args.loss_steps:  # first: small, and the correctness evidence must not fall to --budget-s
        loss_curves(args, res, optim, deadline)
        res.write()
    for shape in filter(None, args.shapes.split(",")):  # --shapes "": only the loss curves or --varlen
        if time.perf_counter() > deadline:
            res.data["points"].append(dict(shape=shape, error="skipped: --budget-s reached before building it"))
            continue
        t0 = time.perf_counter()
        path = build_model(shape, args.device, args.models_dir)
        res.data["meta"].setdefault("build_seconds", {})[shape] = round(time.perf_counter() - t0, 1)
        vocab = SHAPES[shape]["vocab_size"]
        runs = [(args.seq, batches)] + ([(args.long_seq, [1])] if args.long_seq else [])
        for seq, bs in runs:
            for variant in (variants if seq == args.seq else ["baseline", "fast"]):
                data_for = (lambda b, s, seq=seq: random_rows(b * s, [seq], vocab, seed=1))
                res.data["points"] += train_points(variant, path, shape, seq, bs, data_for, args, optim,
                                                   deadline=deadline)
                add_mfu(res.data["points"])
                summarize(res)
                res.write()
    if args.varlen and time.perf_counter() < deadline:
        shape = args.varlen_shape or ("tiny-1b" if args.tiny else "1b")
        path = build_model(shape, args.device, args.models_dir)
        rng = random.Random(3)
        steps = args.warmup + args.steps
        low = min(128, max(1, args.seq // 4))
        lengths = [rng.randint(low, args.seq) for _ in range(args.varlen_batch * steps)]
        data = random_rows(len(lengths), lengths, SHAPES[shape]["vocab_size"], seed=5)
        VARIANTS["fast_padding_free"] = {"padding_free": True}
        for variant in ("baseline", "fast", "fast_padding_free"):
            pts = train_points(variant, path, shape, args.seq, [args.varlen_batch], lambda b, s: data, args, optim,
                               deadline=deadline)
            for p in pts:
                p["data"] = f"lengths uniform {low}..{args.seq}"
            add_mfu(pts)
            res.data["varlen"] += pts
            res.write()
    res.data["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    res.write()
    print(json.dumps({"summary": res.data["summary"], "loss_curves": {k: v for k, v in (res.data["loss_curves"] or {}).items()
                                                                        if k not in ("curves", "levers")}},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

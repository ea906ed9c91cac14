"""Recipe-aware checks for `qlora-doctor check --recipe R` and `run`: does this recipe suit this machine?

Each check is a function `(run, machine) -> Check | None` in `RECIPE_CHECKS`; add one by appending to
that tuple. `run` is the RunPlan (qlora_doctor/runplan.py) the trainer will follow: its precision, levers
and memory plan, decided once, so the doctor judges what training will really do.

A GPU whose compute capability could not be read gives `unknown`, never `pass`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qlora_doctor.doctor.distributed import DISTRIBUTED_CHECKS
from qlora_doctor.core.machine import Gpu, Machine
from qlora_doctor.core.report import Check
from qlora_doctor.recipe.precision import gpu_supports_bf16
from qlora_doctor.recipe.schema import Recipe
from qlora_doctor.runplan import RunPlan, build_run_plan
from qlora_doctor.doctor.memory import memory_fit_check
from qlora_doctor.doctor.performance import performance_check
from qlora_doctor.doctor.sanity import SANITY_CHECKS

if TYPE_CHECKING:
    from qlora_doctor.core.environment import Environment

BF16_SOURCES = (
    "https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#compute-capabilities",
    "https://github.com/pytorch/pytorch/blob/main/torch/cuda/__init__.py",  # is_bf16_supported(including_emulation)
    "https://github.com/huggingface/transformers/blob/main/src/transformers/training_args.py",
)
BF16_ERROR = "Your setup doesn't support bf16/gpu."
"""transformers' TrainingArguments error when torch reports no bf16 support on the GPU."""
FP16_FIX = "training.bf16: false, training.fp16: true"
PAGED_SOURCES = ("https://huggingface.co/docs/bitsandbytes/main/en/optimizers#paged-optimizers",)
BNB_OPTIMIZERS = frozenset({"adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit",
                            "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"})
"""transformers optimizer names backed by bitsandbytes (besides every `paged_*` one)."""
REMOTE_CODE_SOURCES = ("https://huggingface.co/docs/transformers/main/en/models#custom-models",)

RecipeCheck = Callable[["RunPlan", Machine], "Check | None"]


def recipe_checks(run: RunPlan | Recipe, machine: Machine, env: Environment | None = None) -> list[Check]:
    """Every recipe check that applies, in `RECIPE_CHECKS` order, judged on the run plan (a plan is built
    here, offline and without an output folder, when given a bare Recipe)."""
    if isinstance(run, Recipe):
        run = build_run_plan(run, machine, env, where="recipe")
    checks = [check(run, machine) for check in RECIPE_CHECKS]
    return [c for c in checks if c is not None]


def _gpu(machine: Machine) -> Gpu | None:
    return machine.nvidia_gpus[0] if machine.nvidia_gpus else None


def mixed_precision_check(run: RunPlan, machine: Machine) -> Check:
    """training.fp16 / training.bf16 against the GPU (or the lack of one)."""
    recipe, precision = run.recipe, run.precision
    t, gpu = recipe.training, _gpu(machine)
    title = "Mixed precision (training.fp16/bf16)"
    found = f"fp16: {_yaml(t.fp16)}, bf16: {_yaml(t.bf16)}"
    mode = "bf16" if precision.bf16 else "fp16" if precision.fp16 else "float32"
    if gpu is None:
        if t.fp16 is True or t.bf16 is True:
            which = "fp16" if t.fp16 is True else "bf16"
            why = ("float16 autocast on a CPU is slow and not supported by every operator"
                   if which == "fp16" else
                   "bf16 on a CPU is only fast on CPUs with AVX512-BF16 or AMX, and slower than float32 elsewhere")
            return Check("recipe.precision", "warn", title,
                         f"training.{which}: true but there is no NVIDIA GPU: {why}",
                         fix=f"set `training.{which}: auto` (float32 on CPU) in the recipe",
                         found=found, expected="auto (float32 on CPU)")
        return Check("recipe.precision", "pass", title, f"no NVIDIA GPU: training runs in {mode} on the CPU",
                     found=found, expected="auto")
    if gpu.compute_capability is None:
        detail = (f"training.bf16: true needs compute capability >= 8.0, and that of {gpu.name} could not be read"
                  if precision.bf16 else
                  f"the compute capability of {gpu.name} could not be read, so {mode} was chosen without knowing "
                  "whether the GPU has bf16 tensor cores (fp16 runs on every NVIDIA GPU)")
        return Check("recipe.precision", "unknown", title, detail,
                     fix="run `nvidia-smi --query-gpu=name,compute_cap --format=csv`, or describe the GPU in a "
                         "`--machine` file with its compute_capability",
                     found=found, expected="bf16 needs compute capability >= 8.0")
    cc = gpu.compute_capability
    if precision.bf16 and not gpu_supports_bf16(cc):
        return Check("recipe.precision", "fail", title,
                     f"training.bf16: true needs a GPU with compute capability >= 8.0 (Ampere or newer); "
                     f"{gpu.name} has {cc}. torch then either emulates bf16 without tensor cores, many times "
                     f"slower than fp16, or transformers stops with \"{BF16_ERROR}\"",
                     fix=f"set `{FP16_FIX}` in the recipe (or both `auto`)",
                     sources=BF16_SOURCES, found=f"bf16 on cc {cc}", expected="fp16 below cc 8.0")
    if precision.fp16 and gpu_supports_bf16(cc) and t.fp16 is True:
        return Check("recipe.precision", "pass", title,
                     f"fp16 on {gpu.name} (cc {cc}) works; bf16 would avoid fp16's overflow and loss scaling",
                     fix="optionally set `training.fp16: false, training.bf16: true` (or both `auto`)",
                     found=found, expected="bf16 on cc >= 8.0")
    chosen = " (chosen by auto)" if (t.bf16 == "auto" and t.fp16 == "auto") else ""
    return Check("recipe.precision", "pass", title, f"{mode} on {gpu.name} (cc {cc}){chosen}",
                 found=found, expected=mode)


def compute_dtype_check(run: RunPlan, machine: Machine) -> Check | None:
    """quantization.bnb_4bit_compute_dtype against the GPU and the training precision."""
    recipe, precision = run.recipe, run.precision
    q, gpu = recipe.quantization, _gpu(machine)
    if not q.load_in_4bit:
        return None
    title = "4-bit compute dtype (quantization.bnb_4bit_compute_dtype)"
    dtype = precision.compute_dtype
    found = q.bnb_4bit_compute_dtype if q.bnb_4bit_compute_dtype == dtype else f"auto -> {dtype}"
    train_dtype = "bfloat16" if precision.bf16 else "float16" if precision.fp16 else "float32"
    auto_fix = "set `quantization.bnb_4bit_compute_dtype: auto` in the recipe"
    if q.bnb_4bit_compute_dtype == "auto":
        # already auto: it follows training.fp16/bf16, so those are what to change
        which = "bf16" if precision.bf16 else "fp16"
        auto_fix = f"set `training.{which}: auto` in the recipe (the compute dtype follows it)"
    if gpu is None:
        if dtype != "float32":
            return Check("recipe.compute_dtype", "warn", title,
                         f"{dtype} 4-bit matmuls on a CPU are slower than float32 and not supported by every "
                         "kernel", fix=auto_fix, found=found, expected="float32 on CPU")
        return Check("recipe.compute_dtype", "pass", title, "float32 on the CPU", found=found, expected="float32")
    cc = gpu.compute_capability
    if dtype == "bfloat16" and cc is None:
        return Check("recipe.compute_dtype", "unknown", title,
                     f"bfloat16 needs compute capability >= 8.0 and that of {gpu.name} could not be read",
                     fix="describe the GPU with its compute_capability in a `--machine` file, or use float16",
                     found=found, expected="bfloat16 on cc >= 8.0, else float16")
    if dtype == "bfloat16" and not gpu_supports_bf16(cc):
        return Check("recipe.compute_dtype", "warn", title,
                     f"bfloat16 compute on {gpu.name} (cc {cc}) has no tensor-core support, so every 4-bit "
                     "matmul runs emulated and slow", fix="set `quantization.bnb_4bit_compute_dtype: float16` "
                     "(or auto) in the recipe", sources=BF16_SOURCES, found=found, expected="float16 below cc 8.0")
    if dtype == "float32":
        return Check("recipe.compute_dtype", "warn", title,
                     f"float32 compute on {gpu.name} makes every 4-bit matmul dequantize to float32: slower "
                     "and more activation memory than 16-bit", fix=auto_fix, found=found,
                     expected="bfloat16 or float16")
    if train_dtype != "float32" and dtype != train_dtype:
        return Check("recipe.compute_dtype", "warn", title,
                     f"the 4-bit layers compute in {dtype} while training autocasts to {train_dtype}: every layer "
                     "converts between the two, and float16 can overflow where bfloat16 would not",
                     fix=auto_fix, found=found, expected=train_dtype)
    return Check("recipe.compute_dtype", "pass", title, f"{dtype} on {gpu.name}" + (f" (cc {cc})" if cc else ""),
                 found=found, expected=dtype)


def trust_remote_code_check(run: RunPlan, machine: Machine) -> Check:
    """model.trust_remote_code: true runs the model repo's Python code."""
    recipe = run.recipe
    m = recipe.model
    title = "Remote code (model.trust_remote_code)"
    if not m.trust_remote_code:
        return Check("recipe.trust_remote_code", "pass", title, "no code from the model repo is run",
                     found="false", expected="false")
    pinned = (f"pinned to revision {m.revision!r}" if m.revision
              else "not pinned: whatever the repo holds at download time runs")
    return Check("recipe.trust_remote_code", "warn", title,
                 f"loading runs the Python files (modeling/tokenizer code) that come with {m.name_or_path} "
                 f"with your permissions; {pinned}",
                 fix="read that code and pin `model.revision` to the reviewed commit, or set "
                     "`model.trust_remote_code: false` if your transformers supports the architecture itself",
                 sources=REMOTE_CODE_SOURCES, found="true", expected="false, or a pinned revision")


def optimizer_device_check(run: RunPlan, machine: Machine) -> Check | None:
    """Paged and bitsandbytes 8-bit optimizers without CUDA."""
    recipe, precision = run.recipe, run.precision
    optim = recipe.training.optim
    if precision.device == "cuda" or not (optim.startswith("paged_") or optim in BNB_OPTIMIZERS):
        return None
    detail = (f"training.optim: {optim} keeps optimizer state in CUDA unified memory, which needs an NVIDIA GPU"
              if optim.startswith("paged_") else
              f"training.optim: {optim} is a bitsandbytes optimizer made for CUDA; without an NVIDIA GPU it "
              "is slow or unsupported, depending on the bitsandbytes build")
    return Check("recipe.optimizer", "fail" if optim.startswith("paged_") else "warn",
                 "Optimizer vs device (training.optim)", detail,
                 fix="set `training.optim: adamw_torch` in the recipe for CPU training",
                 sources=PAGED_SOURCES, found=optim, expected="adamw_torch on CPU")


def preflight_check(run: RunPlan, machine: Machine) -> Check:
    """The data's fields and the logging integrations, as `run` checks them before loading (offline here:
    a hub model's reachability is left to `run`)."""
    from qlora_doctor.recipe.preflight import preflight_problems

    problems = preflight_problems(run.recipe, run.where)
    title = "Data fields and integrations"
    if not problems:
        targets = run.recipe.training.report_targets
        logging = (f"report_to {', '.join(targets)}: installed" if targets else "report_to: none (no logging integration)")
        return Check("recipe.preflight", "pass", title, "the data's first rows have the fields the recipe names; "
                     + logging)
    return Check("recipe.preflight", "fail", title, "; ".join(problems),
                 fix=problems[0].split("; ", 1)[-1] if "; " in problems[0] else "",
                 found=f"{len(problems)} problem(s)", expected="none")


RECIPE_CHECKS: tuple[RecipeCheck, ...] = (
    preflight_check,
    mixed_precision_check,
    compute_dtype_check,
    trust_remote_code_check,
    optimizer_device_check,
    memory_fit_check,
    performance_check,
    *DISTRIBUTED_CHECKS,  # distributed.strategy ddp/fsdp only (qlora_doctor/doctor/distributed.py)
    *SANITY_CHECKS,  # one per recipe rule that fires (knowledge/data/recipe_rules.toml, doctor/sanity.py)
)
"""Run in this order. Append new checks (e.g. memory fit) here."""


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)

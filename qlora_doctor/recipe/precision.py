"""A recipe's `auto` precision decided for one machine: fp16/bf16 and the 4-bit compute dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.schema import Recipe


@dataclass(frozen=True)
class Precision:
    """The dtypes a recipe trains in on one machine, with every `auto` decided."""

    device: Literal["cuda", "cpu"]
    """Where training runs: `cuda` with an NVIDIA GPU, else `cpu`."""
    fp16: bool
    """TrainingArguments.fp16."""
    bf16: bool
    """TrainingArguments.bf16."""
    compute_dtype: Literal["bfloat16", "float16", "float32"]
    """BitsAndBytesConfig.bnb_4bit_compute_dtype (also the dtype for the model's unquantized weights)."""
    compute_capability: str | None
    """The GPU's compute capability the choice was based on; None on CPU or when unknown."""
    reason: str
    """One line saying why, e.g. `NVIDIA A100-SXM4-80GB has compute capability 8.0 (>= 8.0): bf16`."""


def gpu_supports_bf16(compute_capability: str) -> bool:
    """bf16 tensor-core math needs Ampere (compute capability 8.0) or newer."""
    major = int(compute_capability.split(".")[0])
    return major >= 8


def resolve_precision(recipe: Recipe, machine: Machine) -> Precision:
    """Decide `fp16`/`bf16`/`bnb_4bit_compute_dtype: auto` for `machine` (its first NVIDIA GPU).

    Explicit values are kept as written (the doctor's recipe checks judge them); `auto` picks bf16 on
    compute capability >= 8.0, fp16 on older or unknown NVIDIA GPUs (fp16 runs on all of them), and
    float32 without an NVIDIA GPU.
    """
    training, gpus = recipe.training, machine.nvidia_gpus
    cc = gpus[0].compute_capability if gpus else None
    if not gpus:
        device: Literal["cuda", "cpu"] = "cpu"
        preferred = "float32"
        reason = "no NVIDIA GPU: float32 on CPU"
    elif cc is None:
        device, preferred = "cuda", "float16"
        reason = f"{gpus[0].name}: compute capability unknown, so fp16 (which every NVIDIA GPU runs)"
    else:
        device = "cuda"
        preferred = "bfloat16" if gpu_supports_bf16(cc) else "float16"
        reason = (f"{gpus[0].name} has compute capability {cc} "
                  f"({'>=' if preferred == 'bfloat16' else '<'} 8.0): {'bf16' if preferred == 'bfloat16' else 'fp16'}")
    bf16 = training.bf16 if training.bf16 != "auto" else (training.fp16 is not True and preferred == "bfloat16")
    fp16 = training.fp16 if training.fp16 != "auto" else (not bf16 and preferred == "float16")
    if training.bf16 != "auto" or training.fp16 != "auto":
        reason += f"; recipe sets{' fp16: ' + str(training.fp16).lower() if training.fp16 != 'auto' else ''}" \
                  f"{' bf16: ' + str(training.bf16).lower() if training.bf16 != 'auto' else ''}"
    compute = recipe.quantization.bnb_4bit_compute_dtype
    if compute == "auto":
        compute = "bfloat16" if bf16 else "float16" if fp16 else preferred
    return Precision(device=device, fp16=bool(fp16), bf16=bool(bf16), compute_dtype=compute,
                     compute_capability=cc, reason=reason)

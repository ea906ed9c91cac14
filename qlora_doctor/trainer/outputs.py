"""What a run leaves in `training.output_dir`, and the rules for reusing that folder.

    adapter_model.safetensors, adapter_config.json   the LoRA adapter (`PeftModel.from_pretrained(base, dir)`)
    tokenizer.json, tokenizer_config.json, ...       the tokenizer the run used
    recipe.yaml                                      the recipe as run, every `auto` resolved
    doctor-report.json                               the checks the run was gated on
    requirements.lock.txt                            the exact installed packages (pip format)
    manifest.json                                    tool version, command, times, machine, status
    metrics.json                                     losses, eval loss before/after, throughput, memory
    loss.png                                         the training and eval loss curves
    checkpoint-N/                                    the Trainer's checkpoints (for --resume)

A folder that is not empty is never reused silently: `--resume` continues from its last complete
checkpoint, `--overwrite` replaces it, and only a folder a previous run made (it has manifest.json)
can be replaced.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qlora_doctor.errors import InputError
from qlora_doctor.fileio import write_atomic

MANIFEST = "manifest.json"
METRICS = "metrics.json"
RECIPE = "recipe.yaml"
REPORT = "doctor-report.json"
LOCKFILE = "requirements.lock.txt"
LOSS_PLOT = "loss.png"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class OutputPlan:
    """What to do with the output folder, decided before anything is loaded or deleted."""

    output_dir: Path
    replace_existing: bool
    """--overwrite on a folder with a previous run in it: delete it once the checks pass."""
    resume_from: Path | None
    """The last complete checkpoint to continue from (--resume)."""


def plan_output_dir(output_dir: Path, resume: bool, overwrite: bool, where: str) -> OutputPlan:
    """Check the output folder against --resume/--overwrite. Raises InputError (exit 2) when it is
    not empty and neither was given, when there is nothing to resume, or when it cannot be replaced."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: choose one (resume continues the run in the output "
                         "folder, overwrite deletes it)")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{where}: training.output_dir: {output_dir} is a file, not a folder; "
                         "choose another training.output_dir")
    empty = not output_dir.exists() or not any(output_dir.iterdir())
    if resume:
        checkpoint = None if empty else last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise InputError(f"{where}: training.output_dir: {output_dir} has no complete checkpoint "
                             f"(a checkpoint-N folder with {TRAINER_STATE}) to resume from; run without "
                             "--resume to start afresh" + ("" if empty else " (with --overwrite to replace it)"))
        return OutputPlan(output_dir, replace_existing=False, resume_from=checkpoint)
    if empty:
        return OutputPlan(output_dir, replace_existing=False, resume_from=None)
    if not overwrite:
        raise InputError(f"{where}: training.output_dir: {output_dir} is not empty; pass --resume to continue "
                         "its run from the last complete checkpoint, --overwrite to replace it, or choose "
                         "another training.output_dir")
    _refuse_unsafe_delete(output_dir, where)
    return OutputPlan(output_dir, replace_existing=True, resume_from=None)


def _refuse_unsafe_delete(output_dir: Path, where: str) -> None:
    resolved = output_dir.resolve()
    if resolved in (Path.cwd().resolve(), Path.home().resolve()) or resolved == Path(resolved.anchor):
        raise InputError(f"{where}: training.output_dir: {output_dir} is the current, home or root folder; "
                         "--overwrite will not delete it; choose a folder of its own")
    if not (output_dir / MANIFEST).is_file():
        raise InputError(f"{where}: training.output_dir: {output_dir} has files but no {MANIFEST}, so no "
                         "qlora-doctor run made it; --overwrite only replaces a previous run's folder: "
                         "delete it yourself or choose another training.output_dir")


def clear_output_dir(output_dir: Path) -> None:
    shutil.rmtree(output_dir)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The highest checkpoint-N whose trainer_state.json exists and parses. The Trainer writes that
    file last, so a checkpoint without it was cut off while saving and is skipped."""
    found: list[tuple[int, Path]] = []
    for child in Path(output_dir).iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, checkpoint in sorted(found, reverse=True):
        try:
            json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return checkpoint
    return None


def save_dir_atomic(output_dir: Path, save: Callable[[Path], None]) -> list[Path]:
    """Let `save(tmp)` write files into a temporary folder inside `output_dir`, then move each into
    `output_dir` with a rename, so a reader never sees half a file. Returns the moved files."""
    output_dir.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    with tempfile.TemporaryDirectory(prefix=".saving-", dir=output_dir) as tmp:
        save(Path(tmp))
        for item in sorted(Path(tmp).iterdir()):
            target = output_dir / item.name
            if item.is_dir():
                if target.exists():
                    shutil.rmtree(target)
            os.replace(item, target)
            moved.append(target)
    return moved


def adapter_tensors(full_state_dict: dict[str, Any], adapter_name: str) -> dict[str, Any]:
    """The LoRA adapter's tensors from a model's full state dict, keyed as peft's adapter_model.safetensors
    keys them (the adapter name dropped: `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`).

    For FSDP runs: peft's own save_pretrained(state_dict=...) picks the adapter's keys by walking the model's
    modules, whose names under FSDP still contain the nested `_fsdp_wrapped_module.` of every wrapped layer
    (peft strips only a leading one), so it matches none of the gathered keys and writes an EMPTY adapter
    without a word: what the first 2 x H100 FSDP-QLoRA run saved (peft 0.21.0)."""
    marker = f".{adapter_name}."
    return {key.replace(marker, ".", 1): tensor.detach().contiguous()
            for key, tensor in full_state_dict.items() if ".lora_" in key and marker in key}


def save_adapter_from_state_dict(model: Any, full_state_dict: dict[str, Any], folder: Path) -> int:
    """Write `model`'s (a PeftModel) adapter as PeftModel.save_pretrained does, from a gathered full state dict;
    returns the number of tensors. Refuses to write an empty adapter."""
    import copy

    from safetensors.torch import save_file

    name = model.active_adapter
    tensors = adapter_tensors(full_state_dict, name)
    if not tensors:
        raise RuntimeError(f"no LoRA tensors of adapter {name!r} in the gathered state dict "
                           f"({len(full_state_dict)} keys, e.g. {next(iter(full_state_dict), None)!r})")
    save_file(tensors, str(folder / ADAPTER_FILES[0]), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True  # as peft saves it
    config.save_pretrained(str(folder))
    return len(tensors)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


# --- requirements.lock.txt ------------------------------------------------------------------------

def installed_pins() -> list[str]:
    """Every installed distribution as `name==version`, sorted by normalized name, one per name."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if not name or not dist.version:
            continue
        pins.setdefault(canonicalize_name(name), f"{canonicalize_name(name)}=={dist.version}")
    return [pins[k] for k in sorted(pins)]


def lockfile_text(tool_version: str, command: str) -> str:
    header = [
        f"# The exact packages installed when this run trained (qlora-doctor {tool_version}).",
        f"# Python {platform.python_version()} on {sys.platform} {platform.machine()}; read with importlib.metadata.",
        f"# Made by: {command}",
        "# Reinstall with: pip install -r requirements.lock.txt  (torch from its own index: https://pytorch.org/get-started/locally/)",
    ]
    return "\n".join(header + installed_pins()) + "\n"


# --- loss.png -------------------------------------------------------------------------------------

def plot_losses(path: Path, train: list[dict[str, Any]], evals: list[dict[str, Any]],
                eval_before: float | None, eval_after: float | None, title: str) -> None:
    """Training loss per logging step, eval loss points, written atomically as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", marker=".")
    points = [(0, eval_before)] if eval_before is not None else []
    points += [(r["step"], r["eval_loss"]) for r in evals]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], label="eval loss", marker="o")
    if eval_after is not None:
        ax.axhline(eval_after, linestyle="--", color="gray", label=f"final eval loss {eval_after:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())

"""Writing a run's output folder (the layout and the reuse rules are qlora_doctor/core/rundir.py)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from qlora_doctor.core.fileio import apply_umask_modes, write_atomic
from qlora_doctor.core.rundir import (ADAPTER_FILES, LOCKFILE, LOSS_PLOT, MANIFEST, METRICS, RECIPE, REPORT,  # noqa: F401
                                      TRAINER_STATE, OutputPlan, last_complete_checkpoint, plan_output_dir)


def clear_output_dir(output_dir: Path) -> None:
    shutil.rmtree(output_dir)


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
            apply_umask_modes(item)
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


MODEL_CARD = "README.md"


def make_adapter_portable(folder: Path, recipe: Any) -> None:
    """adapter_config.json names a base model any machine can load: a builtin model's Hugging Face id
    (peft wrote this machine's cache path), and the recipe's revision."""
    from qlora_doctor.recipe.builtin import builtin_model, is_builtin

    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    name = recipe.model.name_or_path
    config["base_model_name_or_path"] = builtin_model(name).upstream if is_builtin(name) else name
    if recipe.model.revision:
        config["revision"] = recipe.model.revision
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def model_card(recipe: Any, metrics: dict[str, Any], manifest: dict[str, Any], tool_version: str) -> str:
    """README.md of the output folder: what was trained on what, how, and how well (Hugging Face model-card
    front matter, so `push` can upload it as is)."""
    from qlora_doctor.recipe.builtin import builtin_model, is_builtin

    name = recipe.model.name_or_path
    base = builtin_model(name).upstream if is_builtin(name) else name
    data = ", ".join(f"`{Path(d.path).name if not d.is_hub else d.path}` ({d.format} format"
                     + (f", weight {d.weight:g}" if d.weight != 1 else "") + ")" for d in recipe.data_sections)
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    losses = (f"- eval loss: {before:.4f} before training, {after:.4f} after\n"
              if before is not None and after is not None else "")
    tokens = metrics.get("train_tokens_per_second")
    return (
        "---\n"
        f"base_model: {base}\n"
        "library_name: peft\n"
        "tags: [qlora, lora, qlora-doctor]\n"
        "---\n\n"
        f"# LoRA adapter for {base}\n\n"
        f"Trained with QLoRA (4-bit {recipe.quantization.bnb_4bit_quant_type} base, LoRA r={recipe.lora.r}, "
        f"alpha={recipe.lora.lora_alpha}, dropout={recipe.lora.lora_dropout}) by qlora-doctor {tool_version}.\n\n"
        "## Training\n\n"
        f"- data: {data}, "
        f"{metrics.get('train_rows', '?')} training rows, {metrics.get('eval_rows', 0)} eval rows\n"
        f"- {metrics.get('steps', '?')} optimizer steps, effective batch {metrics.get('effective_batch_size', '?')}, "
        f"learning rate {recipe.training.learning_rate}, max sequence length {recipe.training.max_seq_length}\n"
        f"{losses}"
        + (f"- throughput: {tokens:,.0f} tokens/s\n" if tokens else "")
        + f"- precision: {manifest.get('precision', {}).get('reason', '')}\n"
        f"- status: {manifest.get('status')}, command: `{manifest.get('command')}`\n\n"
        "## Use\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
        "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n"
        "```\n\n"
        "`recipe.yaml` is the recipe as run; `requirements.lock.txt` the exact packages; `metrics.json` the loss "
        "history; `doctor-report.json` the environment checks it ran after.\n"
    )

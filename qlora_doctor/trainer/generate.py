"""`qlora-doctor generate` and `qlora-doctor merge`: use the adapter a run wrote.

Both read the run's own `recipe.yaml` (the recipe as run, every `auto` resolved) to find the base
model and its quantization, so they need nothing but the output folder. Precision is resolved again
for this machine: an adapter trained on a GPU can be tried on a laptop's CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_doctor.core.errors import InputError
from qlora_doctor.trainer import outputs

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe


@dataclass(frozen=True)
class Generation:
    """One prompt answered by the tuned model (and by the base model with --compare)."""

    prompt: str
    answer: str
    """With the adapter applied."""
    base_answer: str | None
    """The base model alone (same weights, adapter disabled); None without --compare."""
    max_new_tokens: int


@dataclass(frozen=True)
class MergeResult:
    """A merged, plain checkpoint: base + adapter folded into the weights."""

    path: Path
    base_model: str
    dtype: str
    """The dtype the merged weights were saved in."""


def load_run(output_dir: Path) -> Recipe:
    """The recipe a finished run wrote, after checking that the folder holds an adapter."""
    from qlora_doctor.recipe.schema import load_recipe

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError(f"{output_dir}: no such output folder; give the training.output_dir of a run "
                         "(`qlora-doctor run RECIPE` makes one)")
    missing = [name for name in (*outputs.ADAPTER_FILES, outputs.RECIPE) if not (output_dir / name).is_file()]
    if missing:
        hint = (" (it has checkpoints: the run did not finish; continue it with `qlora-doctor run RECIPE --resume`)"
                if outputs.last_complete_checkpoint(output_dir) else "")
        raise InputError(f"{output_dir}: not a finished run's folder: {', '.join(missing)} missing{hint}")
    return load_recipe(output_dir / outputs.RECIPE)


def _precision_here(recipe: Recipe, machine: Machine) -> Precision:
    """Precision for this machine, ignoring the fp16/bf16 the run resolved for the machine it ran on."""
    from qlora_doctor.recipe.precision import resolve_precision

    data = recipe.model_copy(update={
        "training": recipe.training.model_copy(update={"fp16": "auto", "bf16": "auto"}),
        "quantization": recipe.quantization.model_copy(update={"bnb_4bit_compute_dtype": "auto"}),
    })
    return resolve_precision(data, machine)


def generate(output_dir: Path, prompt: str, machine: Machine, *, compare: bool = False,
             max_new_tokens: int = 128) -> Generation:
    """Answer `prompt` (as a user chat message, with the model's chat template) greedily with the
    adapter; with `compare`, also with the adapter disabled. The base is loaded as in training (4-bit)."""
    import torch
    from peft import PeftModel

    from qlora_doctor.trainer.builtin import resolve_model_path
    from qlora_doctor.trainer.model import load_base, load_tokenizer

    if not prompt.strip():
        raise InputError("--prompt: is empty; ask something, e.g. --prompt \"What is LoRA?\"")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    output_dir = Path(output_dir)
    recipe = load_run(output_dir)
    precision = _precision_here(recipe, machine)
    tokenizer = load_tokenizer(str(output_dir))
    base = load_base(recipe, precision, resolve_model_path(recipe.model.name_or_path), quantized=True)
    model = PeftModel.from_pretrained(base, str(output_dir))
    model.eval()
    inputs = _chat_inputs(tokenizer, prompt, output_dir).to(model.device)
    torch.manual_seed(0)
    answer = _greedy(model, tokenizer, inputs, max_new_tokens)
    base_answer = None
    if compare:
        with model.disable_adapter():
            base_answer = _greedy(model, tokenizer, inputs, max_new_tokens)
    return Generation(prompt=prompt, answer=answer, base_answer=base_answer, max_new_tokens=max_new_tokens)


def _chat_inputs(tokenizer: Any, prompt: str, output_dir: Path) -> Any:
    if not tokenizer.chat_template:
        raise InputError(f"{output_dir}: the tokenizer has no chat template, so a prompt cannot be put in "
                         "the format the model was tuned on; train from a chat (instruct) model")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)


def _greedy(model: Any, tokenizer: Any, inputs: Any, max_new_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id)
    new_tokens = out[0][inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def merge(output_dir: Path, to: Path, machine: Machine) -> MergeResult:
    """Reload the base unquantized (16-bit on a GPU, float32 on the CPU), fold the adapter into its
    weights (`merge_and_unload`) and save a plain checkpoint plus the tokenizer to `to`.

    Merging into 4-bit weights would round the update away, hence the 16/32-bit base."""
    from peft import PeftModel

    from qlora_doctor.trainer.builtin import resolve_model_path
    from qlora_doctor.trainer.model import load_base, load_tokenizer

    output_dir, to = Path(output_dir), Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise InputError(f"--to: {to} exists and is not an empty folder; choose a new folder")
    recipe = load_run(output_dir)
    precision = _precision_here(recipe, machine)
    tokenizer = load_tokenizer(str(output_dir))
    base = load_base(recipe, precision, resolve_model_path(recipe.model.name_or_path), quantized=False)
    merged = PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()

    def save(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _save_new_dir(to, save)
    return MergeResult(path=to, base_model=recipe.model.name_or_path, dtype=precision.compute_dtype)


def _save_new_dir(target: Path, save: Any) -> None:
    """Write a whole folder under a temporary name beside `target`, then rename it into place."""
    import os
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        if target.exists():
            target.rmdir()  # checked empty above
        from qlora_doctor.core.fileio import apply_umask_modes

        apply_umask_modes(tmp)  # mkdtemp made it 0700
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""What `qlora-doctor init` decides: a starter recipe for a model, a data file and a machine, every value
with its reason. The data's format comes from its first rows (recipe/dataformat.py), its length in tokens
from the model's tokenizer when it is on this machine, the batch and sequence length from the memory
planner (memory/fit.py) for the machine's smallest GPU, the optimizer and precision from the device.
The text is rendered by recipe/starter.py and validated here with the recipe loader before it is returned.

Defaults that are not measured come from the QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314, section 4
and appendix B: LoRA on every linear layer, r 16-64, learning rate 2e-4 for 7B-13B models, nf4 with double
quantization, paged AdamW) and the peers' QLoRA examples (axolotl examples/*/qlora.yml, LLaMA-Factory
examples/train_qlora/*.yaml: cosine schedule, warmup 3-10%).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_doctor.core.errors import InputError
from qlora_doctor.memory.fit import Fit, fit_training
from qlora_doctor.memory.plan import AUTO_CHECKPOINT_SHARE, SEQ_STEP, plan_recipe
from qlora_doctor.recipe.builtin import BUILTIN_PREFIX, is_builtin
from qlora_doctor.recipe.dataformat import DetectedFormat, Sample, detect_format, row_text, sample_rows
from qlora_doctor.recipe.starter import Block, Entry, blocks_as_dict, render_starter

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.schema import Recipe

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
EFFECTIVE_BATCH = 16
"""Examples per optimizer step (micro-batch x gradient accumulation): the QLoRA paper's batch size 16."""
MAX_STARTER_SEQ = 2048
"""The longest max_seq_length a starter recipe picks from the data; longer data gets truncated."""
UNMEASURED_SEQ = 1024
"""max_seq_length when the data's length in tokens cannot be measured (no tokenizer on this machine)."""
TEMPLATE_MARGIN_TOKENS = 32
"""Added to the longest measured text: the chat template's role markers and the end-of-turn tokens."""
CHECKPOINTS_PER_RUN = 5
"""save_steps (and eval_steps) make about this many checkpoints and evaluations over the run."""
SMALL_DATA_ROWS = 1000
"""Below this many training rows a starter trains 3 epochs (LLaMA-Factory's examples), else 1."""


@dataclass(frozen=True)
class Starter:
    """A starter recipe and what it was made from."""

    text: str
    """The commented YAML, as printed or written."""
    recipe: Recipe
    """`text` loaded back and validated."""
    detected: DetectedFormat
    fit: Fit
    warnings: tuple[str, ...]
    """What the user should know before running it (e.g. the planner predicts it does not fit)."""


def starter_recipe(machine: Machine, model: str | None = None, data: Path | None = None,
                   recipe_file: Path | None = None, allow_network: bool = True) -> Starter:
    """The starter recipe for `model` (default the builtin model) trained on `data` (default the demo data) on
    `machine`. Paths in it are written relative to `recipe_file`'s folder when it is given (the file `init -o`
    writes), else absolute, so the text validates wherever it is saved."""
    from qlora_doctor.core.shipped import shipped_path
    from qlora_doctor.recipe.precision import resolve_precision
    from qlora_doctor.recipe.schema import recipe_from_dict

    model = model or DEFAULT_MODEL
    data = Path(data) if data is not None else shipped_path("recipes") / "data" / "demo" / "train.jsonl"
    sample = sample_rows(data)
    detected = detect_format(sample.rows, str(data))
    base_dir = (recipe_file.resolve().parent if recipe_file is not None else Path.cwd())
    data_value = _path_for(data, recipe_file)
    model_value = model if is_builtin(model) or not Path(model).expanduser().exists() else _path_for(Path(model), recipe_file)

    gpu = machine.nvidia_gpus[0] if machine.nvidia_gpus else None
    lengths = _token_lengths(model, [row_text(r, detected.fields) for r in sample.rows])
    wanted_seq, seq_reason = _wanted_seq(lengths, model, len(sample.rows))
    eval_split = 0.1 if (sample.total_rows or len(sample.rows)) >= 50 else 0.0
    train_rows = math.ceil((sample.total_rows or len(sample.rows)) * (1 - eval_split))
    epochs = 3 if train_rows < SMALL_DATA_ROWS else 1

    blocks = _blocks(model_value, data_value, detected, sample, eval_split, epochs, gpu is not None,
                     micro=EFFECTIVE_BATCH if gpu else 4, accum=1 if gpu else EFFECTIVE_BATCH // 4, seq=wanted_seq,
                     output_dir=_output_dir(model, data))
    draft = recipe_from_dict(blocks_as_dict(blocks), where="init", base_dir=base_dir)
    fit = fit_training(draft, machine, EFFECTIVE_BATCH, allow_network=allow_network) if gpu else None
    precision = resolve_precision(draft, machine)
    if fit is None:
        t = draft.training
        fit = Fit(micro_batch=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
                  seq_len=t.max_seq_length, plan=plan_recipe(draft, machine, allow_network=allow_network),
                  budget_bytes=None, fits=None, shortened=False)
    steps = math.ceil(train_rows / EFFECTIVE_BATCH) * epochs
    save_steps = max(1, min(500, math.ceil(steps / CHECKPOINTS_PER_RUN)))
    blocks = _blocks(model_value, data_value, detected, sample, eval_split, epochs, gpu is not None,
                     micro=fit.micro_batch, accum=fit.grad_accum, seq=fit.seq_len, output_dir=_output_dir(model, data),
                     save_steps=save_steps, steps=steps, train_rows=train_rows,
                     reasons=_fit_reasons(fit, machine, seq_reason), precision_reason=precision.reason)
    warnings = []
    if fit.fits is False:
        warnings.append(f"the planner predicts {fit.plan.total_bytes / 2**30:.1f} GiB even at micro-batch "
                        f"{fit.micro_batch} and max_seq_length {fit.seq_len}, more than {fit.plan.gpu_name}'s "
                        f"{(fit.plan.gpu_bytes or 0) / 2**30:.1f} GiB: use a GPU with more memory or a smaller model "
                        "(`qlora-doctor plan` on the written recipe shows the breakdown)")
    header = _header(model, data, detected, machine, warnings, recipe_file)
    text = render_starter(header, blocks)
    import yaml

    recipe = recipe_from_dict(yaml.safe_load(text), where="init", base_dir=base_dir)  # validates as written
    return Starter(text=text, recipe=recipe, detected=detected, fit=fit, warnings=tuple(warnings))


def _path_for(path: Path, recipe_file: Path | None) -> str:
    """`path` as the recipe should name it: relative to the recipe file's folder, else absolute."""
    absolute = path.expanduser().resolve()
    if recipe_file is None:
        return str(absolute)
    try:
        return os.path.relpath(absolute, recipe_file.resolve().parent)
    except ValueError:  # another drive on Windows
        return str(absolute)


def _output_dir(model: str, data: Path) -> str:
    name = model[len(BUILTIN_PREFIX):] if is_builtin(model) else Path(model.rstrip("/")).name
    return f"runs/{name.lower()}-{data.stem.lower()}"


def _token_lengths(model: str, texts: list[str]) -> list[int] | None:
    """Tokens of each text with the model's own tokenizer, when it is on this machine (a converted builtin
    model, a local folder, or the Hugging Face cache); None when it is not (nothing is downloaded)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    if is_builtin(model):
        from qlora_doctor.recipe.builtin import converted_dir

        folder = converted_dir(model)
        if not (folder / "tokenizer.json").is_file():
            return None
        source, local_only = str(folder), True
    else:
        source, local_only = model, True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except Exception:  # noqa: BLE001 - not cached, gated, or no tokenizer: the length is then estimated
        return None
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def _wanted_seq(lengths: list[int] | None, model: str, rows: int) -> tuple[int, str]:
    """The max_seq_length the data asks for, and why."""
    if lengths is None:
        return UNMEASURED_SEQ, (f"{UNMEASURED_SEQ}: the data's length in tokens was not measured (the tokenizer of "
                                f"{model} is not on this machine)")
    longest = max(lengths)
    needed = longest + TEMPLATE_MARGIN_TOKENS
    seq = min(MAX_STARTER_SEQ, max(SEQ_STEP, math.ceil(needed / SEQ_STEP) * SEQ_STEP))
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    cut = "" if needed <= seq else f", so longer examples are cut (the cap for a starter is {MAX_STARTER_SEQ})"
    return seq, (f"the longest of the first {rows} rows is {longest} tokens (95% <= {p95}), measured with the "
                 f"model's tokenizer, + {TEMPLATE_MARGIN_TOKENS} for the chat template, rounded up to a multiple "
                 f"of {SEQ_STEP}{cut}")


def _fit_reasons(fit: Fit, machine: Machine, seq_reason: str) -> dict[str, str]:
    plan = fit.plan
    if fit.budget_bytes is None:
        gpu = "no NVIDIA GPU" if not machine.nvidia_gpus else f"{plan.gpu_name}'s memory is unknown"
        return {"batch": f"{gpu}: nothing to plan against; {EFFECTIVE_BATCH} examples per step",
                "seq": seq_reason}
    predicted = (f"planner: {plan.total_bytes / 2**30:.1f} GiB of {plan.gpu_name}'s {(plan.gpu_bytes or 0) / 2**30:.1f}"
                 f" GiB (limit {AUTO_CHECKPOINT_SHARE:.0%})")
    batch = (f"the largest of 16/8/4/2/1 that fits; {predicted}" if fit.fits else
             f"even this does not fit: {predicted}")
    seq = seq_reason if not fit.shortened else f"shortened to fit the GPU; the data asks for more ({seq_reason})"
    return {"batch": batch, "seq": seq}


def _blocks(model: str, data: str, detected: DetectedFormat, sample: Sample, eval_split: float, epochs: int,
            cuda: bool, micro: int, accum: int, seq: int, output_dir: str, save_steps: int = 50,
            steps: int | None = None, train_rows: int | None = None, reasons: dict[str, str] | None = None,
            precision_reason: str = "") -> list[Block]:
    reasons = reasons or {}
    rows = (f"{sample.total_rows} rows" if sample.total_rows is not None else "rows not counted (a large file)")
    field_entries = tuple(Entry(key, column, "column of the data file") for key, column in detected.fields)
    if detected.roles:
        field_entries += (Entry("roles", {role: list(names) for role, names in detected.roles},
                                "the file's speakers mapped to roles (qlora_doctor/recipe/dataformats.toml)"),)
    eval_reason = ("hold out 10% of the rows to measure the eval loss" if eval_split else
                   "under 50 rows: all of them train (set eval_path to a held-out file to measure)")
    steps_text = (f"{train_rows} training rows / {EFFECTIVE_BATCH} per step x {epochs} epoch(s) = {steps} steps"
                  if steps is not None else "")
    return [
        Block("model", (
            Entry("name_or_path", model, "builtin:NAME, a local folder or a hub id"),
            Entry("trust_remote_code", False, "true runs Python code from the model repo"),
        )),
        Block("quantization", (
            Entry("load_in_4bit", True, "QLoRA: the base model in 4 bit, frozen"),
            Entry("bnb_4bit_quant_type", "nf4", "NF4 + double quantization: the QLoRA paper's choice"),
            Entry("bnb_4bit_use_double_quant", True),
            Entry("bnb_4bit_compute_dtype", "auto", f"auto: {precision_reason}" if precision_reason else "auto"),
        )),
        Block("lora", (
            Entry("r", 16, "rank; 16-64 in the QLoRA paper, more for harder tasks"),
            Entry("lora_alpha", 32, "updates scaled by lora_alpha / r = 2"),
            Entry("lora_dropout", 0.05),
            Entry("target_modules", "all-linear", "every linear layer: the QLoRA paper's finding"),
        )),
        Block("dataset", (
            Entry("path", data, f"{rows}; relative paths are relative to this file's folder"),
            Entry("format", detected.format, f"detected: {detected.reason}"),
            *field_entries,
            Entry("eval_split", eval_split, eval_reason),
            Entry("train_on_inputs", False, "learn the answers, not the prompts"),
        ), comment=(f"Detected from the first {len(sample.rows)} of its rows (columns: {', '.join(detected.columns)}).",)),
        Block("training", (
            Entry("output_dir", output_dir, "relative to the current directory when you run it"),
            Entry("num_train_epochs", epochs, f"{'small data: 3 passes' if epochs == 3 else 'one pass'}; {steps_text}"
                  if steps_text else "passes over the data"),
            Entry("learning_rate", 2.0e-4, "the QLoRA paper's rate for 7B-13B models; lower it if the loss jumps"),
            Entry("fp16", "auto", "auto: bf16 on compute capability >= 8.0, fp16 below, float32 on CPU"),
            Entry("bf16", "auto"),
            Entry("per_device_train_batch_size", micro, reasons.get("batch", "")),
            Entry("gradient_accumulation_steps", accum, f"{micro} x {accum} = {micro * accum} examples per step"),
            Entry("max_seq_length", seq, reasons.get("seq", "")),
            Entry("gradient_checkpointing", cuda,
                  "performance.checkpoint_layers auto recomputes only as many layers as the GPU needs" if cuda else
                  "CPU: memory is not the limit, recomputing would cost ~25% time"),
            Entry("optim", "paged_adamw_8bit" if cuda else "adamw_torch",
                  "8-bit states that page out on memory spikes (QLoRA paper)" if cuda else
                  "paged and 8-bit optimizers need CUDA"),
            Entry("lr_scheduler_type", "cosine"),
            Entry("warmup_ratio", 0.03),
            Entry("logging_steps", 10 if (steps or 0) >= 100 else 1),
            Entry("eval_strategy", "steps" if eval_split else "no"),
            Entry("save_steps", save_steps, f"about {CHECKPOINTS_PER_RUN} checkpoints (and evaluations) per run"),
            Entry("save_total_limit", 2),
            Entry("seed", 42),
            Entry("report_to", "none", "or a list: [tensorboard, wandb, mlflow, trackio, ...] (installed)"),
        )),
    ]


def _header(model: str, data: Path, detected: DetectedFormat, machine: Machine, warnings: list[str],
            recipe_file: Path | None) -> list[str]:
    gpu = machine.nvidia_gpus[0] if machine.nvidia_gpus else None
    where = "this machine" if machine.source == "probe" else machine.source
    name = recipe_file.name if recipe_file is not None else "RECIPE.yaml"
    hardware = (f"{gpu.name}" + (f" ({gpu.memory_total_mib / 1024:.0f} GiB" if gpu.memory_total_mib else " (memory unknown")
                + (f", compute capability {gpu.compute_capability})" if gpu.compute_capability else ")")
                if gpu else "no NVIDIA GPU (trains on the CPU: fine for small models, slow for large ones)")
    lines = [
        f"Starter recipe written by `qlora-doctor init`: {model} fine-tuned with QLoRA on {data.name}",
        f"({detected.format} data). Fitted to {where}: {hardware}.",
        "Every value is explained on its line; change any of them, then:",
        f"  qlora-doctor validate {name}     # check it",
        f"  qlora-doctor plan {name}         # predicted GPU memory",
        f"  qlora-doctor run {name}          # check the environment, then train",
    ]
    lines += [f"WARNING: {w}" for w in warnings]
    return lines

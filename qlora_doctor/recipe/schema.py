"""A training recipe: one YAML file, validated into typed sections named after the libraries' own
parameters (transformers' `BitsAndBytesConfig` and `TrainingArguments`, peft's `LoraConfig`,
datasets' `load_dataset`), so a reader who knows those libraries can read a recipe.

    recipe = load_recipe("demo")               # recipes/demo.yaml, or any path
    precision = resolve_precision(recipe, machine)   # the `auto`s, decided for one machine
    BitsAndBytesConfig(**recipe.quantization.bnb_kwargs(precision))
    LoraConfig(**recipe.lora.lora_kwargs())
    TrainingArguments(**training_arguments_kwargs(recipe, precision))

Every problem in a recipe is collected and raised at once as one `InputError`, each message naming
the file and the key: `recipes/x.yaml: lora.r: must be > 0, got 0`.

Paths: `dataset.path` and `dataset.eval_path` are relative to the recipe file's folder and come out
of validation absolute; a value that is not a local path but looks like `org/name` is a Hugging Face
hub dataset id and is not checked (validation never needs the network). `training.output_dir` is
relative to the current directory, like every command-line tool's output.

A later section (`performance:`, `distributed:`) is one more `Section` subclass and one more field
on `Recipe` with a default, so that recipes written before it stay valid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from qlora_doctor.core.errors import InputError
from qlora_doctor.core.shipped import shipped_path
from qlora_doctor.recipe.errors import (CROSS_FIELD_MARK, describe_value, did_you_mean, format_validation_errors,
    one_of)
from qlora_doctor.recipe.integrations import NO_REPORTING, report_to_names
from qlora_doctor.recipe.yamlfile import parse_yaml_value, read_recipe_yaml, yaml_problem

if TYPE_CHECKING:
    from qlora_doctor.recipe.precision import Precision

# Upper bounds that no real run reaches: they turn a typo like `r: 160000000` into an error here
# instead of an out-of-memory or an overflow deep inside torch.
_MAX_COUNT = 10**9
_MAX_BATCH = 65536
_MAX_SEQ = 1_048_576

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""Local data files `datasets` can read, by suffix -> the `load_dataset` builder name."""

BUILTIN_PREFIX = "builtin:"
SHAREGPT_ROLES: dict[str, tuple[str, ...]] = {
    "user": ("human", "user"),
    "assistant": ("gpt", "assistant", "model"),
    "system": ("system",),
    "tool": ("observation", "tool", "function_response"),
    "tool_call": ("function_call",),
}
"""ShareGPT speaker names by role (`dataset.roles` replaces a role's list): the names of the original
ShareGPT dumps (human/gpt) and of LLaMA-Factory's `tags` defaults (observation, function_call;
github.com/hiyouga/LLaMA-Factory data/README.md), as axolotl's `roles` maps them
(docs.axolotl.ai/docs/dataset-formats/conversation.html)."""
AutoBool = Union[Literal["auto"], bool]

# transformers 5.x `OptimizerNames` and `SchedulerType` values (checked against 5.24), kept here so
# that validating a recipe does not import transformers. A name missing here fails with the list.
KNOWN_OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
    "apollo_adamw_layerwise", "stable_adamw",
)
KNOWN_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)


class Section(BaseModel):
    """A recipe section: unknown keys are errors, `"16"` is not silently the number 16, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(
        min_length=1,
        description="`builtin:NAME` (a model that ships with qlora-doctor), a local folder "
                    "(relative to the recipe's folder), or a Hugging Face hub id like `org/name`.")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit to load.")
    trust_remote_code: bool = Field(
        default=False, description="Run Python code that comes with the model repo (a security risk).")
    chat_template: str | None = Field(
        default=None, min_length=1, description="Replace the tokenizer's chat template: a name from "
        "qlora_doctor/recipe/chat_templates.toml (chatml, llama-3, alpaca, qwen2.5) or a .jinja file (relative to "
        "the recipe's folder). For base models without one; it is saved with the adapter, so generation uses it too.")

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        from qlora_doctor.recipe.chat_templates import is_template_file, named_templates

        if value is None or value in named_templates():
            return value
        if not is_template_file(value):
            names = list(named_templates())
            raise ValueError(f"unknown chat template {value!r}{did_you_mean(value, names)}; use one of "
                             f"{', '.join(names)}, or a path to a .jinja file")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else _base_dir(info) / path
        if not path.is_file():
            raise ValueError(f"no such file: {path} (relative paths are resolved against the recipe's folder "
                             f"{_base_dir(info)}); fix the path")
        return str(path.resolve())

    @field_validator("name_or_path")
    @classmethod
    def _local_model_exists(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith(BUILTIN_PREFIX):
            from qlora_doctor.recipe.builtin import BUILTIN_MODELS

            if value[len(BUILTIN_PREFIX):] not in BUILTIN_MODELS:
                known = [BUILTIN_PREFIX + name for name in sorted(BUILTIN_MODELS)]
                raise ValueError(f"unknown builtin model {value!r}{did_you_mean(value, known)}; "
                                 f"builtin models: {', '.join(known)}")
            return value
        location = _classify_location(value, _base_dir(info), suffixes=())
        if location.kind == "missing":
            raise ValueError(f"no model folder at {location.path} (relative paths are resolved against "
                             f"the recipe's folder {_base_dir(info)}); fix the path, or use a hub id "
                             "like `HuggingFaceTB/SmolLM2-135M-Instruct`")
        return location.path if location.kind == "local" else value


class QuantizationSection(Section):
    load_in_4bit: bool = Field(default=True, description="Quantize the base model to 4 bit (QLoRA); "
                               "false trains LoRA on an unquantized model.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: bfloat16 on GPUs with compute capability >= 8.0, float16 on "
                                    "older GPUs, float32 on CPU.")
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = None

    def bnb_kwargs(self, precision: Precision) -> dict[str, Any]:
        """Keyword arguments for `transformers.BitsAndBytesConfig` (dtype names as strings, which it accepts)."""
        kwargs: dict[str, Any] = {
            "load_in_4bit": self.load_in_4bit,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": precision.compute_dtype,
        }
        if self.bnb_4bit_quant_storage is not None:
            kwargs["bnb_4bit_quant_storage"] = self.bnb_4bit_quant_storage
        return kwargs


class LoraSection(Section):
    r: int = Field(default=16, gt=0, le=4096, description="LoRA rank.")
    lora_alpha: float = Field(default=32, gt=0, le=1e6, description="Scaling: updates are multiplied by lora_alpha / r.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="`all-linear` (every linear layer but the output head), a list of module names "
                    "like [q_proj, v_proj], or a regex matched against full module names.")
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
            raise ValueError("is empty; use `all-linear` or a list like [q_proj, k_proj, v_proj, o_proj]")
        if isinstance(value, list) and any(not m.strip() for m in value):
            raise ValueError("has an empty module name")
        return value

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `peft.LoraConfig`."""
        return self.model_dump()


def sharegpt_role_names(roles: dict[str, list[str]] | None) -> dict[str, tuple[str, ...]]:
    """SHAREGPT_ROLES with a section's `roles` over it."""
    return {**SHAREGPT_ROLES, **{role: tuple(names) for role, names in (roles or {}).items()}}


class DatasetSection(Section):
    path: str = Field(
        min_length=1,
        description="A .jsonl/.json/.csv/.parquet file (relative to the recipe's folder), or a "
                    "Hugging Face hub dataset id like `tatsu-lab/alpaca`.")
    name: str | None = Field(default=None, description="Hub dataset configuration name (load_dataset's `name`).")
    split: str = Field(default="train", min_length=1, description="Hub dataset split to train on.")
    format: Literal["text", "alpaca", "chat", "sharegpt", "prompt_completion"] = Field(
        description="text: one text field; alpaca: instruction/input/output; chat: a list of "
                    "{role, content} messages (OpenAI/TRL; tool_calls kept); sharegpt: a list of {from, value} "
                    "turns (roles mapped by `roles`); prompt_completion: a prompt and a completion (TRL), "
                    "each text or a list of messages.")
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    conversations_field: str = Field(default="conversations", description="sharegpt: the column of turns.")
    role_key: str = Field(default="from", description="sharegpt: the key of a turn that names its speaker "
                          "(LLaMA-Factory's role_tag, axolotl's message_property_mappings.role).")
    content_key: str = Field(default="value", description="sharegpt: the key of a turn that holds its text.")
    roles: dict[str, list[str]] | None = Field(
        default=None, description="sharegpt: speaker names of the file for each role, merged over the defaults "
        "user: [human, user], assistant: [gpt, assistant, model], system: [system], tool: [observation, tool, "
        "function_response], tool_call: [function_call] (a turn whose value is the JSON "
        "{name, arguments} of a call, made an assistant tool call). A role given here replaces its default list.")
    prompt_field: str = Field(default="prompt", description="prompt_completion: the prompt column.")
    completion_field: str = Field(default="completion", description="prompt_completion: the completion column.")
    tools_field: str = Field(default="tools", description="chat/sharegpt: the column of tool (function) "
                             "schemas passed to the chat template, when a row has it (a list, or its JSON text).")
    weight: float = Field(default=1.0, gt=0, le=1000, description="In a `datasets:` list: how many times each "
                          "training row is used per epoch. 2: every row twice; 0.5: a random half of the rows "
                          "(chosen by training.seed); 1.5: every row once plus a random half again. Evaluation "
                          "rows are not weighted.")
    eval_path: str | None = Field(
        default=None, description="A local file of held-out examples; when null, `eval_split` of the "
                                  "training data is held out instead.")
    eval_split: float = Field(default=0.1, ge=0, lt=1,
                              description="Fraction held out for evaluation when there is no eval_path "
                                          "(0: no evaluation). Chosen deterministically from training.seed.")
    train_on_inputs: bool = Field(default=False, description="Compute the loss on the prompt too "
                                  "(alpaca/chat); by default only the response is learned.")
    max_samples: int | None = Field(default=None, gt=0, le=_MAX_COUNT,
                                    description="Use at most this many training rows (the first ones).")

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str, info: ValidationInfo) -> str:
        return _resolve_data_location(value, info, allow_hub=True)

    @field_validator("eval_path")
    @classmethod
    def _resolve_eval_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _resolve_data_location(value, info, allow_hub=False)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if value is None:
            return None
        problems = []
        for role, names in value.items():
            if role not in SHAREGPT_ROLES:
                problems.append(f"unknown role {role!r}{did_you_mean(role, list(SHAREGPT_ROLES))} (roles: "
                                f"{', '.join(SHAREGPT_ROLES)})")
            elif not names or any(not name.strip() for name in names):
                problems.append(f"{role}: expected a list of the file's speaker names, like [human]")
        merged = sharegpt_role_names(value) if not problems else {}
        seen: dict[str, str] = {}
        for role, names in merged.items():
            for name in names:
                if name in seen and seen[name] != role:
                    problems.append(f"speaker {name!r} is both {seen[name]} and {role}; list it under one role")
                seen.setdefault(name, role)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @property
    def is_hub(self) -> bool:
        """True when `path` is a hub dataset id rather than a local file (local paths are absolute)."""
        return not os.path.isabs(self.path)


class TrainingSection(Section):
    output_dir: str = Field(min_length=1, description="Where adapters, checkpoints and logs go "
                                                      "(relative to the current directory).")
    num_train_epochs: float | None = Field(default=None, gt=0, le=1e6,
                                           description="Passes over the training data (default 1).")
    max_steps: int | None = Field(default=None, gt=0, le=_MAX_COUNT,
                                  description="Optimizer steps; set this or num_train_epochs, not both.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    fp16: AutoBool = Field(default="auto", description="auto: on for GPUs below compute capability 8.0.")
    bf16: AutoBool = Field(default="auto", description="auto: on for GPUs with compute capability >= 8.0.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=_MAX_BATCH)
    per_device_train_batch_size: int = Field(default=1, ge=1, le=_MAX_BATCH)
    per_device_eval_batch_size: int | None = Field(default=None, ge=1, le=_MAX_BATCH,
                                                   description="Default: per_device_train_batch_size.")
    max_seq_length: int = Field(default=512, ge=8, le=_MAX_SEQ,
                                description="Tokens per example; longer examples are truncated.")
    gradient_checkpointing: bool = True
    optim: str = Field(default="paged_adamw_8bit", description="A transformers optimizer name; paged "
                       "and bnb 8-bit optimizers need CUDA, use adamw_torch on CPU.")
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1,
                                       description="Fraction of the steps spent warming up (default 0.03).")
    warmup_steps: int | None = Field(default=None, ge=0, le=_MAX_COUNT, description="Or an exact number of steps.")
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    max_grad_norm: float = Field(default=0.3, gt=0, le=1e6)
    logging_steps: int = Field(default=1, ge=1, le=_MAX_COUNT)
    eval_strategy: Literal["no", "steps", "epoch"] = "steps"
    eval_steps: int | None = Field(default=None, ge=1, le=_MAX_COUNT, description="Default: save_steps.")
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    save_steps: int = Field(default=50, ge=1, le=_MAX_COUNT)
    save_total_limit: int | None = Field(default=2, ge=1, le=_MAX_COUNT)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    watch: bool = Field(default=True, description="Watch the run (qlora_doctor/trainer/watch.py): stop with a "
                        "checkpoint and a diagnosis when the loss turns NaN or diverges (exit 3), warn when it "
                        "stops learning or overfits.")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, le=_MAX_COUNT, description="Stop after this many evaluations without a new best "
        "eval loss (needs evaluation data; null: train to the end).")

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` (the TrainingArguments value) as false.
        return "no" if value is False else value
    report_to: Union[str, list[str]] = Field(
        default="none", description="Where the Trainer logs metrics: `none`, one integration or a list of "
        "them (transformers' names; table with sources: qlora_doctor/recipe/integrations.toml). Each must be "
        "installed: the doctor refuses to start otherwise.",
        json_schema_extra={"anyOf": [{"enum": list(report_to_names())},
                                     {"type": "array", "items": {"enum": list(report_to_names()[1:])}}]})
    run_name: str | None = Field(default=None, min_length=1, description="The run's name in the report_to "
                                 "integrations (TrainingArguments.run_name); default: the output folder's name.")
    project: str | None = Field(default=None, min_length=1, description="The project (W&B, Trackio, Comet, "
                                "SwanLab, ClearML) or experiment (MLflow) the run is logged under; default: the "
                                "integration's own (e.g. W&B's `huggingface`).")
    dataloader_num_workers: int = Field(default=0, ge=0, le=1024)

    @field_validator("report_to")
    @classmethod
    def _report_to_list(cls, value: str | list[str]) -> str | list[str]:
        targets = [value] if isinstance(value, str) else value
        for target in targets:
            if target == "all":  # transformers' "every integration installed": what logs would depend on the machine
                raise ValueError("`all` is not accepted (it would log to whatever happens to be installed); name "
                                 "the integrations, e.g. [tensorboard, wandb]")
            one_of(target, report_to_names(), "report_to integration")
        if isinstance(value, list):
            if not value:
                raise ValueError("is an empty list; use `none` to log nowhere, or name integrations like [tensorboard]")
            if NO_REPORTING in value and len(value) > 1:
                raise ValueError("lists `none` with integrations; keep either `none` or the integrations")
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise ValueError(f"names {', '.join(repeated)} more than once; list each integration once")
        return value

    @property
    def report_targets(self) -> tuple[str, ...]:
        """The integrations report_to names, as a tuple; empty for `none`."""
        targets = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        return tuple(t for t in targets if t != NO_REPORTING)

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return one_of(value, KNOWN_OPTIMIZERS, "optimizer")

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return one_of(value, KNOWN_SCHEDULERS, "scheduler")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSection:
        problems = training_conflicts(self.model_dump(exclude_defaults=True))
        if problems:
            raise ValueError(CROSS_FIELD_MARK + CROSS_FIELD_MARK.join(problems))
        return self

    @property
    def epochs(self) -> float:
        """num_train_epochs with its default (1) filled in; ignored by the Trainer when max_steps is set."""
        return 1.0 if self.num_train_epochs is None else self.num_train_epochs


class PerformanceSection(Section):
    """Speed levers of `qlora-doctor run` (applied by `qlora_doctor/trainer/speed.py`). The defaults are
    the fast path; `upcast_unquantized: true, checkpoint_layers: all, liger_kernel: false, fused_lora:
    false, padding_free: false, group_by_length: false` is the plain transformers+peft path."""

    upcast_unquantized: bool = Field(
        default=False, description="Cast every weight that is not 4-bit (embeddings, norms, lm_head) to "
        "float32 as peft's prepare_model_for_kbit_training does; false keeps them in the compute dtype "
        "(less memory, no per-step casts).")
    checkpoint_layers: Union[Literal["all", "auto"], int, float] = Field(
        default="all", description="With training.gradient_checkpointing: which decoder layers recompute "
        "their activations in the backward pass: `all`, a count (the first N layers), a fraction in "
        "(0, 1] of the layers, or `auto`: the fewest that keep the memory planner's prediction within "
        "85% of the GPU (all on a CPU, with FSDP, or when the GPU's memory is unknown). Fewer: faster, more memory.")
    liger_kernel: AutoBool = Field(
        default="auto", description="Liger Kernel's fused linear cross-entropy, RMSNorm, SwiGLU and RoPE. "
        "auto: on when liger-kernel is installed, the model type is supported and training runs on CUDA.")
    fused_lora: AutoBool = Field(
        default="auto", description="One autograd function per LoRA-on-4-bit layer (dequantize, base matmul, "
        "LoRA and dropout together; the dropout mask is regenerated instead of stored). auto: on for "
        "4-bit plain LoRA (no DoRA, no bias).")
    padding_free: AutoBool = Field(
        default="auto", description="Concatenate each batch into one row without padding "
        "(DataCollatorWithFlattening). auto: on when the attention implementation has variable-length "
        "kernels (flash_attention_2/3); sdpa would compute attention across the whole packed row.")
    group_by_length: bool = Field(
        default=True, description="Batch examples of similar length together (less padding); the "
        "order of batches stays random.")
    torch_compile: bool = Field(default=False, description="torch.compile the model (TrainingArguments.torch_compile).")
    cudnn_attention: AutoBool = Field(
        default="auto", description="Let scaled_dot_product_attention use cuDNN's kernel (torch's choice). "
        "auto: off where a knowledge-base rule says cuDNN attention is broken for this torch and GPU "
        "(torch 2.11 to 2.14.0 on H100/H200: NaN gradients, internal errors at long sequences); the flash "
        "and memory-efficient kernels take over.")
    recompute: Literal["auto", "full", "selective"] = Field(
        default="auto", description="How a checkpointed layer recomputes in the backward pass. full: all of it "
        "from its input. selective: it also keeps its q/k/v/o/down projections' 4-bit GEMM outputs and the "
        "attention output (about 0.56 GiB more per layer at 8 x 2048 tokens of Llama-3-8B, in host memory when "
        "offload_checkpoints is on), so only gate and up are recomputed (qlora_doctor/trainer/selective.py); not "
        "with torch_compile or FSDP. auto: selective where offload_checkpoints is on and the host can pin the kept "
        "outputs (the memory planner decides, `check --recipe` says), else full.")
    selective_layers: Union[Literal["all", "auto"], int, float] = Field(
        default="auto", description="With recompute: selective, which checkpointed layers keep those outputs: "
        "`all`, a count (the first N checkpointed layers), a fraction in (0, 1] of them, or `auto`: the most that "
        "keep the memory planner's prediction within 85% of the GPU (all on a CPU or when the GPU's memory is "
        "unknown); the others recompute everything from their input. Fewer: less memory (about 0.56 GiB per "
        "layer at 8 x 2048 tokens of Llama-3-8B), more recompute.")
    fp8_base: bool = Field(
        default=False, description="Run the frozen 4-bit base layers' GEMMs (the forward and the input gradient) "
        "in float8 through torchao (`pip install 'torchao>=0.18,<0.19'`) on GPUs with FP8 tensor cores (compute "
        "capability >= 8.9: Ada, Hopper and newer, e.g. L4, L40S, RTX 4090, H100, H200): each weight is "
        "dequantized from NF4 as before, then it and the layer's input are cast to float8 e4m3 with a dynamic "
        "per-tensor scale (the gradient to e5m2) for the scaled matmul. The weights stay NF4 in memory and LoRA "
        "stays as it was. Faster GEMMs, coarser numerics (qlora_doctor/trainer/fp8.py); needs "
        "quantization.load_in_4bit, not with torch_compile or FSDP; composes with recompute: selective (the float8 "
        "GEMM is one op its policy keeps).")
    fp8_weight_cache: bool = Field(
        default=False, description="With fp8_base: keep each 4-bit weight's float8 copy for the run instead of "
        "dequantizing it from NF4 and casting it at every GEMM (the forward, the input gradient and every "
        "recomputed forward). The frozen weight's cast is the same each time, so training is the same bits; it "
        "costs 2 bytes per base parameter of GPU memory (the cast in the two layouts FP8 GEMMs take: about 13 GiB "
        "for Llama-3-8B; the NF4 weights stay), which the memory planner counts.")
    offload_checkpoints: AutoBool = Field(
        default="auto", description="Keep what each checkpointed decoder layer saves for its backward (its input "
        "hidden state, batch x seq x hidden: 128 MiB at 8 x 2048 tokens of Llama-3-8B, and with recompute: "
        "selective the outputs it keeps) in pinned host memory between forward and backward: copied device->host "
        "on a side CUDA stream after the layer's forward, and prefetched host->device for the layer before while "
        "a layer's backward runs, so about three layers' worth stay on the GPU (qlora_doctor/trainer/offload.py, "
        "like unsloth's offloaded checkpointing). Exact (the same gradients); costs PCIe traffic and host memory "
        "(an H200 ran Llama-3-8B at 8 x 2048 with selective recompute at the same tokens/s with 17.5 GiB less GPU "
        "memory). CUDA only (off on the CPU); needs checkpointed layers, not with torch_compile or FSDP. auto: on "
        "with a GPU where the host's memory is known and what it pins stays within half of it (all ranks "
        "together).")

    @model_validator(mode="after")
    def _selective_recompute(self) -> PerformanceSection:
        if self.recompute == "selective" and self.torch_compile:
            raise ValueError(CROSS_FIELD_MARK + "performance.recompute: selective with performance.torch_compile: "
                             "true: the selective policy runs Python per op, which torch.compile does not trace; "
                             "set `performance.recompute: full` or `performance.torch_compile: false`")
        if self.fp8_base and self.torch_compile:
            raise ValueError(CROSS_FIELD_MARK + "performance.fp8_base: true with performance.torch_compile: true: "
                             "not supported (fp8_base compiles only its own float8 casts; compiling the whole model "
                             "around them and bitsandbytes' 4-bit weights is untested); set "
                             "`performance.torch_compile: false` or `performance.fp8_base: false`")
        if self.selective_layers not in ("all", "auto") and self.recompute == "full":
            raise ValueError(CROSS_FIELD_MARK + f"performance.selective_layers: {self.selective_layers} with "
                             "performance.recompute: full: only selective recompute keeps outputs; set "
                             "`performance.recompute: selective` or remove performance.selective_layers")
        if self.offload_checkpoints is True and self.checkpoint_layers == 0:
            raise ValueError(CROSS_FIELD_MARK + "performance.offload_checkpoints: true with "
                             "performance.checkpoint_layers: 0: no layer is checkpointed, so there is nothing to "
                             "offload; set `performance.checkpoint_layers: all` (or a count above 0) or "
                             "`performance.offload_checkpoints: false`")
        if self.offload_checkpoints is True and self.torch_compile:
            raise ValueError(CROSS_FIELD_MARK + "performance.offload_checkpoints: true with performance.torch_compile: "
                             "true: not supported (the offload hooks run Python per saved tensor and use CUDA "
                             "streams, untested under torch.compile); set `performance.torch_compile: false` or "
                             "`performance.offload_checkpoints: false`")
        return self

    @field_validator("checkpoint_layers", "selective_layers")
    @classmethod
    def _layer_selection(cls, value: str | int | float) -> str | int | float:
        if isinstance(value, int) and not 0 <= value <= _MAX_COUNT:
            raise ValueError(f"a layer count must be >= 0, got {value}; or use `all` or a fraction like 0.5")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"a fraction of the layers must be in (0, 1], got {value}; or use `all` or a count")
        return value


class DistributedSection(Section):
    """Training on several GPUs of one machine through `accelerate launch` (launcher:
    `qlora_doctor/trainer/distributed.py`). `none` trains on one GPU in the `qlora-doctor run` process;
    `ddp` keeps one whole 4-bit model per GPU; `fsdp` shards the 4-bit model across the GPUs
    (FSDP-QLoRA, for a model that does not fit one GPU)."""

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        default="none", description="none: one process, one GPU; ddp: one model copy per GPU; fsdp: the "
        "model sharded across the GPUs (needs quantization.bnb_4bit_quant_storage equal to the compute dtype).")
    num_processes: Union[Literal["auto"], int] = Field(
        default="auto", description="Processes (one per GPU) on this machine; auto: every visible GPU.")
    main_process_port: int | None = Field(
        default=None, ge=1024, le=65535, description="Port of rank 0's rendezvous (accelerate's default 29500 when null).")
    fsdp_auto_wrap_layer: str | None = Field(
        default=None, min_length=1, description="fsdp: the decoder layer class to wrap (default: the "
        "model's own `_no_split_modules`, e.g. LlamaDecoderLayer).")
    fsdp_offload_params: bool = Field(default=False, description="fsdp: keep parameter shards in CPU RAM (slow).")

    @field_validator("num_processes")
    @classmethod
    def _process_count(cls, value: str | int) -> str | int:
        if isinstance(value, int) and not 1 <= value <= 1024:
            raise ValueError(f"must be between 1 and 1024 (one per GPU) or `auto`, got {value}")
        return value


def training_conflicts(training: Any) -> list[str]:
    """Keys of the training section that contradict each other. Takes the raw mapping too, so that
    these are reported even when another training key has the wrong type."""
    if not isinstance(training, dict):
        return []
    problems: list[str] = []
    if training.get("fp16") is True and training.get("bf16") is True:
        problems.append("training.fp16 and training.bf16: both true; choose one (bf16 on GPUs with "
                        "compute capability >= 8.0, fp16 on older ones) or leave both `auto`")
    if training.get("num_train_epochs") is not None and training.get("max_steps") is not None:
        problems.append("training.num_train_epochs and training.max_steps: both set, and max_steps "
                        "would silently win; keep one of them")
    if training.get("warmup_ratio") is not None and training.get("warmup_steps") is not None:
        problems.append("training.warmup_ratio and training.warmup_steps: both set; keep one of them")
    return problems


def dataset_conflicts(data: Any) -> list[str]:
    """`dataset:` and `datasets:` both given, or neither. Takes the raw mapping too, so that this is reported
    even when another section has errors."""
    if not isinstance(data, dict):
        return []
    if data.get("datasets") == []:
        return ["datasets: is empty; list at least one dataset section under it, or use `dataset:`"]
    if data.get("dataset") is None and data.get("datasets") is None:
        return ["dataset: missing (required); give one `dataset:` section, or a `datasets:` list of them"]
    if data.get("dataset") is not None and data.get("datasets") is not None:
        return ["dataset and datasets: both set; keep one (a single `dataset:`, or every data set under `datasets:`)"]
    return []


class Recipe(Section):
    """A whole recipe. Build one with `load_recipe` (a file) or `recipe_from_dict` (a mapping)."""

    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    dataset: DatasetSection | None = Field(default=None, description="The training data; or `datasets:`.")
    datasets: list[DatasetSection] | None = Field(
        default=None, description="Several data sets in one run, each a `dataset:` section with "
        "its own format, fields, max_samples, eval_path/eval_split and `weight`; their training rows are mixed "
        "(by weight) and their evaluation rows joined.")
    training: TrainingSection
    performance: PerformanceSection = PerformanceSection()
    distributed: DistributedSection = DistributedSection()

    @model_validator(mode="after")
    def _one_data_key(self) -> Recipe:
        problems = dataset_conflicts({"dataset": self.dataset, "datasets": self.datasets})
        if problems:
            raise ValueError(CROSS_FIELD_MARK + CROSS_FIELD_MARK.join(problems))
        return self

    @property
    def data_sections(self) -> tuple[DatasetSection, ...]:
        """The recipe's data sections: `(dataset,)`, or the `datasets:` list."""
        if self.datasets:
            return tuple(self.datasets)
        assert self.dataset is not None  # _one_data_key
        return (self.dataset,)

    @property
    def data_keys(self) -> tuple[str, ...]:
        """The recipe key of each of data_sections: `dataset`, or `datasets[0]`, `datasets[1]`, ..."""
        return ("dataset",) if not self.datasets else tuple(f"datasets[{i}]" for i in range(len(self.datasets)))

    @property
    def evaluates(self) -> bool:
        """Whether any data section has evaluation rows (an eval_path or an eval_split above 0)."""
        return any(d.eval_path is not None or d.eval_split > 0 for d in self.data_sections)

    @model_validator(mode="after")
    def _fsdp_quant_storage(self) -> Recipe:
        q = self.quantization
        if (self.distributed.strategy == "fsdp" and q.load_in_4bit and q.bnb_4bit_quant_storage is not None
                and q.bnb_4bit_quant_storage == "uint8"):
            raise ValueError(CROSS_FIELD_MARK + "distributed.strategy: fsdp with quantization.bnb_4bit_quant_storage: "
                             "uint8: FSDP cannot shard uint8 weights together with bf16 ones; set "
                             "`quantization.bnb_4bit_quant_storage: bfloat16` (the compute dtype) or leave it unset "
                             "(fsdp then stores 4-bit weights in the compute dtype)")
        return self

    @model_validator(mode="after")
    def _fsdp_selective_recompute(self) -> Recipe:
        if self.distributed.strategy == "fsdp" and self.performance.recompute == "selective":
            raise ValueError(CROSS_FIELD_MARK + "performance.recompute: selective with distributed.strategy: fsdp: "
                             "not supported (untested: FSDP gathers each layer's sharded weights anew, and the "
                             "selective policy finds the projections by their weights); set "
                             "`performance.recompute: full`")
        return self

    @model_validator(mode="after")
    def _offload_checkpoints_combinations(self) -> Recipe:
        if self.performance.offload_checkpoints is not True:  # auto: off where it cannot run (memory/plan.py)
            return self
        if not self.training.gradient_checkpointing:
            raise ValueError(CROSS_FIELD_MARK + "performance.offload_checkpoints: true with "
                             "training.gradient_checkpointing: false: no layer is checkpointed, so there is nothing "
                             "to offload; set `training.gradient_checkpointing: true` or "
                             "`performance.offload_checkpoints: false`")
        if self.distributed.strategy == "fsdp":
            raise ValueError(CROSS_FIELD_MARK + "performance.offload_checkpoints: true with distributed.strategy: "
                             "fsdp: not supported (untested: FSDP's own prefetching and resharding streams beside "
                             "the offload streams); set `distributed.strategy: ddp` (one model per GPU) or "
                             "`performance.offload_checkpoints: false`")
        return self

    @model_validator(mode="after")
    def _fp8_base_combinations(self) -> Recipe:
        if not self.performance.fp8_base:
            if self.performance.fp8_weight_cache:
                raise ValueError(CROSS_FIELD_MARK + "performance.fp8_weight_cache: true with performance.fp8_base: "
                                 "false: the cache keeps the float8 weights fp8_base multiplies; set "
                                 "`performance.fp8_base: true` or remove performance.fp8_weight_cache")
            return self
        if not self.quantization.load_in_4bit:
            raise ValueError(CROSS_FIELD_MARK + "performance.fp8_base: true with quantization.load_in_4bit: false: "
                             "fp8_base runs the GEMMs of the 4-bit base layers in float8 and there are none; set "
                             "`quantization.load_in_4bit: true` or `performance.fp8_base: false`")
        if self.distributed.strategy == "fsdp":
            raise ValueError(CROSS_FIELD_MARK + "performance.fp8_base: true with distributed.strategy: fsdp: not "
                             "supported (FSDP hands each 4-bit weight back as a flat shard, and the float8 path "
                             "dequantizes the whole weight from its quantization state; untested); set "
                             "`distributed.strategy: ddp` (one model per GPU) or `performance.fp8_base: false`")
        return self




# --- loading --------------------------------------------------------------------------------------

REPO_RECIPES = shipped_path("recipes")
"""The repository's recipes folder, next to the package (searched after ./recipes)."""


def recipe_search_path() -> list[Path]:
    return [Path.cwd() / "recipes", REPO_RECIPES]


def find_recipe(path_or_name: str | os.PathLike[str]) -> Path:
    """A recipe file by path, or by name (`demo` -> the first `recipes/demo.yaml` on the search path)."""
    text = os.fspath(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise InputError(f"{text}: is a folder; name a recipe file like {text.rstrip('/')}/demo.yaml")
    is_name = Path(text).name == text and path.suffix not in (".yaml", ".yml")
    if is_name:
        for folder in recipe_search_path():
            for suffix in (".yaml", ".yml"):
                candidate = folder / f"{text}{suffix}"
                if candidate.is_file():
                    return candidate
    known = sorted({p.stem for folder in recipe_search_path() if folder.is_dir()
                    for p in [*folder.glob("*.yaml"), *folder.glob("*.yml")]})
    hint = did_you_mean(text if is_name else path.stem, known)
    where = " or ".join(str(f) for f in recipe_search_path())
    raise InputError(f"{text}: no such recipe file{' or recipe name in ' + where if is_name else ''}"
                     f"{hint}; known recipes: {', '.join(known) or 'none'}")


def load_recipe(path_or_name: str | os.PathLike[str]) -> Recipe:
    """Read, parse and validate a recipe; raises one `InputError` listing every problem."""
    path = find_recipe(path_or_name)
    where = display_path(path)
    data = read_recipe_yaml(path, where)
    return recipe_from_dict(data, where=where, base_dir=path.resolve().parent)


def recipe_from_dict(data: Any, where: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a parsed recipe. Relative data/model paths resolve against `base_dir` (default: cwd)."""
    from pydantic import ValidationError

    if data is None:
        raise InputError(f"{where}: the recipe is empty; start from `recipes/demo.yaml` "
                         "(sections model, quantization, lora, dataset, training)")
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping with the sections model, quantization, lora, "
                         f"dataset, training at the top level, got {describe_value(data)}")
    # An empty section (`lora:` with nothing under it) means "all defaults", as it reads; an empty
    # `datasets:` is no list, and `dataset: null` beside a `datasets:` list is the other way of giving data.
    data = {k: ({} if v is None and k in Recipe.model_fields and k != "datasets"
                and not (k == "dataset" and data.get("datasets") is not None) else v) for k, v in data.items()}
    try:
        return Recipe.model_validate(data, context={"base_dir": base_dir or Path.cwd()})
    except ValidationError as err:
        messages = format_validation_errors(err, Recipe)
        messages += [m for m in training_conflicts(data.get("training")) if m not in messages]
        messages += [m for m in dataset_conflicts(data) if m not in messages]
        raise InputError([f"{where}: {m}" for m in messages]) from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a recipe") from None


LENGTH_KEYS = ("max_steps", "num_train_epochs")
"""The two ways to say how long training runs; a recipe sets one."""


def apply_overrides(recipe: Recipe, overrides: list[str], where: str = "--set") -> Recipe:
    """A copy of `recipe` with `section.key=value` overrides (values parsed as YAML), revalidated."""
    import yaml

    data = recipe.model_dump()
    errors: list[str] = []
    given: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            errors.append(f"{where} {item!r}: expected SECTION.KEY=VALUE, e.g. training.max_steps=10")
            continue
        section, name = parts
        if section not in data:
            errors.append(f"{where} {item!r}: unknown section {section!r}{did_you_mean(section, list(data))}")
            continue
        try:
            value = parse_yaml_value(raw)
        except yaml.YAMLError as err:
            errors.append(f"{where} {item!r}: value is not valid YAML ({yaml_problem(err)})")
            continue
        data[section] = {**(data[section] or {}), name: value}
        if section == "training" and name in LENGTH_KEYS and value is not None:
            # The run's length given on the command line replaces the recipe's other way of saying it
            # (`run demo --set training.max_steps=2` on a recipe that sets num_train_epochs).
            other = next(k for k in LENGTH_KEYS if k != name)
            if other not in given:
                data["training"][other] = None
        given.add(name)
    if errors:
        raise InputError(errors)
    return recipe_from_dict(data, where=where)


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of a recipe, for editors (e.g. `# yaml-language-server: $schema=recipe.schema.json`)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "qlora-doctor recipe"
    return schema


def recipe_summary(recipe: Recipe) -> str:
    """One line describing a recipe, for `validate` and logs."""
    t, q, lora = recipe.training, recipe.quantization, recipe.lora
    length = f"max_steps {t.max_steps}" if t.max_steps is not None else f"{t.epochs:g} epoch(s)"
    data = " + ".join(f"{d.format} data {d.path if d.is_hub else display_path(Path(d.path))}"
                      + (f" x{d.weight:g}" if d.weight != 1 else "") for d in recipe.data_sections)
    modules = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    quant = f"4-bit {q.bnb_4bit_quant_type}" if q.load_in_4bit else "unquantized"
    return (f"{recipe.model.name_or_path} ({quant}), LoRA r={lora.r} {modules}, {data}, "
            f"{length}, seq {t.max_seq_length} -> {t.output_dir}")


# --- paths ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Location:
    kind: Literal["local", "hub", "missing"]
    path: str


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _classify_location(value: str, base_dir: Path, suffixes: tuple[str, ...]) -> _Location:
    """A local path (made absolute), a hub id (`name` or `org/name`), or a local path that is missing."""
    expanded = Path(value).expanduser()
    candidate = expanded if expanded.is_absolute() else base_dir / expanded
    try:
        exists = candidate.exists()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte: not a path
        raise ValueError(f"not a usable path ({err.strerror if isinstance(err, OSError) else err}); "
                         "fix the path") from None
    if exists:
        return _Location("local", str(candidate.resolve()))
    looks_local = (value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1
                   or Path(value).suffix.lower() in suffixes or not _HUB_ID.fullmatch(value))
    return _Location("missing", str(candidate)) if looks_local else _Location("hub", value)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def _resolve_data_location(value: str, info: ValidationInfo, allow_hub: bool) -> str:
    base = _base_dir(info)
    location = _classify_location(value, base, suffixes=tuple(DATA_SUFFIXES))
    if location.kind == "missing" or location.kind == "hub" and not allow_hub:
        raise ValueError(f"no such file: {location.path} (relative paths are resolved against the "
                         f"recipe's folder {base}); fix the path"
                         + (" or use a hub dataset id like `tatsu-lab/alpaca`" if allow_hub else ""))
    if location.kind == "local":
        path = Path(location.path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; name one data file ({', '.join(DATA_SUFFIXES)})")
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                             f"use one of {', '.join(DATA_SUFFIXES)}")
    return location.path


def display_path(path: Path) -> str:
    """A path as the user would write it: relative to the current directory when inside it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


__all__ = [
    "DATA_SUFFIXES", "DatasetSection", "DistributedSection", "LoraSection", "ModelSection", "PerformanceSection",
    "QuantizationSection", "Recipe", "TrainingSection", "apply_overrides", "display_path", "find_recipe",
    "format_validation_errors", "load_recipe", "recipe_from_dict", "recipe_json_schema", "recipe_summary",
]

"""FSDP-QLoRA state the product reads and writes itself: the adapter's tensors and training checkpoints.

Why not the libraries' own: under FSDP1 with nested wrapping (one unit per decoder layer, one per LoRA
Linear) peft picks an adapter's keys by walking module names that still hold `_fsdp_wrapped_module.`, so
`PeftModel.save_pretrained` writes an empty adapter (2 x H100), and the Trainer's FSDP checkpoint
(accelerate's `save_fsdp_model(adapter_only=True)`) crashes with one process and saves 0 adapter tensors
with two (one H200; CPU ranks in tests/test_distributed.py). The 4-bit base never changes, so a QLoRA
checkpoint needs only:

    checkpoint-N/adapter_model.safetensors, adapter_config.json   the LoRA tensors, peft's format (rank 0)
    checkpoint-N/optimizer.rank{R}-of-{W}.pt                      each rank's optimizer state (its shards)
    checkpoint-N/scheduler.pt, rng_state_{R}.pth, trainer_state.json   as the Trainer writes them

`FsdpQloraTrainer` writes and reads that layout in place of the Trainer's FSDP paths; `--resume` needs the
same number of processes (each rank's optimizer state covers its own shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from qlora_doctor.core.errors import InputError

WRAPPER_MODULE_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""The child names FSDP1 and torch's checkpoint wrapper insert into module paths; state-dict keys drop them."""
OPTIMIZER_SHARD = "optimizer.rank{rank}-of-{world}.pt"
SCHEDULER_FILE = "scheduler.pt"


def state_dict_key(module_path: str) -> str:
    """A parameter's path in the wrapped model -> its key in the model's full state dict."""
    return ".".join(part for part in module_path.split(".") if part not in WRAPPER_MODULE_NAMES)


def _fsdp_class() -> type:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _unit_parameters(unit: Any, prefix: str, fsdp_class: type) -> Iterator[tuple[str, Any]]:
    """(path, parameter) for the parameters an FSDP unit manages itself: its module tree without the units
    nested in it (theirs stay sharded while only this one is summoned)."""
    stack = [(prefix, unit)]
    while stack:
        path, module = stack.pop()
        for name, param in module.named_parameters(recurse=False):
            yield (f"{path}.{name}" if path else name), param
        for name, child in module.named_children():
            if not isinstance(child, fsdp_class):
                stack.append((f"{path}.{name}" if path else name, child))


def _lora_units(wrapped: Any) -> Iterator[tuple[Any, list[tuple[str, Any]]]]:
    """Every FSDP unit (in module order, the same on every rank) with its own LoRA parameters."""
    fsdp = _fsdp_class()
    for unit_path, unit in wrapped.named_modules():
        if isinstance(unit, fsdp):
            yield unit, [(state_dict_key(p), param) for p, param in _unit_parameters(unit, unit_path, fsdp)
                         if ".lora_" in p]


def gather_lora_state_dict(wrapped: Any) -> dict[str, Any]:
    """FSDP1: every LoRA parameter of `wrapped`, unsharded and copied to rank 0's CPU ({} on the other
    ranks), keyed as the model's full state dict keys it. A collective: every rank must call it.

    One FSDP unit at a time (`summon_full_params(unit, recurse=False)`): a rank holds one unit's unsharded
    weights at once and copies only the adapter's tensors, where Accelerator.get_state_dict gathers the
    whole model to rank 0's CPU (with the 70B shape on 2 H100s that had not finished 40 s after training)."""
    import torch.distributed as dist

    fsdp = _fsdp_class()
    main = not dist.is_initialized() or dist.get_rank() == 0
    gathered: dict[str, Any] = {}
    for unit, params in _lora_units(wrapped):
        with fsdp.summon_full_params(unit, recurse=False, writeback=False):
            if main:
                gathered.update((key, param.detach().to("cpu", copy=True)) for key, param in params)
    return gathered


def load_lora_state_dict(wrapped: Any, adapter: Mapping[str, Any], adapter_name: str) -> int:
    """The inverse of gather_lora_state_dict, from an adapter_model.safetensors' tensors (peft's keys, without
    the adapter name) that every rank read: each unit summoned with writeback, its LoRA parameters
    overwritten, the shards updated. A collective. Returns the tensors loaded; refuses a file that does not
    hold exactly the model's LoRA parameters."""
    import torch

    fsdp = _fsdp_class()
    marker = f".{adapter_name}."
    expected: set[str] = set()
    for unit, params in _lora_units(wrapped):
        file_keys = [(key.replace(marker, ".", 1), param) for key, param in params]
        expected.update(k for k, _ in file_keys)
        missing = [k for k, _ in file_keys if k not in adapter]
        if missing:
            raise InputError(f"the checkpoint's adapter lacks {len(missing)} LoRA tensors of this model, e.g. "
                             f"{missing[0]!r}: it was saved from a different model or LoRA configuration")
        with fsdp.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
            for key, param in file_keys:
                param.copy_(adapter[key].to(device=param.device, dtype=param.dtype))
    extra = sorted(set(adapter) - expected)
    if extra:
        raise InputError(f"the checkpoint's adapter has {len(extra)} tensors this model lacks, e.g. {extra[0]!r}")
    return len(expected)


def save_optimizer_shard(optimizer: Any, folder: Path, rank: int, world: int) -> Path:
    """This rank's optimizer state (the states of its parameter shards) as `optimizer.rank{R}-of-{W}.pt`."""
    import torch

    path = folder / OPTIMIZER_SHARD.format(rank=rank, world=world)
    torch.save(optimizer.state_dict(), path)
    return path


def load_optimizer_shard(optimizer: Any, folder: Path, rank: int, world: int) -> None:
    """Load what save_optimizer_shard wrote for this rank; a checkpoint from another process count is
    refused with the count it needs. The state is read onto the CPU: torch's optimizers move it to the
    parameters' device as they load, bitsandbytes' at their first step; its paged 8-bit AdamW failed on state
    read onto the GPU ("Error invalid argument ... pythonInterface.cpp", one H200)."""
    import torch

    path = folder / OPTIMIZER_SHARD.format(rank=rank, world=world)
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("optimizer.rank*-of-*.pt"))
        written = found[0].rsplit("-of-", 1)[1].removesuffix(".pt") if found else None
        raise InputError(f"{folder}: no optimizer state for rank {rank} of {world} processes"
                         + (f"; this checkpoint was written by {written} processes: resume with "
                            f"`distributed.num_processes: {written}`" if written else
                            " (not a checkpoint of an fsdp run)"))
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def fsdp_qlora_trainer_class() -> type:
    """transformers' Trainer with the FSDP checkpoint paths replaced by this module's (see the docstring
    on top); without FSDP it is the Trainer unchanged."""
    import torch
    from transformers import Trainer

    class FsdpQloraTrainer(Trainer):
        def _peft_model(self) -> Any:
            return self.accelerator.unwrap_model(self.model)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            from qlora_doctor.trainer.outputs import save_adapter_from_state_dict

            folder = Path(output_dir or self.args.output_dir)
            tensors = gather_lora_state_dict(self.model_wrapped)  # every rank takes part
            if self.args.should_save:
                folder.mkdir(parents=True, exist_ok=True)
                save_adapter_from_state_dict(self._peft_model(), tensors, folder)
            return None

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self.is_fsdp_enabled:
                return super()._save_optimizer_and_scheduler(output_dir)
            folder = Path(output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            save_optimizer_shard(self.optimizer, folder, self.args.process_index, self.args.world_size)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), folder / SCHEDULER_FILE)
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            if not self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from safetensors.torch import load_file

            from qlora_doctor.trainer.outputs import ADAPTER_FILES

            path = Path(resume_from_checkpoint) / ADAPTER_FILES[0]
            if not path.is_file():
                raise InputError(f"{resume_from_checkpoint}: no {ADAPTER_FILES[0]} (not a checkpoint of this run)")
            load_lora_state_dict(model if model is not None else self.model_wrapped, load_file(str(path)),
                                 self._peft_model().active_adapter)
            return None

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            if not self.is_fsdp_enabled or checkpoint is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            folder = Path(checkpoint)
            load_optimizer_shard(self.optimizer, folder, self.args.process_index, self.args.world_size)
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
            return None

    return FsdpQloraTrainer


"""One rank of tests/test_distributed.py's FSDP adapter test: a tiny Llama with LoRA, wrapped by FSDP1
(use_orig_params) in one of two layouts: `layers`, as accelerate's TRANSFORMER_BASED_WRAP does (every decoder
layer its own unit), or `peft`, as the Trainer does for a PeftModel (peft's fsdp_auto_wrap_policy: also every
LoRA Linear its own unit). The adapter is gathered by trainer/fsdp_state.py's gather_lora_state_dict (what
the product saves from) and, for comparison, within a full state dict to rank 0 (as
Accelerator.get_state_dict does; without CPU offload, which crashes gloo ranks); rank 0 saves the first with
trainer/outputs.py's save_adapter_from_state_dict and the LoRA weights it started from, for the test.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_cpu_worker.py OUT_DIR LAYOUT

LAYOUT `trainer-checkpoint` trains an untied LoRA Llama 2 steps under peft's wrap policy, then takes the
adapter state dict the way the Trainer's FSDP checkpoint does (accelerate's save_fsdp_model(adapter_only=True):
peft's get_peft_model_state_dict inside a SHARDED_STATE_DICT context); rank 0 writes how many tensors it got.

LAYOUT `resume` checks trainer/fsdp_state.py's checkpoint: train 2 steps, write the gathered adapter and
each rank's optimizer shard, train 2 more; then a fresh model (other LoRA init) loads both and trains the
same 2 steps; rank 0 writes both runs' losses.

LAYOUT `train-tied` instead trains a tied-embedding LoRA Llama for 3 steps under peft's wrap policy (what
the Trainer builds): with one rank FSDP1 runs NO_SHARD and the second step asserts; rank 0 writes the
steps it finished.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def lora_fsdp(*, tied: bool = False, lora_seed: int = 0, lr: float = 1e-3):
    """(PeftModel, its FSDP1 wrapper, AdamW) for a tiny LoRA Llama wrapped by peft's policy (what the Trainer
    builds: one unit per decoder layer and per LoRA Linear, use_orig_params); the same base on every rank
    and in every call, the LoRA init from `lora_seed`."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied)
    base = AutoModelForCausalLM.from_config(config)
    for param in base.parameters():
        param.requires_grad_(False)
    torch.manual_seed(lora_seed)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                                       device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    return model, wrapped, optimizer


def train_step(wrapped, optimizer, ids) -> float:
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return round(loss.item(), 6)


def resume(out: Path) -> None:
    from safetensors.torch import load_file

    from qlora_doctor.trainer import fsdp_state, outputs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model, wrapped, optimizer = lora_fsdp(lora_seed=1, lr=1e-2)
    for ids in batches[:2]:
        train_step(wrapped, optimizer, ids)
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = fsdp_state.gather_lora_state_dict(wrapped)
    if rank == 0:
        outputs.save_adapter_from_state_dict(model, tensors, ckpt)
    fsdp_state.save_optimizer_shard(optimizer, ckpt, rank, world)
    dist.barrier()
    continued = [train_step(wrapped, optimizer, ids) for ids in batches[2:]]

    model, wrapped, optimizer = lora_fsdp(lora_seed=2, lr=1e-2)
    loaded = fsdp_state.load_lora_state_dict(wrapped, load_file(str(ckpt / "adapter_model.safetensors")),
                                             model.active_adapter)
    fsdp_state.load_optimizer_shard(optimizer, ckpt, rank, world)
    resumed = [train_step(wrapped, optimizer, ids) for ids in batches[2:]]
    if rank == 0:
        (out / "rank0.json").write_text(json.dumps({"continued": continued, "resumed": resumed, "loaded": loaded}))
    dist.destroy_process_group()


def trainer_checkpoint(out: Path) -> None:
    from peft import get_peft_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    dist.init_process_group("gloo")
    model, wrapped, optimizer = lora_fsdp()
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        train_step(wrapped, optimizer, ids)
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.SHARDED_STATE_DICT):
        adapter = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rank0.json").write_text(json.dumps({"adapter_tensors": len(adapter)}))
    dist.destroy_process_group()


def train_tied(out: Path) -> None:
    dist.init_process_group("gloo")
    _, wrapped, optimizer = lora_fsdp(tied=True)
    ids = torch.randint(0, 64, (2, 16))
    for step in range(1, 4):
        train_step(wrapped, optimizer, ids)
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "rank0.json").write_text(json.dumps({"steps": step}))
    dist.destroy_process_group()


def main(out: Path, layout: str) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from peft.utils.other import fsdp_auto_wrap_policy

    from qlora_doctor.trainer import fsdp_state, outputs

    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; random values make the comparison mean something
            torch.nn.init.normal_(param)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    if layout == "peft":
        policy = fsdp_auto_wrap_policy(model)
    else:
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                       device_id=torch.device("cpu"))
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        state_dict = wrapped.state_dict()
    lora = fsdp_state.gather_lora_state_dict(wrapped)
    if dist.get_rank() == 0:
        nested = [n for n, _ in model.named_modules() if "._fsdp_wrapped_module." in n]
        units = [n for n, m in wrapped.named_modules() if isinstance(m, FullyShardedDataParallel)]
        from_full = {k: v for k, v in state_dict.items() if ".lora_" in k}
        count = outputs.save_adapter_from_state_dict(model, lora, out)
        save_file(before, str(out / "before.safetensors"))
        (out / "rank0.json").write_text(json.dumps({
            "saved": count, "nested_wrapped_modules": len(nested), "fsdp_units": len(units),
            "gathered_keys": sorted(lora), "full_state_dict_lora_keys": sorted(from_full),
            "equal_to_full_state_dict": all(torch.equal(lora[k], from_full[k]) for k in from_full if k in lora)}))
    else:
        assert lora == {}, "only rank 0 receives the adapter"
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2] == "train-tied":
        train_tied(Path(sys.argv[1]))
    elif sys.argv[2] == "resume":
        resume(Path(sys.argv[1]))
    elif sys.argv[2] == "trainer-checkpoint":
        trainer_checkpoint(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), sys.argv[2])

"""One rank of tests/test_distributed.py's FSDP adapter test: a tiny Llama with LoRA, wrapped by FSDP1 the
way accelerate's TRANSFORMER_BASED_WRAP does (every decoder layer its own unit, use_orig_params), gathered
with a full state dict to rank 0 (as Accelerator.get_state_dict does; without CPU offload, which crashes
gloo ranks), and saved by trainer/outputs.py's save_adapter_from_state_dict. Rank 0 also saves the LoRA
weights it started from, for the test to compare.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_cpu_worker.py OUT_DIR
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from qlora_doctor.trainer import outputs

    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; random values make the comparison mean something
            torch.nn.init.normal_(param)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                       device_id=torch.device("cpu"))
    with FullyShardedDataParallel.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        state_dict = wrapped.state_dict()
    if dist.get_rank() == 0:
        nested = [n for n, _ in model.named_modules() if "._fsdp_wrapped_module." in n]
        count = outputs.save_adapter_from_state_dict(model, state_dict, out)
        save_file(before, str(out / "before.safetensors"))
        (out / "rank0.json").write_text(json.dumps({"saved": count, "nested_wrapped_modules": len(nested)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

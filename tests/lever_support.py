"""What the performance-lever tests share (selective recompute, fp8_base, offload_checkpoints): a minimal recipe,
a tiny random-weight Llama saved once, loaded in 4-bit as `run` loads it on the CPU, and LoRA B made non-zero."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_doctor.recipe.precision import Precision
from qlora_doctor.recipe.schema import Recipe, recipe_from_dict

CPU = Precision(device="cpu", fp16=False, bf16=False, compute_dtype="float32", compute_capability=None, reason="test")


def make_recipe(tmp_path: Path, model: object = "org/model", quantized: bool = True, distributed: dict | None = None,
                lora: dict | None = None, training: dict | None = None, **performance) -> Recipe:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    raw = {"model": {"name_or_path": str(model)}, "dataset": {"path": str(data), "format": "text"},
           "training": {"output_dir": str(tmp_path / "out"), **(training or {})}, "performance": performance,
           "quantization": {"load_in_4bit": quantized}}
    if distributed:
        raw["distributed"] = distributed
    if lora:
        raw["lora"] = lora
    return recipe_from_dict(raw)


def save_tiny_llama(path: Path, layers: int, intermediate_size: int = 160) -> Path:
    """Grouped-query attention (4 query heads, 2 key/value heads), random bf16 weights, seed 0."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path


def load_base(path: Path, quantized: bool = True):
    """The base model as `run` loads it on the CPU: NF4 + double quant with float32 compute (or float32 whole)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32) if quantized else None
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32,
                                                device_map={"": "cpu"})


def nonzero_lora_b(model) -> None:
    """peft starts B at zero; a seeded non-zero B makes every gradient path count, the same in every build."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))


class OpCounter(TorchDispatchMode):
    """Counts the ops that actually run (an op the replay takes from the selective cache never reaches it; the
    ops inside a custom op's kernel run below the mode, uncounted)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] = self.counts.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))

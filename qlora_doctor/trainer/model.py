"""Loading models for QLoRA: the tokenizer, the 4-bit base with LoRA for training, and the base for
inference and merging.

Where the model goes: GPU 0 when the precision was resolved for CUDA (`device_map={"": 0}`), else the
CPU. bitsandbytes >= 0.48 quantizes NF4 on the CPU too, so the same code path trains on both; on the
CPU the compute dtype is float32 (the CPU kernels have no fast half-precision path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qlora_doctor.core.errors import CheckFailed

if TYPE_CHECKING:
    from qlora_doctor.recipe.levers import SpeedPlan
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe


def device_map(precision: Precision, strategy: str = "none") -> dict[str, Any] | None:
    """Where the weights load. Under `accelerate launch` (distributed.strategy ddp) each rank takes the
    GPU of its LOCAL_RANK; under fsdp None, so that transformers' FSDP-aware loading (rank 0 reads, the
    others stay on the meta device) runs and FSDP places the shards."""
    import os

    if strategy == "fsdp":
        return None
    if precision.device != "cuda":
        return {"": "cpu"}
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def torch_dtype(name: str) -> Any:
    """`bfloat16`, `float16`, `float32` or `uint8` -> the torch dtype."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
            "uint8": torch.uint8}[name]


def check_device(precision: Precision, where: str) -> None:
    """Refuse a precision resolved for a GPU that torch cannot see (e.g. a `--machine` file describing
    another machine, or a CPU-only torch build on a GPU machine)."""
    import torch

    if precision.device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed(f"{where}: the machine has an NVIDIA GPU but torch {torch.__version__} cannot use it "
                          "(torch.cuda.is_available() is False); install a CUDA build of torch "
                          "(`qlora-doctor check` says which), or drop --machine when it describes another machine")


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(recipe: Recipe, precision: Precision) -> Any:
    """The recipe's `quantization:` section as a `BitsAndBytesConfig`; None when load_in_4bit is false."""
    if not recipe.quantization.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    kwargs = recipe.quantization.bnb_kwargs(precision)
    if recipe.distributed.strategy == "fsdp" and "bnb_4bit_quant_storage" not in kwargs:
        # FSDP flattens the 4-bit weights with the 16-bit ones: they must share a storage dtype.
        kwargs["bnb_4bit_quant_storage"] = kwargs["bnb_4bit_compute_dtype"]
    kwargs["bnb_4bit_compute_dtype"] = torch_dtype(kwargs["bnb_4bit_compute_dtype"])
    if "bnb_4bit_quant_storage" in kwargs:
        kwargs["bnb_4bit_quant_storage"] = torch_dtype(kwargs["bnb_4bit_quant_storage"])
    return BitsAndBytesConfig(**kwargs)


def load_base(recipe: Recipe, precision: Precision, path: str, quantized: bool = True) -> Any:
    """The base model: 4-bit as the recipe says (quantized=True), else unquantized in the compute dtype."""
    from qlora_doctor.trainer.known_warnings import annotate_known_warnings

    annotate_known_warnings()  # before bitsandbytes loads
    from transformers import AutoModelForCausalLM

    check_device(precision, recipe.model.name_or_path)
    return AutoModelForCausalLM.from_pretrained(
        path,
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
        quantization_config=quantization_config(recipe, precision) if quantized else None,
        dtype=torch_dtype(precision.compute_dtype),
        device_map=device_map(precision, recipe.distributed.strategy),
        low_cpu_mem_usage=True,
    )


def load_for_training(recipe: Recipe, precision: Precision, path: str, levers: SpeedPlan) -> Any:
    """The quantized base from `path`, prepared and wrapped with fresh LoRA adapters (prepare_lora_model)."""
    return prepare_lora_model(load_base(recipe, precision, path, quantized=True), recipe, precision, levers)


def prepare_lora_model(base: Any, recipe: Recipe, precision: Precision, levers: SpeedPlan) -> Any:
    """A loaded base prepared for k-bit training with fresh LoRA adapters: a `peft.PeftModel` whose only
    trainable weights are the adapters. The recipe's `performance:` levers (dtypes, which layers
    checkpoint, Liger, fused LoRA), decided in the run plan and refined here with the loaded model's
    facts, are applied by `qlora_doctor/trainer/speed.py`; all of them off is peft's
    prepare_model_for_kbit_training. `fp8_base` then switches the 4-bit base layers' GEMMs to float8
    (`qlora_doctor/trainer/fp8.py`). Benchmarks pass a base they built themselves."""
    from peft import LoraConfig, get_peft_model

    from qlora_doctor.recipe.levers import plan_for_model
    from qlora_doctor.runplan import decided_for_loaded
    from qlora_doctor.trainer import speed

    recipe = decided_for_loaded(recipe, precision, base)  # offload/recompute `auto` the run plan left open
    plan = plan_for_model(recipe, precision, base, levers.cudnn_hazards)
    model = speed.prepare_for_training(base, recipe, plan)
    model = get_peft_model(model, LoraConfig(**recipe.lora.lora_kwargs()))
    speed.apply_after_peft(model, plan)
    if plan.fp8_base.on:
        from qlora_doctor.trainer.fp8 import apply_fp8_base

        switched, _ = apply_fp8_base(model, cache_weights=plan.fp8_weight_cache.on)
        if not switched:
            raise CheckFailed("performance.fp8_base: no 4-bit linear layer of this model can run float8 GEMMs "
                              "(dimensions must be multiples of 16); set `performance.fp8_base: false`")
    return model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable, total = 0, 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total

"""The doctor's checks for a recipe with `distributed.strategy: ddp | fsdp` (appended to RECIPE_CHECKS):
enough and matching GPUs, NCCL in this torch, the strategy against the model's size (the memory planner
says whether one GPU would hold it; one FSDP process on tied embeddings is refused), what an fsdp run's
checkpoints hold, and the NVLink multicast guards the launched ranks inherit.

Each returns None for `strategy: none`, so one-GPU recipes see no new rows, except the GPU check on a
machine with several GPUs: a passing note that the run trains on GPU 0 alone (the other GPUs idle) and
that `distributed.strategy: ddp` uses them. torch is imported only by the NCCL check, and only for
distributed recipes on a GPU machine.
"""

from __future__ import annotations

import os
from typing import Mapping

from qlora_doctor.core.machine import Machine
from qlora_doctor.core.report import Check
from qlora_doctor.recipe.schema import Recipe
from qlora_doctor.runplan import MULTICAST_GUARDS, RunPlan

DDP_SOURCES = ("https://huggingface.co/docs/accelerate/usage_guides/explore",
               "https://pytorch.org/docs/stable/notes/ddp.html")
FSDP_QLORA_SOURCES = ("https://huggingface.co/docs/peft/accelerate/fsdp",
                      "https://github.com/AnswerDotAI/fsdp_qlora",
                      "https://huggingface.co/docs/transformers/main/en/quantization/bitsandbytes")
NCCL_SOURCES = ("https://pytorch.org/docs/stable/distributed.html#backends",)
MULTICAST_SOURCES = ("https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html#nccl-nvls-enable",)
SHARDED_ROWS = ("4-bit weights", "quantization constants", "linear weights", "embeddings, lm_head, norms",
                "LoRA weights", "LoRA gradients", "optimizer states")
"""Planner breakdown rows (by prefix) that FSDP divides among the ranks; activations and logits are not."""


def _processes(recipe: Recipe, machine: Machine) -> int:
    wanted = recipe.distributed.num_processes
    return len(machine.nvidia_gpus) if wanted == "auto" else int(wanted)


def distributed_gpus_check(run: RunPlan, machine: Machine) -> Check | None:
    """As many NVIDIA GPUs as processes, all of one model and size (the slowest and smallest pace all).
    For `strategy: none` on several GPUs: a passing note that only the first one trains."""
    recipe, precision = run.recipe, run.precision
    d = recipe.distributed
    gpus = machine.nvidia_gpus
    title = f"GPUs for distributed.strategy: {d.strategy}"
    if d.strategy == "none":
        if len(gpus) < 2 or precision.device != "cuda":
            return None
        return Check("recipe.distributed.gpus", "pass", title,
                     f"one process trains on the first GPU (cuda:0); the other {len(gpus) - 1} of the "
                     f"{len(gpus)} GPUs stay idle "
                     f"(`distributed.strategy: ddp` trains on all {len(gpus)} when the model fits one GPU, "
                     "`fsdp` shards it when it does not)",
                     sources=DDP_SOURCES, found=f"{len(gpus)} GPUs", expected="1 GPU used")
    wanted = _processes(recipe, machine)
    found = ", ".join(f"{g.name} ({g.memory_total_mib} MiB)" for g in gpus) or "no NVIDIA GPU"
    if not gpus and d.strategy == "fsdp":
        return Check("recipe.distributed.gpus", "fail", title,
                     "fsdp needs an accelerator: without one accelerate's FSDP plugin stops with \"There are "
                     "currently no available devices found, must be one of 'XPU', 'CUDA', ...\"",
                     fix="run on a machine with NVIDIA GPUs, or use `distributed.strategy: ddp` (gloo on the CPU, "
                         "for testing) or `none`", found=found, expected=f"{d.num_processes} GPUs")
    if not gpus:
        return Check("recipe.distributed.gpus", "warn", title,
                     f"no NVIDIA GPU: {d.num_processes} process(es) would train on the CPU with the gloo backend "
                     "(only useful for testing the setup)",
                     fix="run on a machine with NVIDIA GPUs, or set `distributed.strategy: none`",
                     found=found, expected=f"{d.num_processes} GPUs")
    if len(gpus) < wanted:
        return Check("recipe.distributed.gpus", "fail", title,
                     f"distributed.num_processes: {wanted} needs one GPU per process; this machine has {len(gpus)}",
                     fix=f"set `distributed.num_processes: {len(gpus)}` (or `auto`), or for several hosts print the "
                         "per-host command with `qlora-doctor run RECIPE --print-launch`",
                     found=found, expected=f">= {wanted} GPUs")
    used = gpus[:wanted]
    kinds = sorted({(g.name, g.memory_total_mib) for g in used}, key=str)
    if len(kinds) > 1:
        return Check("recipe.distributed.gpus", "warn", title,
                     f"the {wanted} GPUs differ ({found}): every step waits for the slowest GPU and each rank's "
                     "batch must fit the smallest one",
                     fix="use GPUs of one model: set CUDA_VISIBLE_DEVICES to the matching ones and "
                         "`distributed.num_processes` to their count",
                     sources=DDP_SOURCES, found=found, expected="one GPU model and size")
    if wanted == 1:
        return Check("recipe.distributed.gpus", "warn", title,
                     f"{d.strategy} with one process adds launch and communication overhead to a one-GPU run",
                     fix="set `distributed.strategy: none`, or `distributed.num_processes: auto` on a multi-GPU machine",
                     found=found, expected=">= 2 GPUs")
    return Check("recipe.distributed.gpus", "pass", title, f"{wanted} x {used[0].name}", found=found,
                 expected=f">= {wanted} matching GPUs")


def nccl_available() -> bool:
    """torch's NCCL backend (the one `accelerate launch` uses across GPUs); the test seam."""
    import torch.distributed

    return bool(torch.distributed.is_available() and torch.distributed.is_nccl_available())


def nccl_check(run: RunPlan, machine: Machine) -> Check | None:
    """ddp/fsdp on GPUs talk through NCCL: this torch build must have it."""
    recipe, precision = run.recipe, run.precision
    if recipe.distributed.strategy == "none" or precision.device != "cuda":
        return None
    title = "NCCL in torch (multi-GPU communication)"
    try:
        available = nccl_available()
    except Exception as err:  # torch missing or broken: other checks say why; this one cannot tell
        return Check("recipe.distributed.nccl", "unknown", title, f"torch.distributed could not be imported: {err}",
                     fix="fix the torch install (`qlora-doctor check` says how)", found="unknown", expected="NCCL")
    if not available:
        return Check("recipe.distributed.nccl", "fail", title,
                     "torch.distributed.is_nccl_available() is False: this torch build cannot run "
                     f"distributed.strategy: {recipe.distributed.strategy} across GPUs",
                     fix="install a CUDA build of torch for Linux (`qlora-doctor lock` pins one), or set "
                         "`distributed.strategy: none`",
                     sources=NCCL_SOURCES, found="no NCCL", expected="NCCL")
    return Check("recipe.distributed.nccl", "pass", title, "torch.distributed has NCCL", found="NCCL", expected="NCCL")


FSDP_ONE_PROCESS_TIED_RULE = "fsdp-no-shard-tied-embeddings"
"""The knowledge base's rule for FSDP1 with one process (NO_SHARD) on a model with tied embeddings."""


def strategy_check(run: RunPlan, machine: Machine) -> Check | None:
    """ddp keeps the whole model on every GPU, so it must fit one; fsdp is for models that do not."""
    recipe = run.recipe
    from qlora_doctor.memory.estimate import GIB

    d = recipe.distributed
    if d.strategy == "none" or not machine.nvidia_gpus:
        return None
    title = f"distributed.strategy: {d.strategy} vs the model's size"
    plan = run.memory
    if plan is None:
        return Check("recipe.distributed.strategy", "unknown", title, f"cannot plan memory: {run.memory_error}",
                     fix=f"run `qlora-doctor plan RECIPE` where {recipe.model.name_or_path}'s config can be read",
                     found="not planned")
    if plan.gpu_bytes is None:
        return Check("recipe.distributed.strategy", "unknown", title,
                     f"the memory of {plan.gpu_name} is unknown, so whether one GPU holds the model cannot be told",
                     fix="add memory_total_mib to the GPUs in the --machine file", found="unknown")
    one_gpu = f"{plan.total_bytes / GIB:.1f} GiB on one {plan.gpu_name} ({plan.gpu_bytes / GIB:.1f} GiB)"
    ranks = max(_processes(recipe, machine), 1)
    if d.strategy == "ddp":
        if plan.fits:
            return Check("recipe.distributed.strategy", "pass", title,
                         f"each of the {ranks} ranks holds the whole 4-bit model: {one_gpu}",
                         found=one_gpu, expected="fits one GPU")
        return Check("recipe.distributed.strategy", "fail", title,
                     f"ddp keeps a whole model copy on every GPU and the planner predicts {one_gpu}: each rank "
                     "would run out of memory",
                     fix="set `distributed.strategy: fsdp` (shards the 4-bit model across the GPUs)",
                     sources=FSDP_QLORA_SOURCES, found=one_gpu, expected="fits one GPU")
    if ranks == 1 and plan.tied_embeddings:
        from qlora_doctor.knowledge.loading import load_rules

        rule = next(r for r in load_rules() if r.id == FSDP_ONE_PROCESS_TIED_RULE)
        return Check("recipe.distributed.strategy", "fail", title,
                     "fsdp with one process: torch runs FSDP as NO_SHARD, and with this model's tied input and "
                     f"output embeddings the second training step fails (`qlora-doctor explain` rule {rule.id}: "
                     f"{rule.title}); sharding over one process saves nothing",
                     fix="set `distributed.strategy: none` (one GPU), or run on several GPUs "
                         "(`distributed.num_processes: auto` on a multi-GPU machine)",
                     sources=rule.sources, found="1 process, tied embeddings",
                     expected="strategy none, or >= 2 processes")
    shared = fsdp_rank_bytes(plan.breakdown, plan.total_bytes, ranks, plan.num_layers)
    per_rank = f"about {shared / GIB:.1f} GiB per rank with {ranks} ranks"
    if plan.fits:
        return Check("recipe.distributed.strategy", "warn", title,
                     f"the model fits one GPU ({one_gpu}): fsdp gathers every layer each step; ddp trains the "
                     "same recipe faster on these GPUs",
                     fix="set `distributed.strategy: ddp`", sources=FSDP_QLORA_SOURCES,
                     found=one_gpu, expected="does not fit one GPU")
    if shared > plan.gpu_bytes:
        return Check("recipe.distributed.strategy", "fail", title,
                     f"{one_gpu}; sharded: {per_rank}, still more than {plan.gpu_name} has (activations are not sharded)",
                     fix="lower training.per_device_train_batch_size or training.max_seq_length, or add GPUs "
                         "(distributed.num_processes)", sources=FSDP_QLORA_SOURCES,
                     found=per_rank, expected=f"<= {plan.gpu_bytes / GIB:.1f} GiB")
    return Check("recipe.distributed.strategy", "pass", title,
                 f"{one_gpu} does not fit, so fsdp shards it: {per_rank} (approximate: sharded weights, adapters "
                 "and optimizer states, plus two gathered layers; activations per rank unchanged)",
                 sources=FSDP_QLORA_SOURCES, found=per_rank, expected=f"<= {plan.gpu_bytes / GIB:.1f} GiB")


def fsdp_rank_bytes(breakdown: tuple[tuple[str, int], ...], total: int, ranks: int, layers: int) -> int:
    """A one-GPU plan turned into one FSDP rank's: the sharded rows divided by `ranks`, plus two layers
    gathered at a time (the current one and the prefetched next)."""
    sharded = sum(b for name, b in breakdown if name.startswith(SHARDED_ROWS))
    return int(total - sharded + sharded / ranks + 2 * sharded / max(layers, 1))


def multicast_guard_check(run: RunPlan, machine: Machine,
                          environ: Mapping[str, str] | None = None) -> Check | None:
    """NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 keep the ranks off
    NVLink multicast; set here, the launcher passes them to every rank unchanged."""
    recipe, precision = run.recipe, run.precision
    if recipe.distributed.strategy == "none" or precision.device != "cuda":
        return None
    env = os.environ if environ is None else environ
    found = ", ".join(f"{k}={env[k]}" for k in MULTICAST_GUARDS if k in env) or "none set"
    title = "NVLink multicast guards for the ranks"
    if all(k in env for k in MULTICAST_GUARDS):
        return Check("recipe.distributed.multicast", "pass", title,
                     f"{found}: passed through to every launched rank", sources=MULTICAST_SOURCES, found=found,
                     expected="passed through when set")
    return Check("recipe.distributed.multicast", "pass", title,
                 f"{found}: the ranks use NCCL's defaults (NVLink SHARP/multicast where the system offers it); "
                 "whatever is set in this shell is passed through to every rank",
                 sources=MULTICAST_SOURCES, found=found, expected="passed through when set")


def fsdp_checkpoint_check(run: RunPlan, machine: Machine) -> Check | None:
    """fsdp checkpoints: the product's own (trainer/fsdp_state.py; the Trainer's FSDP checkpoint of a LoRA model
    crashes or holds an empty adapter, rule fsdp-peft-trainer-checkpoint); `--resume` needs the process count
    that wrote them, since each rank's optimizer state covers its own shards."""
    recipe = run.recipe
    if recipe.distributed.strategy != "fsdp":
        return None
    strategy = recipe.training.save_strategy
    detail = ("no intermediate checkpoints; rank 0 writes the adapter at the end" if strategy == "no" else
              f"save_strategy: {strategy}: each checkpoint holds the LoRA tensors gathered to rank 0 "
              "(adapter_model.safetensors) and every rank's optimizer state (optimizer.rankR-of-W.pt); "
              "`--resume` needs the same distributed.num_processes that wrote them")
    return Check("recipe.distributed.checkpoints", "pass", "Training checkpoints under fsdp (training.save_strategy)",
                 detail, found=f"save_strategy: {strategy}", expected="any")


DISTRIBUTED_CHECKS = (distributed_gpus_check, nccl_check, strategy_check, fsdp_checkpoint_check,
                      multicast_guard_check)

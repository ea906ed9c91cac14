"""One run, decided once: everything `qlora-doctor run` settles before anything is loaded, handed to the
trainer (and, as JSON, to every launched rank) as data.

    plan = build_run_plan(recipe, machine, env, resume=..., overwrite=..., where=...)
    report = diagnose(machine, env, run_plan=plan)      # the CLI gates on it
    run_training(plan, machine, report, ...)             # qlora_doctor/trainer/train.py

A RunPlan holds the recipe with `auto`s resolved (checkpointed layers by the memory planner, once),
the precision, the speed levers as far as they can be decided before loading, the knowledge base's
workarounds that fire, the process count, and the output-folder decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_doctor.core.errors import InputError
from qlora_doctor.core.hazards import AttentionHazard
from qlora_doctor.core.rundir import OutputPlan, plan_output_dir

if TYPE_CHECKING:
    from qlora_doctor.core.environment import Environment
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.memory.plan import Plan
    from qlora_doctor.recipe.levers import SpeedPlan
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe


MULTICAST_GUARDS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
"""Environment variables that keep NCCL/torch/NVSHMEM off NVLink multicast; passed through when set."""


def resolve_num_processes(recipe: Recipe, machine: Machine, where: str) -> int:
    """`distributed.num_processes` with `auto` decided: every NVIDIA GPU of the machine."""
    wanted = recipe.distributed.num_processes
    if wanted != "auto":
        return int(wanted)
    count = len(machine.nvidia_gpus)
    if count == 0:
        raise InputError(f"{where}: distributed.num_processes: auto found no NVIDIA GPU on this machine; set "
                         "`distributed.num_processes: N` (with --print-launch for another machine) or "
                         "`distributed.strategy: none`")
    return count


@dataclass(frozen=True)
class RunPlan:
    """Everything decided for one run before anything heavy is loaded."""

    recipe: Recipe
    """The recipe, with `performance.checkpoint_layers: auto` and `selective_layers: auto` replaced by the
    planner's choice."""
    where: str
    """The recipe's file (or name), for messages."""
    precision: Precision
    levers: SpeedPlan
    """The `performance:` levers as decided before loading (model type from the config where it can be read
    without a download); the trainer refines the few that depend on the loaded model (attention kernel)."""
    cudnn_hazards: tuple[AttentionHazard, ...] | None
    """Knowledge-base rules with the cuDNN-attention workaround that fire here (None: not on CUDA)."""
    num_processes: int | None
    """Processes to launch: 1 for `distributed.strategy: none`; None when `auto` finds no GPU."""
    output: OutputPlan | None = None
    """The output-folder decision (None for `check --recipe`, which writes nothing)."""
    memory: Plan | None = field(default=None, compare=False)
    """The memory planner's prediction for the smallest GPU (None: not planned, see memory_error)."""
    memory_error: str | None = None
    """Why the memory could not be planned (config unreadable offline, torch missing); None when planned
    or when planning was not needed (no NVIDIA GPU and no `auto` to resolve)."""

    def levers_for_model(self, model: Any) -> SpeedPlan:
        """The levers with the loaded model's facts (its model type and attention implementation)."""
        return levers_for_loaded(self.recipe, self.precision, model, self.cudnn_hazards)

    def to_json(self) -> dict[str, Any]:
        """The plan as data for the launched ranks (and the manifest); `from_json` reads it back."""
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "where": self.where,
            "precision": asdict(self.precision),
            "cudnn_hazards": [h.to_json() for h in self.cudnn_hazards] if self.cudnn_hazards is not None else None,
            "num_processes": self.num_processes,
            "output": None if self.output is None else {
                "output_dir": str(self.output.output_dir), "replace_existing": self.output.replace_existing,
                "resume_from": str(self.output.resume_from) if self.output.resume_from else None},
            "memory_error": self.memory_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        """A plan a parent decided (to_json), as a launched rank receives it: nothing is decided again."""
        from qlora_doctor.recipe.levers import speed_plan
        from qlora_doctor.recipe.precision import Precision
        from qlora_doctor.recipe.schema import Recipe

        recipe = Recipe.model_validate(data["recipe"])
        precision = Precision(**data["precision"])
        hazards = (tuple(AttentionHazard.from_json(h) for h in data["cudnn_hazards"])
                   if data["cudnn_hazards"] is not None else None)
        out = data.get("output")
        output = None if out is None else OutputPlan(
            Path(out["output_dir"]), replace_existing=out["replace_existing"],
            resume_from=Path(out["resume_from"]) if out["resume_from"] else None)
        return cls(recipe=recipe, where=data["where"], precision=precision,
                   levers=speed_plan(recipe, precision, None, cudnn_hazards=hazards), cudnn_hazards=hazards,
                   num_processes=data["num_processes"], output=output, memory_error=data.get("memory_error"))


def build_run_plan(recipe: Recipe, machine: Machine, env: Environment | None = None, *, where: str,
                   resume: bool = False, overwrite: bool = False, decide_output: bool = False) -> RunPlan:
    """Decide everything for running `recipe` on `machine` with the packages of `env` (default: the installed
    ones): precision, the memory plan (once: it also resolves `checkpoint_layers: auto`), the levers, the
    workarounds that fire, the process count and (`decide_output`) the output folder against
    --resume/--overwrite (InputError, exit 2, before anything is loaded or deleted).

    The planner reads only the model's config, offline (builtin, local folder or the local Hugging Face
    cache): a hub model not yet cached is not planned (`memory_error` says so) and `auto` checkpointing
    then means all layers."""
    from qlora_doctor.core.errors import DoctorError
    from qlora_doctor.recipe.levers import recipe_model_type, speed_plan
    from qlora_doctor.recipe.precision import resolve_precision

    output = (plan_output_dir(Path(recipe.training.output_dir), resume, overwrite, where, recipe.training.max_steps)
              if decide_output else None)
    precision = resolve_precision(recipe, machine)
    # Judging a described environment (check -r): its packages decide the levers, never this machine's.
    described = env.installed("liger-kernel") if env is not None and env.source != "installed" else None
    torchao_described = env.installed("torchao") if env is not None and env.source != "installed" else None
    memory, memory_error = None, None
    perf = recipe.performance
    if not machine.nvidia_gpus and (perf.offload_checkpoints == "auto" or perf.recompute == "auto"):
        # Nothing to offload without a GPU, and selective recompute alone is memory for speed: decided unplanned.
        perf = perf.model_copy(update={
            "offload_checkpoints": False if perf.offload_checkpoints == "auto" else perf.offload_checkpoints,
            "recompute": "full" if perf.recompute == "auto" else perf.recompute})
        recipe = recipe.model_copy(update={"performance": perf})
    auto_layers = perf.checkpoint_layers == "auto"
    auto_selective = perf.recompute in ("selective", "auto") and perf.selective_layers == "auto"
    auto_offload = perf.offload_checkpoints == "auto" or perf.recompute == "auto"
    if machine.nvidia_gpus or auto_layers or auto_selective or auto_offload:
        from qlora_doctor.memory.plan import plan_recipe

        try:
            memory = plan_recipe(recipe, machine, allow_network=False, liger_described=described)
        except DoctorError as err:  # config unreadable offline, or torch/transformers missing
            memory_error = "; ".join(err.messages)
    if auto_layers or auto_selective or auto_offload:
        # Without a plan (the model's config unreadable offline) `auto` layers mean all of them.
        update: dict[str, object] = {}
        if auto_layers:
            update["checkpoint_layers"] = memory.settings.checkpoint_layers if memory is not None else "all"
        if auto_selective:
            update["selective_layers"] = memory.settings.selective_layers if memory is not None else "all"
        # offload_checkpoints/recompute auto without a plan stay `auto`: the trainer decides them once the model is
        # loaded (levers_for_loaded), from its config and this host's memory.
        if memory is not None:
            update.update(_offload_decided(perf, memory.settings))
        recipe = recipe.model_copy(update={"performance": perf.model_copy(update=update)})
    hazards = None
    if precision.device == "cuda":
        from qlora_doctor.knowledge.workarounds import cudnn_attention_hazards

        if env is None:
            from qlora_doctor.sources.installed import installed_environment

            env = installed_environment(with_conflicts=False)
        hazards = cudnn_attention_hazards(machine, env)
    levers = speed_plan(recipe, precision, recipe_model_type(recipe), cudnn_hazards=hazards,
                        liger_described=described, torchao_described=torchao_described)
    processes = 1 if recipe.distributed.strategy == "none" else (
        int(recipe.distributed.num_processes) if recipe.distributed.num_processes != "auto"
        else (len(machine.nvidia_gpus) or None))
    return RunPlan(recipe=recipe, where=where, precision=precision, levers=levers, cudnn_hazards=hazards,
                   num_processes=processes, output=output, memory=memory, memory_error=memory_error)


def levers_for_loaded(recipe: Recipe, precision: Precision, model: Any,
                      cudnn_hazards: tuple[AttentionHazard, ...] | None = None, machine: Machine | None = None) -> SpeedPlan:
    """recipe/levers.py plan_for_model for a loaded model, after deciding `offload_checkpoints` or `recompute` still
    `auto` (the run plan could not read the model's config before the download) as the memory planner would have:
    from the loaded model's config and `machine`'s host memory (default: this machine, probed)."""
    from qlora_doctor.recipe.levers import plan_for_model

    return plan_for_model(decided_for_loaded(recipe, precision, model, machine), precision, model, cudnn_hazards)


def decided_for_loaded(recipe: Recipe, precision: Precision, model: Any, machine: Machine | None = None) -> Recipe:
    """The recipe with offload_checkpoints/recompute `auto` decided for a loaded model (memory/plan.py
    resolve_offload); unchanged where nothing is `auto` or the config cannot be counted."""
    from qlora_doctor.core.errors import DoctorError
    from qlora_doctor.memory import plan as memory_plan
    from qlora_doctor.memory.model import count_parameters

    perf, config = recipe.performance, getattr(model, "config", None)
    if config is None or (perf.offload_checkpoints != "auto" and perf.recompute != "auto"):
        return recipe
    if machine is None:
        from qlora_doctor.sources.machine import probe_machine

        machine = probe_machine()
    try:
        counts = count_parameters(config.to_dict(), where=f"model {recipe.model.name_or_path}")
        settings = memory_plan.settings_from_recipe(recipe, machine, model_type=getattr(config, "model_type", None))
    except DoctorError:
        return recipe
    refused = memory_plan.offload_refused(recipe, machine) if precision.device == "cuda" else "no NVIDIA GPU"
    settings, _ = memory_plan.resolve_offload(counts, settings, perf.offload_checkpoints, perf.recompute, machine,
                                              processes=memory_plan.ranks(recipe, machine), refused=refused)
    return recipe.model_copy(update={"performance": perf.model_copy(update=_offload_decided(perf, settings))})


def _offload_decided(perf: Any, settings: Any) -> dict[str, Any]:
    """The recipe's `performance:` fields offload_checkpoints/recompute that were `auto`, as `settings` decided them."""
    update: dict[str, Any] = {}
    if perf.offload_checkpoints == "auto":
        update["offload_checkpoints"] = settings.offload_checkpoints
    if perf.recompute == "auto":
        update["recompute"] = settings.recompute
    return update

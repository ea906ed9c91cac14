"""Train a QLoRA adapter with the transformers Trainer, following a RunPlan, and write everything
qlora_doctor/core/rundir.py lists.

The caller (the CLI) has already, before anything is loaded or deleted:
  1. decided the run plan, including the output folder against --resume/--overwrite (InputError, exit 2);
  2. run the doctor's checks on that plan and refused a failing one (RunRefused, exit 1) unless --skip-check.
`run_training` then replaces the folder (--overwrite), writes a `running` manifest, loads, trains, saves.
The trainer never runs the doctor: it records the report it is handed.

Under `accelerate launch` (distributed.strategy ddp/fsdp, see trainer/distributed.py) every rank runs
`run_training` with the parent's plan and report, received as data, and only rank 0 writes files.

`build_training(run, ...)` is the seam the benchmarks use: the tokenizer, datasets, model and Trainer a
run would train, with the model loader replaceable.

SIGTERM during training makes the Trainer save a checkpoint at the end of the current step and stop;
the run then ends with status `stopped` and `--resume` continues it. With `training.watch` (the default)
trainer/watch.py judges the log as it comes: a NaN or diverging loss saves a checkpoint and stops the run
with status `diverged` and a diagnosis (metrics.json and manifest.json `watch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from qlora_doctor import __version__
from qlora_doctor.trainer import outputs

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.core.report import Report
    from qlora_doctor.recipe.levers import SpeedPlan
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe
    from qlora_doctor.runplan import RunPlan


@dataclass(frozen=True)
class RunResult:
    """What a finished (or stopped) run produced."""

    output_dir: Path
    status: Literal["completed", "stopped", "diverged"]
    """`stopped`: a SIGTERM saved a checkpoint and ended training early; continue with --resume.
    `diverged`: the watchdog (trainer/watch.py) stopped a NaN or diverging loss; `watch` says why."""
    stopped_by: str | None
    """The signal that stopped training (`SIGTERM`, `SIGINT`), None when it ran to the end."""
    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    eval_loss_before: float | None
    """Eval loss of the base model (LoRA adds nothing before training); None without eval data."""
    eval_loss_after: float | None
    """Eval loss with the trained adapter; None without eval data or when stopped."""
    train_tokens_per_second: float | None
    """Non-padding tokens trained per second of optimizer steps (evaluation and saving excluded)."""
    wall_seconds: float
    """From the start of the command to the last file written, loading and checks included."""
    resumed_from: Path | None
    skip_check: bool
    check_status: str
    """The doctor report's status (pass, warn or fail), also when --skip-check ignored a failure."""
    files: tuple[str, ...]
    """The files written into output_dir (names relative to it)."""
    watch: dict[str, Any] | None = None
    """The watchdog's diagnosis (metrics.json `watch`); None when training.watch is off."""


ModelLoader = Callable[["Recipe", "Precision", str, "SpeedPlan"], Any]
"""(recipe, precision, checkpoint path, levers) -> the base model prepared and wrapped with LoRA."""


def run_training(run: RunPlan, machine: Machine, report: Report, *, skip_check: bool = False,
                 command: str = "qlora-doctor run", model_loader: ModelLoader | None = None) -> RunResult:
    """Train as `run` says on `machine` and write its output folder; `report` is the doctor's report the
    run was gated on (recorded in doctor-report.json and the manifest). `model_loader`: see build_training."""
    from qlora_doctor.trainer.ranks import rank_info

    started = time.perf_counter()
    started_at = _now()
    main = rank_info().is_main
    if run.output is None:
        raise ValueError("run_training needs a run plan with its output folder decided (decide_output=True)")
    plan = run.output
    recipe, precision = run.recipe, run.precision
    out = plan.output_dir
    manifest = _manifest(recipe, machine, precision, command, started_at, skip_check, report, plan)
    if main:
        if plan.replace_existing:
            outputs.clear_output_dir(plan.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        outputs.write_json(out / outputs.MANIFEST, manifest)
        outputs.write_json(out / outputs.REPORT, report.to_json())
        outputs.write_atomic(out / outputs.LOCKFILE, outputs.lockfile_text(__version__, command))
        outputs.write_atomic(out / outputs.RECIPE, resolved_recipe_yaml(recipe, precision, machine, command))

    try:
        trained = _train(run, model_loader)
    except BaseException as err:
        # The folder says what happened: a run that failed (bad data, unreachable hub, a crash) is
        # `failed` with its error, and a folder without checkpoints is reused by the next run.
        if main:
            from qlora_doctor.core.errors import DoctorError

            message = "; ".join(err.messages) if isinstance(err, DoctorError) else f"{type(err).__name__}: {err}"
            status = "stopped" if isinstance(err, KeyboardInterrupt) else "failed"
            manifest.update(status=status, finished_at=_now(), error=message[-2000:],
                            wall_seconds=round(time.perf_counter() - started, 2))
            outputs.write_json(out / outputs.MANIFEST, manifest)
        raise

    def save_adapter(tmp: Path) -> None:
        # FSDP: the adapter from the LoRA tensors gathered from the shards (same files as a one-GPU run);
        # else peft's save of the model's own.
        if trained.lora_tensors:
            outputs.save_adapter_from_state_dict(trained.model, trained.lora_tensors, tmp)
        else:
            trained.model.save_pretrained(tmp)
        trained.tokenizer.save_pretrained(tmp)
        outputs.make_adapter_portable(tmp, recipe)

    if not main:  # the other ranks trained and took part in gathering; rank 0 writes
        return RunResult(output_dir=out, status=trained.status, stopped_by=trained.metrics["stopped_by"],
                         steps=trained.metrics["steps"], eval_loss_before=trained.metrics["eval_loss_before"],
                         eval_loss_after=trained.metrics["eval_loss_after"],
                         train_tokens_per_second=trained.metrics["train_tokens_per_second"],
                         wall_seconds=time.perf_counter() - started, resumed_from=plan.resume_from,
                         skip_check=skip_check, check_status=report.status, files=(),
                         watch=trained.metrics.get("watch"))
    written = outputs.save_dir_atomic(out, save_adapter)
    wall = time.perf_counter() - started
    metrics = {**trained.metrics, "wall_seconds": round(wall, 2)}
    outputs.write_json(out / outputs.METRICS, metrics)
    outputs.plot_losses(out / outputs.LOSS_PLOT, metrics["train_loss_history"], metrics["eval_history"],
                        metrics["eval_loss_before"], metrics["eval_loss_after"],
                        f"{recipe.model.name_or_path}, LoRA r={recipe.lora.r}, {metrics['steps']} steps")
    manifest.update(status=trained.status, finished_at=_now(), wall_seconds=round(wall, 2),
                    watch=metrics.get("watch"))
    outputs.write_json(out / outputs.MANIFEST, manifest)
    outputs.write_atomic(out / outputs.MODEL_CARD, outputs.model_card(recipe, metrics, manifest, __version__))
    files = sorted({p.name for p in written} | {outputs.MANIFEST, outputs.REPORT, outputs.LOCKFILE, outputs.MODEL_CARD,
                                                 outputs.RECIPE, outputs.METRICS, outputs.LOSS_PLOT})
    return RunResult(output_dir=out, status=trained.status, stopped_by=metrics["stopped_by"], steps=metrics["steps"],
                     eval_loss_before=metrics["eval_loss_before"], eval_loss_after=metrics["eval_loss_after"],
                     train_tokens_per_second=metrics["train_tokens_per_second"], wall_seconds=wall,
                     resumed_from=plan.resume_from, skip_check=skip_check, check_status=report.status,
                     files=tuple(files), watch=metrics.get("watch"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _manifest(recipe: Recipe, machine: Machine, precision: Precision, command: str, started_at: str,
              skip_check: bool, report: Report, plan: outputs.OutputPlan) -> dict[str, Any]:
    import platform

    from qlora_doctor.recipe.builtin import is_builtin

    return {
        "tool": "qlora-doctor",
        "tool_version": __version__,
        "command": command,
        "status": "running",
        "started_at": started_at,
        "finished_at": None,
        "skip_check": skip_check,
        "check_status": report.status,
        "failed_checks": [c.id for c in report.failed],
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
        "model": recipe.model.name_or_path,
        "builtin_model": is_builtin(recipe.model.name_or_path),
        "base_model_path": _local_base_path(recipe.model.name_or_path),
        "revision": recipe.model.revision,
        "precision": {"device": precision.device, "fp16": precision.fp16, "bf16": precision.bf16,
                      "compute_dtype": precision.compute_dtype, "reason": precision.reason},
        "machine": machine.to_json(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _local_base_path(name_or_path: str) -> str | None:
    """Where the base model's weights were read from on this machine (the builtin's converted checkpoint)."""
    from qlora_doctor.recipe.builtin import is_builtin

    if is_builtin(name_or_path):
        from qlora_doctor.trainer.builtin import checkpoint_dir

        return str(checkpoint_dir(name_or_path))
    return None


def resolved_recipe_yaml(recipe: Recipe, precision: Precision, machine: Machine, command: str) -> str:
    """The recipe as run: paths absolute, `auto` precision replaced by what was chosen for `machine`."""
    import yaml

    data = recipe.model_dump(mode="json")
    data["quantization"]["bnb_4bit_compute_dtype"] = precision.compute_dtype
    data["training"]["fp16"] = precision.fp16
    data["training"]["bf16"] = precision.bf16
    header = (f"# The recipe as run by `{command}` (qlora-doctor {__version__}).\n"
              f"# Paths are absolute; fp16/bf16/compute dtype were resolved for this machine: {precision.reason}.\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# --- training -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Trained:
    model: Any
    tokenizer: Any
    status: Literal["completed", "stopped", "diverged"]
    metrics: dict[str, Any]
    lora_tensors: dict[str, Any] | None = None
    """FSDP: the LoRA tensors gathered from the shards on rank 0 (fsdp_state.gather_lora_state_dict)."""


@dataclass(frozen=True)
class Training:
    """What `build_training` made for a run: everything `trainer.train()` needs, and what it was made from."""

    trainer: Any
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    levers: SpeedPlan
    """The run plan's levers refined with the loaded model's facts (model type, attention kernel)."""
    gpus: GpuUse
    callbacks: tuple[Any, ...]


def build_training(run: RunPlan, *, model_loader: ModelLoader | None = None, callbacks: tuple[Any, ...] = (),
                   trainer_kwargs: dict[str, Any] | None = None) -> Training:
    """The tokenizer, datasets, LoRA model and Trainer for `run`, exactly as `run_training` trains them.
    `model_loader` replaces trainer/model.py's load_for_training (a benchmark loading a random-weight
    model, say); `callbacks` are added to the Trainer's; `trainer_kwargs` override TrainingArguments."""
    import os

    from transformers import Trainer

    from qlora_doctor.trainer import speed
    from qlora_doctor.trainer.arguments import integration_environment, training_arguments_kwargs
    from qlora_doctor.trainer.builtin import resolve_model_path
    from qlora_doctor.trainer.collate import make_collator
    from qlora_doctor.trainer.data import build_datasets
    from qlora_doctor.trainer.model import load_for_training, load_tokenizer

    recipe, precision = run.recipe, run.precision
    path = resolve_model_path(recipe.model.name_or_path)
    tokenizer = load_tokenizer(path, recipe.model.revision, recipe.model.trust_remote_code)
    train_ds, eval_ds = build_datasets(recipe, tokenizer)
    model = (model_loader or load_for_training)(recipe, precision, path, run.levers)
    speed_plan = run.levers_for_model(model)

    kwargs = training_arguments_kwargs(recipe, precision)
    os.environ.update(integration_environment(recipe))  # the project, for integrations that read it from there
    if eval_ds is None:
        kwargs["eval_strategy"] = "no"
    speed.apply_process_settings(speed_plan, precision.device)
    kwargs.update(speed.training_arguments_overrides(speed_plan))  # the model's checkpointing is set already
    args, gpus = training_arguments(
        recipe, precision,
        **kwargs,
        # PeftModel.forward takes **kwargs, so the Trainer cannot see that it accepts labels and
        # would skip the eval loss without this.
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        **(trainer_kwargs or {}),
    )
    trainer_class = Trainer
    if recipe.distributed.strategy == "fsdp":  # checkpoints the Trainer's FSDP paths cannot write (fsdp_state.py)
        from qlora_doctor.trainer.fsdp_state import fsdp_qlora_trainer_class

        trainer_class = fsdp_qlora_trainer_class()
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=make_collator(speed_plan, tokenizer), processing_class=tokenizer,
                            callbacks=list(callbacks))
    return Training(trainer=trainer, model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
                    levers=speed_plan, gpus=gpus, callbacks=tuple(callbacks))


def _train(run: RunPlan, model_loader: ModelLoader | None = None) -> _Trained:
    from qlora_doctor.trainer.callbacks import StopOnSignal, Throughput

    recipe, precision, plan = run.recipe, run.precision, run.output
    assert plan is not None
    stop = StopOnSignal()
    throughput = Throughput()
    callbacks: list[Any] = [stop, throughput]
    watchdog = None
    trainer_kwargs: dict[str, Any] = {}
    if recipe.training.watch:
        from qlora_doctor.trainer.watch import WatchSettings, watchdog_callback

        watchdog = watchdog_callback(WatchSettings.from_recipe(
            recipe, fp16=precision.fp16 or precision.compute_dtype == "float16"))
        callbacks.append(watchdog)
        # The Trainer would log the mean of the earlier losses in place of a NaN one; the watchdog must see it.
        trainer_kwargs["logging_nan_inf_filter"] = False
    training = build_training(run, model_loader=model_loader, callbacks=tuple(callbacks),
                              trainer_kwargs=trainer_kwargs)
    trainer, tokenizer, train_ds, eval_ds = (training.trainer, training.tokenizer, training.train_dataset,
                                             training.eval_dataset)
    speed_plan, gpus, args = training.levers, training.gpus, training.trainer.args
    from qlora_doctor.trainer.faults import install_fault

    install_fault(trainer)  # test-only seam (tests/test_interrupt.py); inert unless QLORA_DOCTOR_FAULT is set
    # FSDP: an evaluate() before train() would wrap the model without peft's LoRA wrap policy (that
    # transformers applies in train()), mixing float32 adapters into bf16 flat parameters; skip it.
    eval_before = trainer.evaluate()["eval_loss"] if eval_ds is not None and not trainer.is_fsdp_enabled else None
    _reset_peak_memory(precision)
    with stop.installed():
        trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    status: Literal["completed", "stopped", "diverged"] = (
        "stopped" if stop.signal_name else "diverged" if watchdog is not None and watchdog.stopped else "completed")
    history = trainer.state.log_history
    eval_after = None
    if eval_ds is not None and status == "completed":
        # The Trainer often evaluated at the last step already (eval_steps divides it): reuse that.
        last_eval = next((r for r in reversed(history) if "eval_loss" in r), None)
        if last_eval is not None and last_eval["step"] == trainer.state.global_step:
            eval_after = last_eval["eval_loss"]
        else:
            eval_after = trainer.evaluate()["eval_loss"]
            history = trainer.state.log_history

    lora_tensors, gather_seconds = None, None
    if trainer.is_fsdp_enabled:  # a collective: every rank gathers, rank 0 receives the LoRA tensors (on the CPU)
        from qlora_doctor.trainer.fsdp_state import gather_lora_state_dict

        gather_started = time.perf_counter()
        lora_tensors = gather_lora_state_dict(trainer.model_wrapped) or None
        gather_seconds = round(time.perf_counter() - gather_started, 2)
    world = args.world_size
    metrics = {
        "status": status,
        "world_size": world,
        "distributed_strategy": recipe.distributed.strategy,
        "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "stopped_by": stop.signal_name,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "eval_loss_before": _round(eval_before),
        "eval_loss_after": _round(eval_after),
        "train_loss_history": [{"step": r["step"], "loss": _finite_or_none(r["loss"]),
                                "learning_rate": r.get("learning_rate"), "epoch": r.get("epoch"),
                                "grad_norm": _finite_or_none(r.get("grad_norm"))} for r in history if "loss" in r],
        "eval_history": [{"step": r["step"], "eval_loss": _finite_or_none(r["eval_loss"])} for r in history
                         if "eval_loss" in r],
        "train_tokens": throughput.tokens,
        "train_step_seconds": round(throughput.seconds, 2),
        "train_tokens_per_second": round(throughput.tokens / throughput.seconds, 1) if throughput.seconds else None,
        "train_step_history": throughput.steps,
        "gpus": gpus.to_json(),
        "peak_memory": peak_memory(precision),
        "performance": speed_plan.to_json(),
        "adapter_gather_seconds": gather_seconds,
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
        "watch": watchdog.to_json() if watchdog is not None else {"enabled": False},
    }
    model = trainer.accelerator.unwrap_model(trainer.model) if trainer.is_fsdp_enabled else trainer.model
    return _Trained(model=model, tokenizer=tokenizer, status=status, metrics=metrics, lora_tensors=lora_tensors)


@dataclass(frozen=True)
class GpuUse:
    """The GPUs a run's process could see and those it trained on (metrics.json `gpus`)."""

    strategy: str
    """The recipe's distributed.strategy."""
    visible: int
    """CUDA devices this process sees (torch.cuda.device_count(), after CUDA_VISIBLE_DEVICES); 0 on the CPU."""
    used: int
    """GPUs of this host that trained: 1 for strategy none, the launched ranks here for ddp/fsdp; 0 on the CPU."""
    trainer_n_gpu: int
    """TrainingArguments.n_gpu as the Trainer used it: 1 on a GPU, 0 on the CPU. More would mean each
    micro-batch holds n_gpu x per_device_train_batch_size rows and the loss is multiplied by n_gpu."""

    @property
    def idle(self) -> int:
        return max(self.visible - self.used, 0)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"visible": self.visible, "used": self.used, "idle": self.idle,
                                "trainer_n_gpu": self.trainer_n_gpu}
        if self.idle:
            how = ("`distributed.strategy: ddp` trains on all of them" if self.strategy == "none"
                   else "`distributed.num_processes: auto` starts one process per GPU")
            data["note"] = f"{self.idle} of the {self.visible} visible GPUs stayed unused; {how}"
        return data


def training_arguments(recipe: Recipe, precision: Precision, **kwargs: Any) -> tuple[Any, GpuUse]:
    """`transformers.TrainingArguments(**kwargs)` for this run, trained on one GPU unless launched.

    `distributed.strategy: none` trains in one process on GPU 0 (trainer/model.py loads the model there).
    Started without a launcher on a machine with several visible GPUs, TrainingArguments counts them all
    (`_setup_devices`: `self._n_gpu = torch.cuda.device_count()`, transformers 5.17 and 5.24 alike) and the
    Trainer takes the run for torch.nn.DataParallel: every micro-batch holds per_device_train_batch_size
    x n_gpu rows (`train_batch_size`), the loss is multiplied by n_gpu (`compute_loss`, under the default
    average_tokens_across_devices) and an unquantized model is wrapped in DataParallel. On two H100s that
    trained twice the recipe's batch on GPU 0 and logged twice the loss (bench/results/distributed_h100x2).

    So n_gpu is pinned to 1, as transformers does itself for model-parallel models (Trainer.__init__:
    `self.args._n_gpu = 1`). Reading `args.n_gpu` first runs the device setup, which is cached and would
    otherwise overwrite the pin. This holds however early CUDA was initialised in this process; narrowing
    CUDA_VISIBLE_DEVICES instead works only before torch first counts the devices (the doctor's checks, or a
    caller of run_recipe, may have done that already) and would override the user's own choice of GPU."""
    import os

    import torch
    from transformers import TrainingArguments

    args = TrainingArguments(**kwargs)
    visible = torch.cuda.device_count() if precision.device == "cuda" else 0
    if recipe.distributed.strategy == "none":
        if args.n_gpu > 1:
            args._n_gpu = 1
        used = min(visible, 1)
    else:
        used = min(visible, int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size)))
    return args, GpuUse(strategy=recipe.distributed.strategy, visible=visible, used=used, trainer_n_gpu=args.n_gpu)


def _finite_or_none(value: Any) -> Any:
    """A logged number for JSON: NaN and infinity (not JSON) become null."""
    import math

    return None if isinstance(value, float) and not math.isfinite(value) else value


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 5)


def _reset_peak_memory(precision: Precision) -> None:
    if precision.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(precision: Precision) -> dict[str, Any]:
    """Peak GPU memory of training (allocated and reserved by torch) on CUDA; the process's peak
    resident memory on the CPU."""
    if precision.device == "cuda":
        import torch

        return {"device": "cuda", "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                "max_memory_reserved_bytes": torch.cuda.max_memory_reserved()}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"device": "cpu", "max_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}

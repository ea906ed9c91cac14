"""Whether a run fits the GPU, and what would make it fit: `qlora-doctor plan` and the doctor's
memory-fit check.

The GPU judged is the machine's smallest NVIDIA GPU (`--machine FILE`, else the probe): training runs on
one GPU, and on a mixed machine the smallest is the one that can run out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from qlora_doctor.memory.estimate import GIB, TrainSettings, checkpointed_layers, estimate, offload_host_bytes
from qlora_doctor.memory.model import ModelCounts, count_parameters, load_model_config

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.recipe.schema import Recipe

AUTO_CHECKPOINT_SHARE = 0.85
"""`performance.checkpoint_layers: auto` keeps the predicted total within this share of the GPU's memory
(the planner's measured error is under 10%)."""
SEQ_STEP = 128
"""Suggested sequence lengths are multiples of this (tensor-core and tokenizer-friendly)."""
FALLBACK_OPTIMIZER = "paged_adamw_8bit"
"""The optimizer suggested when the recipe's needs more memory: 8-bit states that can page out."""


@dataclass(frozen=True)
class Suggestion:
    """One change to the recipe that the planner predicts makes the run fit (or brings it closer)."""

    kind: str
    """`micro_batch`, `seq_len`, `eval_batch`, `gradient_checkpointing`, `recompute`, `optimizer` or `gpu`."""
    text: str
    """The advice, in one sentence."""
    changes: tuple[tuple[str, Any], ...]
    """Recipe keys and their new values, e.g. (("training.per_device_train_batch_size", 2), ...)."""
    total_bytes: int
    """Predicted GPU memory with the change."""
    fits: bool
    """Whether the change alone makes the run fit."""


@dataclass(frozen=True)
class Plan:
    """A run's predicted peak GPU memory, judged against one GPU."""

    model: str
    """The model as the recipe names it."""
    settings: TrainSettings
    """The memory-relevant settings the prediction is for."""
    parameters: int
    """The base model's parameter count."""
    trainable_parameters: int
    """LoRA parameters."""
    num_layers: int
    """The model's decoder layers."""
    tied_embeddings: bool
    """lm_head shares the input embeddings' weight."""
    breakdown: tuple[tuple[str, int], ...]
    """(what, bytes) alive at the peak; sums to total_bytes."""
    peak_allocated_bytes: int
    """Predicted torch.cuda.max_memory_allocated."""
    peak_reserved_bytes: int
    """Predicted torch.cuda.max_memory_reserved."""
    reserved_at_start_bytes: int
    """Predicted torch.cuda.memory_reserved when training starts (weights, LoRA weights, workspaces and the
    allocator cache left by loading): the reserved peak is never below it."""
    total_bytes: int
    """Predicted GPU memory in use at the peak: reserved + the CUDA context (+ paged optimizer states)."""
    peak_phase: str
    """Where the reserved peak is: `loss` (logits), `backward`, `recompute` (a checkpointed layer's backward),
    `optimizer step`, `eval`, or `start` (the step fits in what is reserved when training starts)."""
    calibration: str
    """`plain` or `fast`: which measured path the run takes (estimate.calibration_path)."""
    gpu_name: str | None
    """The GPU judged; None without an NVIDIA GPU."""
    gpu_bytes: int | None
    """Its total memory; None when unknown or without a GPU."""
    fits: bool | None
    """total_bytes <= gpu_bytes; None when gpu_bytes is unknown."""
    suggestions: tuple[Suggestion, ...]
    """When it does not fit: changes predicted to make it fit, most useful first."""
    notes: tuple[str, ...]
    """What the prediction does not cover, or assumed."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"]["lora_targets"] = (self.settings.lora_targets if isinstance(self.settings.lora_targets, str)
                                            else list(self.settings.lora_targets))
        data["breakdown"] = [{"name": n, "bytes": b} for n, b in self.breakdown]
        data["suggestions"] = [{**asdict(s), "changes": dict(s.changes)} for s in self.suggestions]
        data["notes"] = list(self.notes)
        return data


def smallest_gpu(machine: Machine) -> tuple[str | None, int | None]:
    """(name, bytes) of the machine's NVIDIA GPU with the least memory; bytes None when any is unknown."""
    gpus = machine.nvidia_gpus
    if not gpus:
        return None, None
    if any(g.memory_total_mib is None for g in gpus):
        unknown = next(g for g in gpus if g.memory_total_mib is None)
        return unknown.name, None
    gpu = min(gpus, key=lambda g: g.memory_total_mib or 0)
    return gpu.name, (gpu.memory_total_mib or 0) * 2**20


def settings_from_recipe(recipe: Recipe, machine: Machine, model_type: str | None = None,
                         attn_implementation: str | None = None, liger_described: bool | None = None) -> TrainSettings:
    """The recipe's memory-relevant settings for `machine`: `auto` precision resolved as the trainer
    resolves it, and the `performance:` levers decided by `recipe/levers.py`'s speed_plan, as the run plan decides them (with the
    model's type: `model_type`, else read from a builtin or local model's config as `check --recipe` does).
    Liger's decision depends on this Python environment (is liger-kernel installed), as the trainer's does
    where it runs."""
    from qlora_doctor.recipe import levers as speed
    from qlora_doctor.recipe.precision import resolve_precision

    precision = resolve_precision(recipe, machine)
    levers = speed.speed_plan(recipe, precision, model_type or speed.recipe_model_type(recipe), attn_implementation,
                              liger_described=liger_described)
    q, lora, t = recipe.quantization, recipe.lora, recipe.training
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    return TrainSettings(
        micro_batch=t.per_device_train_batch_size, seq_len=t.max_seq_length,
        grad_accum=t.gradient_accumulation_steps, gradient_checkpointing=levers.checkpointing.on,
        optim=t.optim, lora_r=lora.r, lora_targets=targets, lora_dropout=lora.lora_dropout,
        load_in_4bit=q.load_in_4bit, double_quant=q.bnb_4bit_use_double_quant,
        compute_dtype=precision.compute_dtype, mixed_precision=precision.bf16 or precision.fp16,
        eval_micro_batch=_eval_batch(recipe), upcast_unquantized=levers.upcast_unquantized.on,
        checkpoint_layers=levers.checkpoint_layers, recompute="selective" if levers.recompute.on else "full",
        selective_layers=levers.selective_layers,
        liger_kernel=levers.liger_kernel.on,
        fused_lora=levers.fused_lora.on, fp8_base=levers.fp8_base.on, fp8_weight_cache=levers.fp8_weight_cache.on,
        offload_checkpoints=levers.offload_checkpoints.on, levers=tuple(levers.levers()))


def lever_notes(settings: TrainSettings) -> list[str]:
    """What the prediction assumes about the levers that do not change its shape."""
    on = {lever.name: lever for lever in settings.levers}
    notes = []
    liger = on.get("liger_kernel")
    if liger is not None and not liger.on:
        notes.append(f"liger_kernel off ({liger.reason}): the full logits and their float32 loss are counted")
    if any(on[n].on for n in ("padding_free", "group_by_length") if n in on):
        notes.append("padding_free/group_by_length only shorten batches: every micro-batch is counted as "
                     "full (max_seq_length tokens per example)")
    if settings.recompute == "selective":
        notes.append("recompute: selective: what its layers keep is counted from its policy (checked on CPU, "
                     "tests/test_selective_recompute.py); on an H100 within 2.4% of the reserved memory "
                     "(bench/results/fastpath_h100_2026-12-06)")
    if settings.fp8_base:
        notes.append("fp8_base: its float8 copies (the largest weight twice, the incoming gradient of a layer's "
                     "backward) are counted from the code with compiled casts, not yet measured on a GPU; a cast "
                     "that falls back to eager makes float32 temporaries (8 bytes per element of its operand)")
    if settings.offload_checkpoints:
        notes.append("offload_checkpoints: the checkpointed layers' inputs are counted in pinned host memory "
                     "(one layer input per checkpointed layer; three layers' worth stay on the GPU: the first "
                     "layer's, and the copies and the prefetch), from the code; on an H100 0.3-0.8 GiB above the "
                     "reserved memory (bench/results/fastpath_h100_2026-12-06)"
                     + ("; selective layers' kept outputs likewise, three layers' worth on the GPU"
                        if settings.recompute == "selective" else ""))
    if "torch_compile" in on and on["torch_compile"].on:
        notes.append("torch_compile: its effect on memory (fused kernels, compile-time buffers) is not modelled")
    return notes


def _eval_batch(recipe: Recipe) -> int | None:
    """The evaluation micro-batch when the run evaluates (as training_arguments_kwargs decides)."""
    t = recipe.training
    if t.eval_strategy == "no" or not recipe.evaluates:
        return None
    return t.per_device_eval_batch_size or t.per_device_train_batch_size


def plan_recipe(recipe: Recipe, machine: Machine, allow_network: bool = True,
                liger_described: bool | None = None) -> Plan:
    """Plan `recipe` on `machine`'s smallest GPU. Reads only the model's config (a hub model's from the
    local cache, else from the hub when `allow_network`). `liger_described`: whether a described environment
    has liger-kernel (None: this machine's packages decide)."""
    m = recipe.model
    config = load_model_config(m.name_or_path, m.revision, m.trust_remote_code, allow_network=allow_network)
    counts = count_parameters(config, where=f"model {m.name_or_path}")
    name, gpu_bytes = smallest_gpu(machine)
    notes = []
    if recipe.lora.use_dora:
        notes.append("lora.use_dora: DoRA's weight norms (a dequantized copy of each weight in backward) "
                     "are not counted; expect more memory")
    if recipe.lora.modules_to_save:
        notes.append(f"lora.modules_to_save {recipe.lora.modules_to_save}: the trainable full copies of "
                     "these modules and their optimizer states are not counted")
    if not machine.nvidia_gpus:
        notes.append("no NVIDIA GPU on this machine: the prediction is for the same settings on a GPU")
    settings = settings_from_recipe(recipe, machine, model_type=counts.model_type,
                                    attn_implementation=config.get("_attn_implementation"),
                                    liger_described=liger_described)
    perf = recipe.performance
    settings, offload_note = resolve_offload(counts, settings, perf.offload_checkpoints, perf.recompute, machine,
                                             processes=ranks(recipe, machine), refused=offload_refused(recipe, machine))
    if offload_note:
        settings = _with_levers(settings, offload_note, perf.offload_checkpoints, perf.recompute)
    settings, auto_note = resolve_checkpoint_layers(
        counts, settings, None if recipe.distributed.strategy == "fsdp" else gpu_bytes)
    settings, selective_note = resolve_selective_layers(
        counts, settings, None if recipe.distributed.strategy == "fsdp" else gpu_bytes)
    notes += lever_notes(settings) + [n for n in (offload_note, auto_note, selective_note) if n]
    host = offload_host_bytes(counts, settings)
    if host:
        notes.append(f"offload_checkpoints: about {host / GIB:.1f} GiB of pinned host memory at the end of each "
                     "micro-batch's forward" + (" (layer inputs and selective layers' kept outputs)"
                                                 if settings.recompute == "selective" else " (layer inputs)"))
    return plan_for(counts, settings, name, gpu_bytes, model=m.name_or_path, extra_notes=tuple(notes))


def ranks(recipe: Recipe, machine: Machine) -> int:
    """Training processes on this host (each pins its own offloaded checkpoints)."""
    if recipe.distributed.strategy == "none":
        return 1
    n = recipe.distributed.num_processes
    return int(n) if n != "auto" else max(len(machine.nvidia_gpus), 1)


def offload_refused(recipe: Recipe, machine: Machine) -> str | None:
    """Why offloaded checkpoints cannot run for this recipe here (None: they can)."""
    if not machine.nvidia_gpus:
        return "no NVIDIA GPU"
    if recipe.distributed.strategy == "fsdp":
        return "not with FSDP"
    if recipe.performance.torch_compile:
        return "not with torch_compile"
    if not recipe.training.gradient_checkpointing or recipe.performance.checkpoint_layers == 0:
        return "no layer is checkpointed"
    return None


HOST_PINNED_SHARE = 0.5
"""`offload_checkpoints: auto` pins at most this share of the host's memory (all ranks together): pinned pages
cannot be swapped out, and the data loader, the Python processes and the page cache need the rest."""


def resolve_offload(counts: ModelCounts, s: TrainSettings, offload: bool | str, recompute: str, machine: Machine,
                    processes: int = 1, refused: str | None = None) -> tuple[TrainSettings, str | None]:
    """`offload_checkpoints: auto` and `recompute: auto` decided together (recipe/levers.py: until then both are
    off): offloaded checkpoints with selective recompute where the host can pin what they keep (the kept outputs
    of every selective layer and every layer input, `offload_host_bytes`, times `processes`) within
    HOST_PINNED_SHARE of its memory; else offloaded inputs with full recompute where those fit; else neither.
    Measured on an H200 (bench/results/fastpath_h200_2026-12-06): 8B at 8 x 2048, selective + offloaded 11,948
    tokens/s at 10.62 GiB reserved against 11,013 at 9.87 GiB offloaded with full recompute, the kept outputs'
    copies hidden behind the forward. `offload`/`recompute`: the recipe's settings; `refused`: why offloading
    cannot run here (no GPU, FSDP, torch_compile), None when it can. Returns the settings and a note (None: nothing
    was `auto`)."""
    if offload != "auto" and recompute != "auto":
        return s, None
    checkpointed = checkpointed_layers(counts, s) if s.gradient_checkpointing else 0
    host = machine.host_memory_mib * 2**20 if machine.host_memory_mib else None
    want_selective = recompute in ("auto", "selective")
    candidates = []  # (offload, recompute) in the order of preference, as far as the recipe leaves them open
    for off in ((True, False) if offload == "auto" else (bool(offload),)):
        for rec in (("selective", "full") if recompute == "auto" else (recompute,)):
            if recompute == "auto" and rec == "selective" and not off:
                continue  # selective without offload costs GPU memory per layer: only on when asked for
            if recompute == "auto" and rec == "selective" and s.fp8_base:
                continue  # FP8_SELECTIVE_UNMEASURED says why
            candidates.append((off, rec))
    reason = None
    for off, rec in candidates:
        trial = replace(s, offload_checkpoints=off, recompute=rec)
        if not off:
            return trial, _offload_note(offload, recompute, trial, reason)
        if refused is not None or not checkpointed:
            reason = refused or "no layer is checkpointed"
            continue
        if host is None:
            reason = ("the host's memory is unknown (the probe reads /proc/meminfo; a --machine file may give "
                      "host_memory_mib)")
            continue
        need = offload_host_bytes(counts, trial) * max(processes, 1)
        if need <= HOST_PINNED_SHARE * host:
            return trial, _offload_note(offload, recompute, trial, (
                f"pins about {need / GIB:.1f} GiB of the host's {host / GIB:.0f} GiB"))
        what = "inputs and kept outputs" if rec == "selective" else "inputs"
        reason = (f"the checkpointed layers' {what} would pin {need / GIB:.1f} GiB, more than "
                  f"{HOST_PINNED_SHARE:.0%} of the host's {host / GIB:.0f} GiB")
    # Only an explicit `offload_checkpoints: true` with recompute auto ends here (every candidate offloads): the
    # lever stays as recipe/levers.py decided it (off without a GPU), with full recompute.
    trial = replace(s, recompute="full")
    return trial, _offload_note(offload, recompute, trial, reason)


FP8_SELECTIVE_UNMEASURED = ("with fp8_base, recompute auto stays full: fp8 with selective recompute ran 13% slower "
                            "than bf16 on an H200 (its casts fell back to eager; fixed since, not re-measured); set "
                            "`performance.recompute: selective` to try it")
"""Why `recompute: auto` is full with fp8_base (bench/results/fastpath_h200_2026-12-06/NOTES.md)."""


def _with_levers(s: TrainSettings, note: str, offload: bool | str, recompute: str) -> TrainSettings:
    """`s` with those of its recompute and offload_checkpoints levers (the ones `plan` lists) that were `auto`
    saying what was decided."""
    from qlora_doctor.recipe.levers import Lever

    decided = {}
    if recompute == "auto":
        decided["recompute"] = Lever("recompute", s.recompute == "selective", note)
    if offload == "auto":
        decided["offload_checkpoints"] = Lever("offload_checkpoints", s.offload_checkpoints, note)
    return replace(s, levers=tuple(decided.get(lever.name, lever) for lever in s.levers))


def _offload_note(offload: bool | str, recompute: str, s: TrainSettings, why: str | None) -> str:
    parts = []
    if offload == "auto":
        parts.append(f"offload_checkpoints auto: {'on' if s.offload_checkpoints else 'off'}")
    if recompute == "auto":
        parts.append(f"recompute auto: {s.recompute}" + ("; " + FP8_SELECTIVE_UNMEASURED if s.fp8_base else ""))
    return ", ".join(parts) + (f" ({why})" if why else "")


def resolve_checkpoint_layers(counts: ModelCounts, s: TrainSettings,
                              gpu_bytes: int | None) -> tuple[TrainSettings, str | None]:
    """`checkpoint_layers: auto` decided: the fewest recomputed layers (the first N) whose predicted total stays
    within AUTO_CHECKPOINT_SHARE of `gpu_bytes`; `all` when that is unknown (None: no GPU, FSDP) or when not
    even all of them fit. Returns the settings and a note saying what was chosen (None: nothing was `auto`)."""
    if s.checkpoint_layers != "auto":
        return s, None
    layers = counts.num_layers
    if not s.gradient_checkpointing:
        return replace(s, checkpoint_layers="all"), None
    if gpu_bytes is None:
        return (replace(s, checkpoint_layers="all"),
                "checkpoint_layers auto: all layers recompute (no GPU memory to plan against, or FSDP)")
    budget = AUTO_CHECKPOINT_SHARE * gpu_bytes
    # Memory falls as more layers recompute; the first count that fits is the fastest that fits.
    chosen, total = _first_within(counts, s, "checkpoint_layers", range(layers + 1), budget)
    resolved = replace(s, checkpoint_layers="all" if chosen >= layers else chosen)
    how = " (selective)" if s.recompute == "selective" else ""
    return resolved, (f"checkpoint_layers auto: {chosen} of {layers} layers recompute{how}, the fewest that keep the "
                      f"prediction ({total / GIB:.1f} GiB) within {AUTO_CHECKPOINT_SHARE:.0%} of the GPU's "
                      f"{gpu_bytes / GIB:.1f} GiB")


def _first_within(counts: ModelCounts, s: TrainSettings, field: str, candidates: range,
                  limit: float) -> tuple[int, int]:
    """The first of `candidates` for settings `field` whose predicted total is within `limit` (else the last),
    with that total: the search both `auto` layer choices make."""
    for chosen in candidates:
        total = estimate(counts, replace(s, **{field: chosen})).total_bytes
        if total <= limit:
            break
    return chosen, total


def resolve_selective_layers(counts: ModelCounts, s: TrainSettings,
                             gpu_bytes: int | None) -> tuple[TrainSettings, str | None]:
    """`selective_layers: auto` decided (with recompute: selective): the most checkpointed layers (the first N)
    that keep their outputs while the predicted total stays within AUTO_CHECKPOINT_SHARE of `gpu_bytes`; all
    when that is unknown. Returns the settings and a note (None: nothing was `auto` or selective)."""
    if s.selective_layers != "auto":
        return s, None
    checkpointed = checkpointed_layers(counts, s)
    if s.recompute != "selective" or not checkpointed:
        return replace(s, selective_layers="all"), None
    if gpu_bytes is None:
        return (replace(s, selective_layers="all"),
                "selective_layers auto: every checkpointed layer keeps its outputs (no GPU memory to plan against)")
    budget = AUTO_CHECKPOINT_SHARE * gpu_bytes
    # Memory grows with each selective layer; the largest count that fits is the fastest that fits. Where
    # something else already exceeds the budget (an evaluation batch's logits, a too-large micro-batch), selective
    # layers may still take what hides under that peak: they make it no worse.
    floor = estimate(counts, replace(s, selective_layers=0)).total_bytes
    chosen, total = _first_within(counts, s, "selective_layers", range(checkpointed, -1, -1), max(budget, floor))
    resolved = replace(s, selective_layers="all" if chosen >= checkpointed else chosen)
    if floor > budget:
        return resolved, (f"selective_layers auto: {chosen} of {checkpointed} checkpointed layers keep their outputs, "
                          f"the most that leave the prediction where it is without them ({floor / GIB:.1f} GiB, "
                          f"above {AUTO_CHECKPOINT_SHARE:.0%} of the GPU's {gpu_bytes / GIB:.1f} GiB)")
    return resolved, (f"selective_layers auto: {chosen} of {checkpointed} checkpointed layers keep their outputs, "
                      f"the most that keep the prediction ({total / GIB:.1f} GiB) within {AUTO_CHECKPOINT_SHARE:.0%} "
                      f"of the GPU's {gpu_bytes / GIB:.1f} GiB")


def plan_for(counts: ModelCounts, settings: TrainSettings, gpu_name: str | None, gpu_bytes: int | None,
             model: str = "", extra_notes: tuple[str, ...] = ()) -> Plan:
    """The plan for given counts and settings against a GPU of `gpu_bytes` (None: unknown)."""
    est = estimate(counts, settings)
    fits = None if gpu_bytes is None else est.total_bytes <= gpu_bytes
    suggestions = tuple(suggest(counts, settings, gpu_bytes)) if fits is False else ()
    return Plan(model=model, settings=settings, parameters=counts.total, trainable_parameters=est.trainable_params,
                num_layers=counts.num_layers, tied_embeddings=counts.tied_embeddings,
                breakdown=est.breakdown, peak_allocated_bytes=est.peak_allocated_bytes,
                peak_reserved_bytes=est.peak_reserved_bytes, reserved_at_start_bytes=est.reserved_at_start_bytes,
                total_bytes=est.total_bytes,
                peak_phase=est.peak_phase, calibration=est.calibration, gpu_name=gpu_name, gpu_bytes=gpu_bytes, fits=fits,
                suggestions=suggestions, notes=est.notes + extra_notes)


def plan_config(config: dict[str, Any], settings: TrainSettings, gpu_bytes: int | None,
                gpu_name: str | None = None, model: str = "") -> Plan:
    """The plan for a model config (a dict as in config.json) and explicit settings."""
    return plan_for(count_parameters(config, where=model or "model config"), settings, gpu_name, gpu_bytes,
                    model=model)


def suggest(counts: ModelCounts, s: TrainSettings, gpu_bytes: int) -> list[Suggestion]:
    """Changes that make a run that does not fit fit, each checked with the same estimate."""
    def total(settings: TrainSettings) -> int:
        return estimate(counts, settings).total_bytes

    effective = s.micro_batch * s.grad_accum
    out: list[Suggestion] = []
    # Smaller steps first as the recipe has them; without checkpointing, also combined with it.
    bases = [(s, (), "")]
    full_ckpt = _checkpoint_all(counts, s)
    if full_ckpt is not None:
        bases.append((full_ckpt[0], full_ckpt[1], " and " + full_ckpt[2]))
    # The largest micro-batch that fits and divides the effective batch, so it stays exactly the same;
    # the recipe's checkpointing kept unless turning it on allows a larger one.
    best: tuple[int, Suggestion] | None = None
    for base, extra, extra_text in bases:
        batch = next((b for b in range(s.micro_batch - 1, 0, -1) if effective % b == 0 and total(
            _at_batch(base, b, effective // b)) <= gpu_bytes), None)
        if batch is not None and (best is None or batch > best[0]):
            candidate = _at_batch(base, batch, effective // batch)
            eval_change, eval_text = _eval_change(s, candidate)
            best = (batch, Suggestion(
                "micro_batch", f"per_device_train_batch_size {batch} with gradient_accumulation_steps "
                f"{effective // batch} (same effective batch {effective}){extra_text}{eval_text}",
                (("training.per_device_train_batch_size", batch),
                 ("training.gradient_accumulation_steps", effective // batch)) + extra + eval_change,
                total(candidate), True))
    if best is not None:
        out.append(best[1])
    # The longest sequence that fits, at this micro-batch, else at micro-batch 1 (same effective batch).
    best = None
    for base, extra, extra_text in bases:
        for batch in dict.fromkeys((s.micro_batch, 1)):
            at_batch = _at_batch(base, batch, effective // batch if batch == 1 else s.grad_accum)
            seq = _largest_fitting_seq(counts, at_batch, gpu_bytes)
            if seq is None:
                continue
            if best is None or seq > best[0]:
                candidate = replace(at_batch, seq_len=seq)
                changes: tuple[tuple[str, Any], ...] = (("training.max_seq_length", seq),)
                text = f"max_seq_length {seq} (longer examples are truncated)"
                if batch != s.micro_batch:
                    changes += (("training.per_device_train_batch_size", batch),
                                ("training.gradient_accumulation_steps", candidate.grad_accum))
                    text += (f" with per_device_train_batch_size {batch} and gradient_accumulation_steps "
                             f"{candidate.grad_accum}")
                eval_change, eval_text = _eval_change(s, candidate)
                best = (seq, Suggestion("seq_len", text + extra_text + eval_text, changes + extra + eval_change,
                                        total(candidate), True))
            break
    if best is not None:
        out.append(best[1])
    if s.eval_micro_batch and s.eval_micro_batch > 1:
        eval_batch = next((b for b in range(s.eval_micro_batch - 1, 0, -1)
                           if total(replace(s, eval_micro_batch=b)) <= gpu_bytes), None)
        if eval_batch is not None:
            out.append(Suggestion("eval_batch", f"per_device_eval_batch_size {eval_batch}",
                                  (("training.per_device_eval_batch_size", eval_batch),),
                                  total(replace(s, eval_micro_batch=eval_batch)), True))
    if full_ckpt is not None:
        candidate, changes, text = full_ckpt
        t = total(candidate)
        out.append(Suggestion("gradient_checkpointing", f"{text} saves {(total(s) - t) / GIB:.1f} GiB"
                              + ("" if t <= gpu_bytes else " (not enough alone)"), changes, t, t <= gpu_bytes))
    if s.recompute == "selective" and checkpointed_layers(counts, s):
        candidate = replace(s, recompute="full")
        t = total(candidate)
        out.append(Suggestion("recompute", f"performance.recompute: full saves {(total(s) - t) / GIB:.1f} GiB "
                              "(checkpointed layers keep only their input)" + ("" if t <= gpu_bytes else
                                                                                " (not enough alone)"),
                              (("performance.recompute", "full"),), t, t <= gpu_bytes))
    if s.optim != FALLBACK_OPTIMIZER:
        candidate = replace(s, optim=FALLBACK_OPTIMIZER)
        t = total(candidate)
        if t < total(s):
            out.append(Suggestion("optimizer", f"optim: {FALLBACK_OPTIMIZER} saves {(total(s) - t) / GIB:.1f} GiB"
                                  + ("" if t <= gpu_bytes else " (not enough alone)"),
                                  (("training.optim", FALLBACK_OPTIMIZER),), t, t <= gpu_bytes))
    if not any(x.fits for x in out):
        floor = replace(s, micro_batch=1, seq_len=min(s.seq_len, SEQ_STEP), gradient_checkpointing=True,
                        checkpoint_layers="all", recompute="full", optim=FALLBACK_OPTIMIZER)
        out.append(Suggestion("gpu", f"even micro-batch 1, {floor.seq_len} tokens, checkpointing and "
                              f"{FALLBACK_OPTIMIZER} need {total(floor) / GIB:.1f} GiB: use a GPU with more "
                              "memory or a smaller model", (), total(floor), False))
    return out


def _checkpoint_all(counts: ModelCounts, s: TrainSettings) -> tuple[TrainSettings, tuple[tuple[str, Any], ...], str] | None:
    """Checkpointing every layer, when the run does not: (settings, recipe changes, text); else None."""
    if checkpointed_layers(counts, s) == counts.num_layers:
        return None
    changes: tuple[tuple[str, Any], ...] = (("training.gradient_checkpointing", True),)
    text = "gradient_checkpointing: true"
    if s.checkpoint_layers != "all":
        changes += (("performance.checkpoint_layers", "all"),)
        text += " with performance.checkpoint_layers: all"
    return replace(s, gradient_checkpointing=True, checkpoint_layers="all"), changes, text


def _at_batch(s: TrainSettings, batch: int, grad_accum: int) -> TrainSettings:
    """`s` at another micro-batch; an evaluation batch larger than it shrinks with it (by default
    per_device_eval_batch_size follows the training micro-batch)."""
    eval_batch = min(s.eval_micro_batch, batch) if s.eval_micro_batch else s.eval_micro_batch
    return replace(s, micro_batch=batch, grad_accum=grad_accum, eval_micro_batch=eval_batch)


def _eval_change(old: TrainSettings, new: TrainSettings) -> tuple[tuple[tuple[str, Any], ...], str]:
    if new.eval_micro_batch == old.eval_micro_batch:
        return (), ""
    return ((("training.per_device_eval_batch_size", new.eval_micro_batch),),
            f" and per_device_eval_batch_size {new.eval_micro_batch}")


def _largest_fitting_seq(counts: ModelCounts, s: TrainSettings, gpu_bytes: int) -> int | None:
    """The longest multiple of SEQ_STEP below s.seq_len that fits (memory grows with length)."""
    lo, hi = 1, (s.seq_len - 1) // SEQ_STEP  # in units of SEQ_STEP
    if hi < 1 or estimate(counts, replace(s, seq_len=SEQ_STEP)).total_bytes > gpu_bytes:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(counts, replace(s, seq_len=mid * SEQ_STEP)).total_bytes <= gpu_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo * SEQ_STEP

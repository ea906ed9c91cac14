"""A run that watches itself: the Trainer's log history judged while it trains (and after the fact, by
`qlora-doctor explain RUN_DIR` or a pasted Trainer log), naming the likely recipe parameter and the fix.

    findings = diagnose_history(trainer.state.log_history, WatchSettings.from_recipe(recipe))

What is judged, on the records of this training session (a resumed run starts afresh at its checkpoint):

- `nan`: a logged training loss (or gradient norm) that is NaN or infinite. Fatal.
- `diverged`: after warm-up, the mean of the last DIVERGE_WINDOW logged losses is above DIVERGE_FACTOR x
  the median of the first DIVERGE_WINDOW (and DIVERGE_MARGIN above it in absolute terms); or the gradient
  norm is GRAD_BLOWUP_FACTOR x its early median while the loss is above its start. Fatal.
- `not_learning`: the last PLATEAU_EVALS evaluations after warm-up differ by less than PLATEAU_EVAL_TOLERANCE
  (relative) while the training loss over the same steps fell by less than PLATEAU_TRAIN_TOLERANCE. A warning.
- `overfitting`: the last OVERFIT_EVALS evaluations rise, the last OVERFIT_MARGIN above the best, while the
  training loss since the best evaluation is below the training loss before it. A warning.

A fatal finding makes the `Watchdog` callback save a checkpoint (unless the adapter's weights are no
longer finite: nothing to resume from there) and stop training; the run ends `diverged` and `qlora-doctor
run` exits with EXIT_DIVERGED. Warnings are kept for metrics.json and the manifest; with
`training.early_stopping_patience: N` the run also stops (as `completed`) after N evaluations without a
new best eval loss.

On `--resume` the recipe's learning_rate wins over the checkpoint's: the optimizer and scheduler states
saved in a checkpoint carry the old learning rate, so fixing `training.learning_rate` and resuming would
otherwise change nothing.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal

if TYPE_CHECKING:
    from qlora_doctor.recipe.schema import Recipe

EXIT_DIVERGED = 3
"""`qlora-doctor run`'s exit code when the watchdog stopped a diverging (or NaN) run."""
DIVERGE_WINDOW = 3
DIVERGE_FACTOR = 1.5
DIVERGE_MARGIN = 0.5
GRAD_BLOWUP_FACTOR = 100.0
PLATEAU_EVALS = 3
PLATEAU_EVAL_TOLERANCE = 0.002
PLATEAU_TRAIN_TOLERANCE = 0.02
OVERFIT_EVALS = 3
OVERFIT_MARGIN = 0.02
LOW_LEARNING_RATE = 1e-6
"""Below this (recipe_rules.toml learning-rate-too-low) a plateau is blamed on the learning rate."""
HIGH_DROPOUT = 0.3
"""Above this (recipe_rules.toml lora-dropout-high) a plateau is blamed on lora_dropout."""

Kind = Literal["nan", "diverged", "not_learning", "overfitting"]
FATAL_KINDS = ("nan", "diverged")


@dataclass(frozen=True)
class WatchSettings:
    """The recipe values the diagnosis needs (and names in its fixes)."""

    learning_rate: float | None = None
    warmup_steps: int | None = None
    """Steps of warm-up (judged only after them); None: where the logged learning rate peaks."""
    lora_dropout: float | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    max_grad_norm: float | None = None
    fp16: bool = False
    """fp16 autocast or float16 4-bit compute: overflow is then a likely cause of NaN."""
    early_stopping_patience: int | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe | None, fp16: bool | None = None,
                    total_steps: int | None = None) -> WatchSettings:
        """From a recipe (`fp16`: the resolved precision, when known; `total_steps`: to turn a warm-up ratio
        into steps)."""
        if recipe is None:
            return cls()
        t, lora = recipe.training, recipe.lora
        warmup = t.warmup_steps
        if warmup is None and total_steps:
            warmup = math.ceil((0.03 if t.warmup_ratio is None else t.warmup_ratio) * total_steps)
        if fp16 is None:
            fp16 = t.fp16 is True or recipe.quantization.bnb_4bit_compute_dtype == "float16"
        return cls(learning_rate=t.learning_rate, warmup_steps=warmup, lora_dropout=lora.lora_dropout,
                   lora_r=lora.r, lora_alpha=lora.lora_alpha, max_grad_norm=t.max_grad_norm, fp16=bool(fp16),
                   early_stopping_patience=t.early_stopping_patience)


@dataclass(frozen=True)
class Finding:
    """One thing the watchdog saw in the log history."""

    kind: Kind
    step: int
    """The step it was seen at."""
    fatal: bool
    """True for nan/diverged: the run is stopped."""
    summary: str
    """What was seen, with the numbers."""
    parameter: str | None
    """The recipe key most likely responsible (`training.learning_rate`), None when none stands out."""
    fix: str
    """What to set."""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return (f"{self.kind} at step {self.step}: {self.summary}; likely {self.parameter or 'no single parameter'}: "
                f"{self.fix}")


# --- the diagnosis --------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _warmup_end(train: list[dict[str, Any]], settings: WatchSettings) -> int:
    if settings.warmup_steps is not None:
        return settings.warmup_steps
    rates = [(r["step"], r["learning_rate"]) for r in train if _finite(r.get("learning_rate"))]
    if not rates:
        return 0
    peak = max(rate for _, rate in rates)
    return next(step for step, rate in rates if rate >= peak * 0.999)


def _lower_rate(settings: WatchSettings) -> str:
    if settings.learning_rate is None:
        return "lower training.learning_rate (2.0e-4 is QLoRA's value; 1.0e-4 above 20B parameters)"
    lower = min(settings.learning_rate / 10, 2e-4)
    return f"set training.learning_rate: {lower:.1e} (now {settings.learning_rate:g}; QLoRA used 2.0e-4)"


def diagnose_history(log_history: Iterable[dict[str, Any]], settings: WatchSettings | None = None,
                     since_step: int = 0) -> list[Finding]:
    """What the Trainer's `log_history` (records with `loss`/`grad_norm`/`learning_rate` or `eval_loss`, and
    `step`) shows, fatal findings first; empty when training looks healthy. Records before `since_step`
    (an earlier session of a resumed run) are ignored, but an evaluation at `since_step` counts."""
    settings = settings or WatchSettings()
    records = [r for r in log_history if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
    train = [r for r in records if "loss" in r and r["step"] > since_step]
    evals = [r for r in records if "eval_loss" in r and r["step"] >= since_step]
    findings: list[Finding] = []
    bad = next((r for r in train if not _finite(r["loss"]) or
                ("grad_norm" in r and isinstance(r["grad_norm"], float) and math.isnan(r["grad_norm"]))), None)
    if bad is not None:
        findings.append(_nan_finding(bad, train, settings))
        return findings
    warmup_end = _warmup_end(train, settings)
    diverged = _divergence(train, warmup_end, settings)
    if diverged is not None:
        return [diverged]
    plateau = _plateau(train, evals, warmup_end, settings)
    if plateau is not None:
        findings.append(plateau)
    overfit = _overfitting(train, evals, settings)
    if overfit is not None:
        findings.append(overfit)
    return findings


def _nan_finding(bad: dict[str, Any], train: list[dict[str, Any]], settings: WatchSettings) -> Finding:
    finite = [r["loss"] for r in train if r["step"] < bad["step"] and _finite(r["loss"])]
    seen = f"training loss {bad['loss']}" + (f", grad_norm {bad['grad_norm']}" if "grad_norm" in bad else "")
    before = f" (last finite loss {finite[-1]:.4g})" if finite else ""
    if settings.fp16:
        return Finding("nan", int(bad["step"]), True, f"{seen}{before}: float16 overflowed (its largest value is "
                       "65504) or the update blew up", "training.fp16",
                       "on a GPU with compute capability >= 8.0 set training.bf16: true, training.fp16: false and "
                       "quantization.bnb_4bit_compute_dtype: bfloat16; else compute in float32, or "
                       + _lower_rate(settings),
                       {"loss": str(bad["loss"]), "last_finite_loss": finite[-1] if finite else None})
    return Finding("nan", int(bad["step"]), True, f"{seen}{before}: the updates blew the adapter's weights up",
                   "training.learning_rate", _lower_rate(settings) + "; keep training.max_grad_norm at 0.3",
                   {"loss": str(bad["loss"]), "last_finite_loss": finite[-1] if finite else None})


def _divergence(train: list[dict[str, Any]], warmup_end: int, settings: WatchSettings) -> Finding | None:
    losses = [r["loss"] for r in train]
    if len(losses) <= DIVERGE_WINDOW:
        return None
    after = [r for r in train if r["step"] > warmup_end]
    if len(after) < DIVERGE_WINDOW:
        return None
    start = statistics.median(losses[:DIVERGE_WINDOW])  # a median: a run can diverge within its first logs
    recent = _mean([r["loss"] for r in after[-DIVERGE_WINDOW:]])
    step = int(after[-1]["step"])
    evidence = {"start_loss": round(start, 4), "recent_loss": round(recent, 4), "warmup_end_step": warmup_end}
    if recent > DIVERGE_FACTOR * start and recent - start > DIVERGE_MARGIN:
        return Finding("diverged", step, True,
                       f"the training loss rose from {start:.3g} (median of the first {DIVERGE_WINDOW} logs) to "
                       f"{recent:.3g} (mean of the last {DIVERGE_WINDOW}) after warm-up",
                       "training.learning_rate", _lower_rate(settings), evidence)
    norms = [r["grad_norm"] for r in train if _finite(r.get("grad_norm"))]
    if len(norms) > DIVERGE_WINDOW and _finite(after[-1].get("grad_norm")):
        early = statistics.median(norms[:5])
        last = after[-1]["grad_norm"]
        if early > 0 and last > GRAD_BLOWUP_FACTOR * early and recent > start:
            evidence.update(early_grad_norm=round(early, 4), grad_norm=round(last, 4))
            return Finding("diverged", step, True,
                           f"the gradient norm grew from {early:.3g} to {last:.3g} while the loss rose above its "
                           f"start ({start:.3g} -> {recent:.3g})", "training.learning_rate",
                           _lower_rate(settings) + "; training.max_grad_norm: 0.3 clips such steps", evidence)
    return None


def _plateau(train: list[dict[str, Any]], evals: list[dict[str, Any]], warmup_end: int,
             settings: WatchSettings) -> Finding | None:
    window = [r for r in evals if r["step"] >= warmup_end][-PLATEAU_EVALS:]
    if len(window) < PLATEAU_EVALS or not all(_finite(r["eval_loss"]) for r in window):
        return None
    values = [r["eval_loss"] for r in window]
    first, last_step = values[0], int(window[-1]["step"])
    eval_change = (max(values) - min(values)) / abs(first) if first else 0.0
    in_window = [r["loss"] for r in train if window[0]["step"] < r["step"] <= last_step and _finite(r["loss"])]
    if eval_change >= PLATEAU_EVAL_TOLERANCE or len(in_window) < 2:
        return None
    half = len(in_window) // 2
    early, late = _mean(in_window[:half]), _mean(in_window[half:])
    train_drop = (early - late) / abs(early) if early else 0.0
    if train_drop >= PLATEAU_TRAIN_TOLERANCE:
        return None
    summary = (f"eval loss stayed within {eval_change:.2%} over the last {PLATEAU_EVALS} evaluations (steps "
               f"{int(window[0]['step'])}-{last_step}, {first:.4g} -> {values[-1]:.4g}) and the training loss "
               f"fell {max(train_drop, 0.0):.2%}")
    evidence = {"eval_losses": values, "eval_change": round(eval_change, 6), "train_drop": round(train_drop, 6)}
    if settings.learning_rate is not None and settings.learning_rate < LOW_LEARNING_RATE:
        return Finding("not_learning", last_step, False, summary + ": the adapter is not learning",
                       "training.learning_rate",
                       f"set training.learning_rate: 2.0e-4 (now {settings.learning_rate:g})", evidence)
    if settings.lora_dropout is not None and settings.lora_dropout > HIGH_DROPOUT:
        return Finding("not_learning", last_step, False, summary + ": the adapter is not learning",
                       "lora.lora_dropout", f"set lora.lora_dropout: 0.05 (now {settings.lora_dropout:g})", evidence)
    return Finding("not_learning", last_step, False, summary + ": training has stopped improving",
                   "training.early_stopping_patience",
                   "stop here (set training.early_stopping_patience: 2 to stop such runs by themselves), or raise "
                   "training.learning_rate if the loss is still high", evidence)


def _overfitting(train: list[dict[str, Any]], evals: list[dict[str, Any]], settings: WatchSettings) -> Finding | None:
    finite = [r for r in evals if _finite(r["eval_loss"])]
    window = finite[-OVERFIT_EVALS:]
    if len(window) < OVERFIT_EVALS:
        return None
    values = [r["eval_loss"] for r in window]
    best = min(finite, key=lambda r: r["eval_loss"])
    rising = all(b > a for a, b in zip(values, values[1:]))
    if not rising or values[-1] < best["eval_loss"] * (1 + OVERFIT_MARGIN) or best["step"] >= window[-1]["step"]:
        return None
    before = [r["loss"] for r in train if r["step"] <= best["step"] and _finite(r["loss"])]
    since = [r["loss"] for r in train if r["step"] > best["step"] and _finite(r["loss"])]
    if not before or not since or _mean(since) >= _mean(before[-len(since):]):
        return None
    step = int(window[-1]["step"])
    patience = ("" if settings.early_stopping_patience else
                "set training.early_stopping_patience: 2 to stop at the best evaluation, or ")
    return Finding("overfitting", step, False,
                   f"eval loss rose over the last {OVERFIT_EVALS} evaluations to {values[-1]:.4g} (best "
                   f"{best['eval_loss']:.4g} at step {int(best['step'])}) while the training loss kept falling",
                   "training.num_train_epochs",
                   f"{patience}train fewer steps (about step {int(best['step'])}); more data or lora.lora_dropout: "
                   "0.1 also help", {"best_eval_loss": best["eval_loss"], "best_step": int(best["step"]),
                                     "eval_losses": values})


# --- a pasted Trainer log ---------------------------------------------------------------------------

_LOG_DICT = re.compile(r"\{[^{}]*'(?:loss|eval_loss)'[^{}]*\}")


def parse_trainer_log(text: str) -> list[dict[str, Any]]:
    """The Trainer's printed log lines (`{'loss': '2.31', 'grad_norm': '1.2', 'learning_rate': ...}`, values
    as numbers or as the strings transformers 5 prints) as log-history records. Printed lines carry no
    step: records are numbered in order (each training log one step, an evaluation at the step before it)."""
    records: list[dict[str, Any]] = []
    step = 0
    for match in _LOG_DICT.finditer(text):
        try:
            raw = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            continue
        if not isinstance(raw, dict):
            continue
        record: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            record[str(key)] = value
        if "loss" in record:
            step += 1
        record.setdefault("step", step)
        records.append(record)
    return records


# --- the callback ------------------------------------------------------------------------------------

def watchdog_callback(settings: WatchSettings) -> Watchdog:
    """A Watchdog that is also a transformers TrainerCallback (the no-op handlers of the events it does not
    watch come from there); transformers is imported here, so that the diagnosis alone stays light."""
    from transformers import TrainerCallback

    return type("WatchdogCallback", (Watchdog, TrainerCallback), {})(settings)


class Watchdog:
    """Judges the log history at every log; stops a diverging run with a checkpoint, keeps warnings, and
    applies training.early_stopping_patience. `stopped` holds the fatal finding, `warnings` the others.
    Use `watchdog_callback(settings)` to hand one to a Trainer."""

    def __init__(self, settings: WatchSettings) -> None:
        self.settings = settings
        self.stopped: Finding | None = None
        self.warnings: dict[str, Finding] = {}
        self.checkpoint_saved: bool | None = None
        self.since_step = 0
        self.early_stopped_at: int | None = None
        self.learning_rate_reset: tuple[float, float] | None = None
        self._best_eval: float | None = None
        self._evals_without_best = 0
        self._lr_checked = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.since_step = state.global_step  # a resumed run is judged from its checkpoint on

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                      **kwargs: Any) -> None:
        # After a resume the checkpoint's optimizer and scheduler states carry its learning rate; the recipe's wins.
        if self._lr_checked:
            return
        self._lr_checked = True
        base = list(getattr(lr_scheduler, "base_lrs", None) or [])
        if state.global_step == 0 or optimizer is None or not base or not base[0] or \
                math.isclose(base[0], args.learning_rate, rel_tol=1e-9):
            return
        factor = args.learning_rate / base[0]
        lr_scheduler.base_lrs = [b * factor for b in base]
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(lr_scheduler, "_last_lr"):  # what the Trainer logs as this step's learning rate
            lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.learning_rate_reset = (base[0], args.learning_rate)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               model: Any = None, **kwargs: Any) -> None:
        if self.stopped is not None or not logs:
            return
        if "eval_loss" in logs and state.global_step >= self.since_step:
            self._patience(logs["eval_loss"], state, control)
        findings = diagnose_history(state.log_history, self.settings, self.since_step)
        for finding in findings:
            if finding.fatal:
                self.stopped = finding
                self.checkpoint_saved = _weights_finite(model)
                control.should_save = self.checkpoint_saved and args.save_strategy != "no"
                control.should_evaluate = False
                control.should_training_stop = True
                return
            if finding.kind not in self.warnings:
                self.warnings[finding.kind] = finding
                logging.getLogger(__name__).warning("qlora-doctor watch: %s", finding.text())

    def _patience(self, eval_loss: Any, state: Any, control: Any) -> None:
        patience = self.settings.early_stopping_patience
        if not _finite(eval_loss):
            return
        if self._best_eval is None or eval_loss < self._best_eval:
            self._best_eval, self._evals_without_best = eval_loss, 0
            return
        self._evals_without_best += 1
        if patience and self._evals_without_best >= patience and state.global_step > 0:
            self.early_stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = True

    def to_json(self) -> dict[str, Any]:
        """metrics.json's and manifest.json's `watch`."""
        return {
            "enabled": True,
            "status": ("diverged" if self.stopped is not None else "warning" if self.warnings else "healthy"),
            "stopped": self.stopped.to_json() if self.stopped else None,
            "checkpoint_saved": self.checkpoint_saved,
            "warnings": [w.to_json() for w in self.warnings.values()],
            "early_stopped_at": self.early_stopped_at,
            "learning_rate_reset": (None if self.learning_rate_reset is None else
                                    {"checkpoint": self.learning_rate_reset[0], "recipe": self.learning_rate_reset[1]}),
            "judged_from_step": self.since_step,
        }


def _weights_finite(model: Any) -> bool:
    """Whether every trainable weight (the adapter) is still finite: a checkpoint of NaN weights is useless."""
    if model is None:
        return True
    import torch

    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


# --- after the fact: a run folder ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunDiagnosis:
    """`qlora-doctor explain RUN_DIR`: what a run folder's log history shows."""

    source: str
    """The file the history came from (metrics.json, or a checkpoint's trainer_state.json)."""
    status: str | None
    """manifest.json's status (completed, stopped, diverged, failed, running), None without one."""
    records: int
    """Log records judged."""
    findings: tuple[Finding, ...]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "records": self.records,
                "findings": [f.to_json() for f in self.findings]}


def settings_from_recipe_data(data: Any) -> WatchSettings:
    """WatchSettings from a run folder's recipe.yaml as a mapping (its paths may no longer exist, so it is
    read, not validated)."""
    if not isinstance(data, dict):
        return WatchSettings()
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    lora = data.get("lora") if isinstance(data.get("lora"), dict) else {}
    quant = data.get("quantization") if isinstance(data.get("quantization"), dict) else {}

    def number(section: dict[str, Any], key: str) -> Any:
        value = section.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    warmup = number(training, "warmup_steps")
    return WatchSettings(
        learning_rate=number(training, "learning_rate"), warmup_steps=int(warmup) if warmup is not None else None,
        lora_dropout=number(lora, "lora_dropout"), lora_r=number(lora, "r"), lora_alpha=number(lora, "lora_alpha"),
        max_grad_norm=number(training, "max_grad_norm"),
        fp16=training.get("fp16") is True or quant.get("bnb_4bit_compute_dtype") == "float16",
        early_stopping_patience=number(training, "early_stopping_patience"))


def diagnose_run_dir(folder: Any) -> RunDiagnosis:
    """The watchdog's diagnosis of a run folder after the fact: its metrics.json history (else the newest
    checkpoint's trainer_state.json, for a run that did not finish), judged with its recipe.yaml.
    InputError when the folder has neither."""
    import json
    from pathlib import Path

    from qlora_doctor.core.errors import InputError
    from qlora_doctor.core.rundir import MANIFEST, METRICS, RECIPE, TRAINER_STATE, last_complete_checkpoint

    folder = Path(folder)
    records: list[dict[str, Any]] = []
    since, source = 0, ""
    try:
        metrics = json.loads((folder / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = None
    if isinstance(metrics, dict) and isinstance(metrics.get("train_loss_history"), list):
        source = str(folder / METRICS)
        if metrics.get("eval_loss_before") is not None and not metrics.get("resumed_from"):
            records.append({"step": 0, "eval_loss": metrics["eval_loss_before"]})
        records += [{**r, "loss": float("nan") if r.get("loss") is None else r["loss"]}
                    for r in metrics["train_loss_history"] if isinstance(r, dict)]
        records += [r for r in metrics.get("eval_history") or [] if isinstance(r, dict)]
        records.sort(key=lambda r: (r.get("step", 0), "loss" in r))
        watch = metrics.get("watch")
        if isinstance(watch, dict) and isinstance(watch.get("judged_from_step"), int):
            since = watch["judged_from_step"]
    else:
        checkpoint = last_complete_checkpoint(folder) if folder.is_dir() else None
        if checkpoint is None:
            raise InputError(f"{folder}: no {METRICS} and no checkpoint with {TRAINER_STATE}, so no training "
                             "log to judge; pass a run's training.output_dir, or paste the Trainer's log")
        source = str(checkpoint / TRAINER_STATE)
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        records = [r for r in state.get("log_history", []) if isinstance(r, dict)]
    try:
        import yaml

        recipe_data = yaml.safe_load((folder / RECIPE).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable or invalid YAML: the fixes are then generic
        recipe_data = None
    try:
        status = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    findings = diagnose_history(records, settings_from_recipe_data(recipe_data), since_step=since)
    return RunDiagnosis(source=source, status=status if isinstance(status, str) else None, records=len(records),
                        findings=tuple(findings))

"""A run's output folder: the files a run leaves there, and the rules for reusing the folder.

    adapter_model.safetensors, adapter_config.json   the LoRA adapter (`PeftModel.from_pretrained(base, dir)`)
    tokenizer.json, tokenizer_config.json, ...       the tokenizer the run used
    recipe.yaml                                      the recipe as run, every `auto` resolved
    doctor-report.json                               the checks the run was gated on
    requirements.lock.txt                            the exact installed packages (pip format)
    manifest.json                                    tool version, command, times, machine, status
    metrics.json                                     losses, eval loss before/after, throughput, memory
    loss.png                                         the training and eval loss curves
    checkpoint-N/                                    the Trainer's checkpoints (for --resume)

A folder that is not empty is never reused silently: `--resume` continues from its last complete
checkpoint, `--overwrite` replaces it, and only a folder a previous run made (it has manifest.json)
can be replaced. Writing the files is qlora_doctor/trainer/outputs.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_doctor.core.errors import InputError


MANIFEST = "manifest.json"


METRICS = "metrics.json"


RECIPE = "recipe.yaml"


REPORT = "doctor-report.json"


LOCKFILE = "requirements.lock.txt"


LOSS_PLOT = "loss.png"


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


TRAINER_STATE = "trainer_state.json"


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class OutputPlan:
    """What to do with the output folder, decided before anything is loaded or deleted."""

    output_dir: Path
    replace_existing: bool
    """--overwrite on a folder with a previous run in it: delete it once the checks pass."""
    resume_from: Path | None
    """The last complete checkpoint to continue from (--resume)."""


def plan_output_dir(output_dir: Path, resume: bool, overwrite: bool, where: str,
                    max_steps: int | None = None) -> OutputPlan:
    """Check the output folder against --resume/--overwrite. Raises InputError (exit 2) when it is
    not empty and neither was given, when there is nothing to resume, or when it cannot be replaced;
    NothingToDo (exit 0) for --resume on a finished run that `max_steps` does not extend. A folder whose
    run failed before its first checkpoint is reused without --overwrite."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: choose one (resume continues the run in the output "
                         "folder, overwrite deletes it)")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{where}: training.output_dir: {output_dir} is a file, not a folder; "
                         "choose another training.output_dir")
    empty = not output_dir.exists() or not any(output_dir.iterdir())
    status = None if empty else run_status(output_dir)
    if resume and status == "completed" and not _extends(output_dir, max_steps):
        from qlora_doctor.core.errors import NothingToDo

        raise NothingToDo(f"{where}: training.output_dir: {output_dir} holds a finished run (manifest.json: status "
                          "completed); nothing to resume. To train further, raise training.max_steps or "
                          "num_train_epochs and pass --resume, or start afresh with --overwrite")
    if not empty and not resume and status == "failed" and last_complete_checkpoint(output_dir) is None:
        # our own folder of a run that failed before its first checkpoint: nothing in it is worth keeping
        return OutputPlan(output_dir, replace_existing=True, resume_from=None)
    if resume:
        checkpoint = None if empty else last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise InputError(f"{where}: training.output_dir: {output_dir} has no complete checkpoint "
                             f"(a checkpoint-N folder with {TRAINER_STATE}) to resume from; run without "
                             "--resume to start afresh" + ("" if empty else " (with --overwrite to replace it)"))
        return OutputPlan(output_dir, replace_existing=False, resume_from=checkpoint)
    if empty:
        return OutputPlan(output_dir, replace_existing=False, resume_from=None)
    if not overwrite:
        raise InputError(f"{where}: training.output_dir: {output_dir} is not empty; pass --resume to continue "
                         "its run from the last complete checkpoint, --overwrite to replace it, or choose "
                         "another training.output_dir")
    _refuse_unsafe_delete(output_dir, where)
    return OutputPlan(output_dir, replace_existing=True, resume_from=None)


def _refuse_unsafe_delete(output_dir: Path, where: str) -> None:
    resolved = output_dir.resolve()
    if resolved in (Path.cwd().resolve(), Path.home().resolve()) or resolved == Path(resolved.anchor):
        raise InputError(f"{where}: training.output_dir: {output_dir} is the current, home or root folder; "
                         "--overwrite will not delete it; choose a folder of its own")
    if not (output_dir / MANIFEST).is_file():
        raise InputError(f"{where}: training.output_dir: {output_dir} has files but no {MANIFEST}, so no "
                         "qlora-doctor run made it; --overwrite only replaces a previous run's folder: "
                         "delete it yourself or choose another training.output_dir")


def _extends(output_dir: Path, max_steps: int | None) -> bool:
    """Whether `max_steps` goes past the step the finished run's last checkpoint reached."""
    checkpoint = last_complete_checkpoint(output_dir)
    if max_steps is None or checkpoint is None:
        return False
    try:
        done = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8")).get("global_step", 0)
    except (OSError, ValueError):
        return False
    return isinstance(done, int) and max_steps > done


def run_status(output_dir: Path) -> str | None:
    """The `status` a previous run recorded in manifest.json (running, completed, stopped, failed), None
    when there is no readable manifest."""
    try:
        data = json.loads((Path(output_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The highest checkpoint-N whose trainer_state.json exists and parses. The Trainer writes that
    file last, so a checkpoint without it was cut off while saving and is skipped."""
    found: list[tuple[int, Path]] = []
    for child in Path(output_dir).iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    for _, checkpoint in sorted(found, reverse=True):
        try:
            json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return checkpoint
    return None

"""One rank of a distributed `qlora-doctor run`, started by `accelerate launch` (trainer/distributed.py):

    python -m qlora_doctor.trainer.worker RECIPE [--set K=V ...] --parent-report FILE
        [--replace-existing | --resume-from CHECKPOINT] [--result-file FILE] [--command TEXT]

The parent already checked the output folder and ran the doctor's checks: the worker does not run them
again (on N ranks at once they would probe N times) but records the parent's report, as a one-GPU run
records its own. `--parent-report -` (a scheduler-started multi-host job, `--print-launch`) records that
no parent report was passed. Rank 0 writes `--result-file` (RunResult as JSON) for the parent.

Exit codes as `qlora-doctor run`: 0 done, 1 refused, 2 bad input, 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from qlora_doctor.errors import DoctorError


def report_from_json(data: dict[str, Any]) -> Any:
    """The parent's `Report` back from its JSON (report.to_json())."""
    from qlora_doctor.doctor.report import Check, Report

    checks = tuple(Check(**{**c, "sources": tuple(c.get("sources", ()))}) for c in data["checks"])
    return Report(checks=checks, machine=data.get("machine", {}), packages=data.get("packages", {}),
                  tested=data.get("tested", {}))


def unchecked_report(machine: Any) -> Any:
    """The report recorded when a scheduler started the workers without a parent: one `unknown` check."""
    from qlora_doctor.doctor.report import Check, Report

    return Report(checks=(Check("distributed.parent_check", "unknown", "Checks before a multi-host launch",
                                "the workers were started without `qlora-doctor run` checking first",
                                fix="run `qlora-doctor check --recipe RECIPE` on a host before launching"),),
                  machine=machine.to_json(), packages={})


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qlora_doctor.trainer.worker")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--parent-report", required=True, help="the parent's doctor-report JSON file, or -")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--replace-existing", action="store_true")
    parser.add_argument("--resume-from", type=Path, default=None)
    parser.add_argument("--result-file", type=Path, default=None)
    parser.add_argument("--machine", type=Path, default=None)
    parser.add_argument("--command", default=None)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except DoctorError as err:
        for message in err.messages:
            print(f"error: {message}", file=sys.stderr)
        return err.exit_code


def _run(args: argparse.Namespace) -> int:
    from qlora_doctor.doctor import machine as machine_mod
    from qlora_doctor.trainer import outputs
    from qlora_doctor.trainer.distributed import rank_info
    from qlora_doctor.trainer.recipe import apply_overrides, find_recipe, load_recipe
    from qlora_doctor.trainer.train import run_recipe

    rank = rank_info()
    recipe_path = find_recipe(args.recipe)
    recipe = load_recipe(recipe_path)
    if args.overrides:
        recipe = apply_overrides(recipe, args.overrides)
    machine = (machine_mod.load_machine_file(args.machine) if args.machine else machine_mod.probe_machine())
    if args.parent_report == "-":
        report = unchecked_report(machine)
    else:
        report = report_from_json(json.loads(Path(args.parent_report).read_text(encoding="utf-8")))
    _select_device(rank.local_rank)
    if args.resume_from is not None:
        plan = outputs.OutputPlan(Path(recipe.training.output_dir), replace_existing=False,
                                  resume_from=args.resume_from)
    else:
        plan = outputs.OutputPlan(Path(recipe.training.output_dir), replace_existing=args.replace_existing,
                                  resume_from=None)
    result = run_recipe(recipe, machine, where=str(recipe_path), skip_check=args.skip_check,
                        command=args.command or f"python -m qlora_doctor.trainer.worker {args.recipe}",
                        diagnose=lambda *_a, **_k: report, output_plan=plan)
    _leave_process_group()
    if rank.is_main and args.result_file is not None:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        outputs.write_json(args.result_file, {**data, "files": list(result.files)})
    if result.stopped_by is not None:
        import signal

        return 128 + signal.Signals[result.stopped_by].value
    return 0


def _leave_process_group() -> None:
    """After the last collective (the adapter gather): tear down this rank's process group, which torch
    otherwise warns leaks resources at exit (seen in every FSDP rank's log on the GPUs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _select_device(local_rank: int) -> None:
    """Make this rank's GPU the current one before loading: FSDP's rank-0 loading and bitsandbytes
    quantize onto the current device."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)


if __name__ == "__main__":
    sys.exit(main())

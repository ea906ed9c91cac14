"""One rank of a distributed `qlora-doctor run`, started by `accelerate launch` (trainer/distributed.py):

    python -m qlora_doctor.cli.worker --run-plan FILE --parent-report FILE [--result-file FILE] [--command TEXT]
    python -m qlora_doctor.cli.worker --recipe RECIPE [--set K=V ...] --parent-report -      (--print-launch)

The parent decided the run plan and ran the doctor's checks: the worker reads both as data and decides
nothing again (on N ranks at once the checks would probe N times). A scheduler-started multi-host job
(`--print-launch`) has no parent: each host builds the same plan from the recipe, and the report records
that no parent checked. Rank 0 writes `--result-file` (RunResult as JSON) for the parent.

Exit codes as `qlora-doctor run`: 0 done, 1 refused, 2 bad input, 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from qlora_doctor.core.errors import DoctorError


def unchecked_report(machine: Any) -> Any:
    """The report recorded when a scheduler started the workers without a parent: one `unknown` check."""
    from qlora_doctor.core.report import Check, Report

    return Report(checks=(Check("distributed.parent_check", "unknown", "Checks before a multi-host launch",
                                "the workers were started without `qlora-doctor run` checking first",
                                fix="run `qlora-doctor check --recipe RECIPE` on a host before launching"),),
                  machine=machine.to_json(), packages={})


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qlora_doctor.cli.worker")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-plan", type=Path, help="the parent's run plan (RunPlan.to_json) as a JSON file")
    source.add_argument("--recipe", help="multi-host launches: build the plan from this recipe on each host")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--parent-report", required=True, help="the parent's doctor-report JSON file, or -")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--result-file", type=Path, default=None)
    parser.add_argument("--machine", type=Path, default=None)
    parser.add_argument("--command", default=None)
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None, model_loader: Any = None) -> int:
    """Run one rank; `model_loader` is the trainer's seam (trainer/train.py build_training), for benchmarks."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args, model_loader)
    except DoctorError as err:
        for message in err.messages:
            print(f"error: {message}", file=sys.stderr)
        return err.exit_code


def _run(args: argparse.Namespace, model_loader: Any = None) -> int:
    from qlora_doctor.core.machine import load_machine_file
    from qlora_doctor.core.report import report_from_json
    from qlora_doctor.runplan import RunPlan, build_run_plan
    from qlora_doctor.sources.machine import probe_machine
    from qlora_doctor.trainer import outputs
    from qlora_doctor.trainer.ranks import rank_info
    from qlora_doctor.trainer.train import run_training

    rank = rank_info()
    machine = load_machine_file(args.machine) if args.machine else probe_machine()
    if args.run_plan is not None:
        run = RunPlan.from_json(json.loads(args.run_plan.read_text(encoding="utf-8")))
    else:
        from qlora_doctor.recipe.schema import apply_overrides, find_recipe, load_recipe

        path = find_recipe(args.recipe)
        recipe = apply_overrides(load_recipe(path), args.overrides) if args.overrides else load_recipe(path)
        run = build_run_plan(recipe, machine, where=str(path), decide_output=True)
    if args.parent_report == "-":
        report = unchecked_report(machine)
    else:
        report = report_from_json(json.loads(Path(args.parent_report).read_text(encoding="utf-8")))
    _select_device(rank.local_rank)
    result = run_training(run, machine, report, skip_check=args.skip_check, model_loader=model_loader,
                          command=args.command or f"python -m qlora_doctor.cli.worker {args.run_plan or args.recipe}")
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

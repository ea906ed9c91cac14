"""`qlora-doctor run` on several GPUs: the `accelerate launch` command for a recipe's `distributed:`
section, the environment the launched processes get, and the rank facts a worker reads.

The parent (`qlora-doctor run`) decides the run plan (output folder included) and runs the doctor's
checks once; only then does it start `accelerate launch ... --module qlora_doctor.cli.worker --run-plan
FILE ...` as an argument list (never a shell string), with this process's environment passed through unchanged plus PYTHONPATH
naming the folder qlora_doctor is imported from (so an uninstalled checkout works) - which also keeps
NCCL's NVLink multicast guards (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1) in every rank when they are set. Each rank runs `run_training` on the parent's plan, the same
training path as a one-GPU run; only rank 0 writes files.

FSDP-QLoRA follows the transformers/peft recipe (https://huggingface.co/docs/peft/accelerate/fsdp,
"Use PEFT QLoRA and FSDP for finetuning large models on multiple GPUs"; answerdotai/fsdp_qlora):
4-bit weights stored in the compute dtype (`bnb_4bit_quant_storage`, set by trainer/model.py), FSDP1
with `use_orig_params` (frozen and trainable weights in one flat parameter), transformer-based
auto-wrap (accelerate wraps the model's `_no_split_modules`, e.g. LlamaDecoderLayer, unless
`distributed.fsdp_auto_wrap_layer` names a class), `cpu_ram_efficient_loading` + `sync_module_states`
(rank 0 reads the checkpoint, the others start on the meta device and receive it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence


from qlora_doctor.runplan import resolve_num_processes

if TYPE_CHECKING:
    from qlora_doctor.core.machine import Machine
    from qlora_doctor.core.report import Report
    from qlora_doctor.runplan import RunPlan
    from qlora_doctor.recipe.precision import Precision
    from qlora_doctor.recipe.schema import Recipe

WORKER_MODULE = "qlora_doctor.cli.worker"


MULTI_HOST_PLACEHOLDERS = {
    "--num_machines": "$NUM_MACHINES",
    "--machine_rank": "$MACHINE_RANK",
    "--main_process_ip": "$MAIN_PROCESS_IP",
}
"""What `--print-launch` leaves to the scheduler: every host runs the same command with its own values."""


def mixed_precision_flag(precision: Precision) -> str:
    return "bf16" if precision.bf16 else "fp16" if precision.fp16 else "no"


def launch_argv(recipe: Recipe, precision: Precision, num_processes: int, worker_args: Sequence[str], *,
                python: str = sys.executable, multi_host: bool = False) -> list[str]:
    """The `accelerate launch` command, as an argument list, that starts `num_processes` workers on this
    host running `python -m qlora_doctor.cli.worker WORKER_ARGS`. `multi_host`: leave the machine
    count, rank and rank 0's address to the scheduler (see MULTI_HOST_PLACEHOLDERS)."""
    d = recipe.distributed
    argv = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if multi_host:
        for flag, value in MULTI_HOST_PLACEHOLDERS.items():
            argv += [flag, value]
    else:
        argv += ["--num_machines", "1"]
    if d.main_process_port is not None:
        argv += ["--main_process_port", str(d.main_process_port)]
    argv += ["--mixed_precision", mixed_precision_flag(precision), "--dynamo_backend", "no"]
    if d.strategy == "ddp":
        # Also on a CPU: accelerate's `--cpu` runs several processes only through mpirun, `--multi_gpu`
        # starts them with torchrun, which without CUDA gives gloo ranks (how the CPU test runs DDP).
        # `--use_fsdp` starts torchrun itself, and accelerate refuses it together with --multi_gpu.
        argv += ["--multi_gpu"]
    if d.strategy == "fsdp":
        argv += ["--use_fsdp", "--fsdp_version", "1",
                 "--fsdp_sharding_strategy", "FULL_SHARD",
                 "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_use_orig_params", "true",
                 "--fsdp_cpu_ram_efficient_loading", "true",
                 "--fsdp_sync_module_states", "true",
                 "--fsdp_offload_params", "true" if d.fsdp_offload_params else "false",
                 "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
        if d.fsdp_auto_wrap_layer:
            argv += ["--fsdp_transformer_layer_cls_to_wrap", d.fsdp_auto_wrap_layer]
    argv += ["--module", WORKER_MODULE, *worker_args]
    return argv


ALLOCATOR_SETTINGS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
"""torch's caching-allocator settings (the second is the name torch >= 2.9 prefers)."""


def child_environment(environ: Mapping[str, str] | None = None, strategy: str = "ddp") -> dict[str, str]:
    """The launched processes' environment: this one, unchanged (multicast guards, CUDA_VISIBLE_DEVICES,
    HF_HOME ... pass through), plus the folder qlora_doctor is imported from at the front of PYTHONPATH
    so `python -m qlora_doctor.cli.worker` finds the same code when it is not pip-installed.

    FSDP ranks also get `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` unless an allocator setting is
    already there: FSDP gathers and frees every layer's weights around each use, and at long sequences
    that fragmented the cache until a 70B rank ran out of memory in its first forward pass with 22 GiB
    reserved but unallocated (2 x H100, bench/results/distributed_h100x2/fsdp/attempt_no_expandable_segments_run.log)."""
    env = dict(os.environ if environ is None else environ)
    if strategy == "fsdp" and not any(env.get(k) for k in ALLOCATOR_SETTINGS):
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if package_root not in parts:
        parts.insert(0, package_root)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer pool per rank would oversubscribe
    return env


def print_launch_text(argv: Sequence[str]) -> str:
    """`--print-launch`: the command for each host of a multi-host job, with what to fill in."""
    import shlex

    command = shlex.join(argv)
    for value in MULTI_HOST_PLACEHOLDERS.values():  # shlex quotes `$X`; leave it for the shell to expand
        command = command.replace(shlex.quote(value), value)
    return (
        "# Run this on every host of the job (e.g. from an sbatch script), after `qlora-doctor check --recipe`.\n"
        "# Fill in per host: NUM_MACHINES = hosts in the job; MACHINE_RANK = this host's index 0..NUM_MACHINES-1\n"
        "# (e.g. $SLURM_NODEID); MAIN_PROCESS_IP = the address of host 0 (e.g. the first name in\n"
        "# $SLURM_JOB_NODELIST), reachable from every host on the main process port.\n"
        "# --num_processes counts the processes on ALL hosts (GPUs per host x NUM_MACHINES): edit it to match.\n"
        "# The workers skip the doctor's checks (--parent-report -, recorded as not checked): run `qlora-doctor check --recipe` on one host first.\n"
        f"{command}\n")


def worker_args(*, run_plan: str, parent_report: str, skip_check: bool = False, result_file: Path | None = None,
                machine_file: Path | None = None, command: str | None = None) -> list[str]:
    """The worker's arguments (qlora_doctor/cli/worker.py): the run plan and the doctor's report as JSON
    files the parent wrote, so no rank decides or checks anything again. `--print-launch` passes
    `--run-plan RECIPE_FILE --recipe-mode` instead (see qlora_doctor/cli/run.py)."""
    args = ["--run-plan", run_plan, "--parent-report", parent_report]
    args += ["--skip-check"] if skip_check else []
    args += ["--result-file", str(result_file)] if result_file is not None else []
    args += ["--machine", str(machine_file)] if machine_file is not None else []
    args += ["--command", command] if command else []
    return args


def launch_training(run: RunPlan, machine: Machine, report: Report, *, skip_check: bool = False,
                    machine_file: Path | None = None, command: str = "qlora-doctor run", runner=None):
    """`qlora-doctor run` for distributed.strategy ddp/fsdp, after the CLI decided the run plan and ran the
    doctor's checks once: `accelerate launch` of the workers, which receive the plan and the report as
    data, train, and (rank 0) write the same outputs as a one-GPU run. `runner` (default
    run_forwarding_signals) is the test seam. Returns the RunResult rank 0 wrote."""
    import json
    import tempfile

    from qlora_doctor.core.errors import CheckFailed
    from qlora_doctor.trainer import outputs
    from qlora_doctor.trainer.train import RunResult

    processes = resolve_num_processes(run.recipe, machine, run.where)
    with tempfile.TemporaryDirectory(prefix="qlora-doctor-launch-") as tmp:
        plan_file = Path(tmp) / "run-plan.json"
        report_file, result_file = Path(tmp) / "parent-report.json", Path(tmp) / "result.json"
        outputs.write_json(plan_file, run.to_json())
        outputs.write_json(report_file, report.to_json())
        args = worker_args(run_plan=str(plan_file), parent_report=str(report_file), skip_check=skip_check,
                           result_file=result_file, machine_file=machine_file, command=command)
        argv = launch_argv(run.recipe, run.precision, processes, args)
        completed = (runner or run_forwarding_signals)(argv, env=child_environment(strategy=run.recipe.distributed.strategy),
                                                        check=False)
        if not result_file.is_file():
            raise CheckFailed(f"{run.where}: the {processes} training processes ({run.recipe.distributed.strategy}) "
                              f"exited with status {completed.returncode} before rank 0 wrote its result; the error "
                              "is above (search it with `qlora-doctor explain`)")
        data = json.loads(result_file.read_text(encoding="utf-8"))
    data["output_dir"] = Path(data["output_dir"])
    data["resumed_from"] = Path(data["resumed_from"]) if data["resumed_from"] else None
    data["files"] = tuple(data["files"])
    return RunResult(**data)


def run_forwarding_signals(argv: Sequence[str], env: Mapping[str, str], check: bool = False):
    """Run the launcher and wait for it. A SIGTERM to this process (a scheduler's) is passed on to it:
    torchrun passes it to the ranks, whose Trainer saves a checkpoint and stops (`--resume` continues).
    Ctrl-C already reaches every process of the terminal's group, so SIGINT is only waited out here."""
    import signal
    import subprocess

    proc = subprocess.Popen(list(argv), env=dict(env))
    handlers = {signal.SIGTERM: lambda signum, frame: proc.send_signal(signum),
                signal.SIGINT: lambda signum, frame: None}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(list(argv), returncode)

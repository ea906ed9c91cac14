"""distributed.strategy ddp/fsdp: the recipe section, the `accelerate launch` command and environment,
the parent/worker split of `qlora-doctor run`, and the doctor's distributed checks on described machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qlora_doctor.cli import cli
from qlora_doctor.doctor import distributed as distributed_checks
from qlora_doctor.doctor.recipe import recipe_checks
from qlora_doctor.core.report import Check, Report
from qlora_doctor.core.errors import CheckFailed, InputError
from qlora_doctor.trainer import distributed
from qlora_doctor.trainer.ranks import rank_info
from qlora_doctor.recipe.schema import apply_overrides, load_recipe
from qlora_doctor.recipe.precision import resolve_precision
from qlora_doctor.runplan import RunPlan, build_run_plan
from qlora_doctor.core.report import report_from_json

from helpers import CPU_MACHINE, machine, write_machine
from tests.trainer_support import builtin_checkpoint, write_tiny_recipe  # noqa: F401 (fixture)

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_total_mib": 81559}
A100_40 = {"name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0", "memory_total_mib": 40960}
GPU_13GB = {"name": "NVIDIA Small", "compute_capability": "8.9", "memory_total_mib": 13312}
GPU_15GB = {"name": "NVIDIA Small", "compute_capability": "8.9", "memory_total_mib": 15360}
LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, tie_word_embeddings=False)
GUARDS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def recipe(*overrides: str):
    return apply_overrides(load_recipe("demo"), list(overrides))


def by_id(checks, check_id):
    matching = [c for c in checks if c.id == check_id]
    assert len(matching) == 1, [c.id for c in checks]
    return matching[0]


@pytest.fixture
def nccl(monkeypatch):
    """This CPU torch has no NCCL; the checks judge the described GPU machine as if it had."""
    monkeypatch.setattr(distributed_checks, "nccl_available", lambda: True)


@pytest.fixture
def llama8b_config(tmp_path) -> Path:
    folder = tmp_path / "llama-3-8b-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def run_fsdp_worker(out: Path, mode: str, processes: int) -> subprocess.CompletedProcess:
    """tests/fsdp_cpu_worker.py MODE on `processes` gloo ranks (torch.distributed.run), writing to `out`."""
    worker = Path(__file__).with_name("fsdp_cpu_worker.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(worker), str(out), mode],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


# --- the recipe section ---------------------------------------------------------------------------

def test_default_is_one_process_and_older_recipes_stay_valid():
    r = load_recipe("demo")
    assert r.distributed.strategy == "none" and r.distributed.num_processes == "auto"


@pytest.mark.parametrize("override, message", [
    ("distributed.strategy=mpi", "distributed.strategy: 'mpi' is not one of none, ddp, fsdp"),
    ("distributed.num_processes=0", "distributed.num_processes: must be between 1 and 1024"),
    ("distributed.num_processes='2'", "distributed.num_processes"),
    ("distributed.nproc=2", "distributed.nproc: unknown key 'nproc'"),
    ("distributed.main_process_port=80", "distributed.main_process_port"),
])
def test_bad_section_values_name_the_key(override, message):
    with pytest.raises(InputError) as err:
        recipe(override)
    assert any(message in m for m in err.value.messages), err.value.messages


def test_fsdp_with_uint8_storage_is_refused_with_the_fix():
    with pytest.raises(InputError) as err:
        recipe("distributed.strategy=fsdp", "quantization.bnb_4bit_quant_storage=uint8")
    assert any("bnb_4bit_quant_storage: bfloat16" in m for m in err.value.messages), err.value.messages


def test_errors_from_a_file_carry_its_path(tmp_path):
    text = (Path(__file__).parent.parent / "recipes" / "demo.yaml").read_text()
    path = tmp_path / "d.yaml"
    path.write_text(text.replace("dataset:\n", "distributed:\n  strategy: ddp\n  num_processes: -1\ndataset:\n", 1)
                    .replace("path: data/", f"path: {Path(__file__).parent.parent / 'recipes' / 'data'}/"))
    with pytest.raises(InputError) as err:
        load_recipe(path)
    assert any(m.endswith("distributed.num_processes: must be between 1 and 1024 (one per GPU) or `auto`, got -1")
               and "d.yaml" in m for m in err.value.messages), err.value.messages


def test_fsdp_stores_4bit_weights_in_the_compute_dtype():
    from qlora_doctor.trainer.model import quantization_config

    r = recipe("distributed.strategy=fsdp")
    precision = resolve_precision(r, machine(gpus=[H100, H100]))
    config = quantization_config(r, precision)
    assert str(config.bnb_4bit_quant_storage) == "torch.bfloat16" == str(config.bnb_4bit_compute_dtype)
    assert "bnb_4bit_quant_storage" not in recipe().quantization.bnb_kwargs(precision)


def test_ddp_turns_off_the_unused_parameter_search():
    from qlora_doctor.trainer.arguments import training_arguments_kwargs

    r = recipe("distributed.strategy=ddp")
    precision = resolve_precision(r, machine(gpus=[H100, H100]))
    assert training_arguments_kwargs(r, precision)["ddp_find_unused_parameters"] is False
    assert "ddp_find_unused_parameters" not in training_arguments_kwargs(recipe(), precision)


def test_device_map_follows_local_rank(monkeypatch):
    from qlora_doctor.trainer.model import device_map

    precision = resolve_precision(recipe(), machine(gpus=[H100, H100]))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_map(precision, "ddp") == {"": 1}
    assert device_map(precision, "fsdp") is None  # FSDP places the shards; rank 0 reads the checkpoint
    monkeypatch.delenv("LOCAL_RANK")
    assert device_map(precision) == {"": 0}


class _LossModel:
    """A model with a `**kwargs` forward, as PeftModel's: the Trainer then passes num_items_in_batch and
    scales the loss under average_tokens_across_devices (where n_gpu multiplies it)."""

    @staticmethod
    def build():
        import torch

        class LossModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.tensor(0.5))

            def forward(self, input_ids=None, labels=None, **kwargs):
                loss = (self.weight * labels.float()).sum() / kwargs.get("num_items_in_batch", labels.numel())
                return {"loss": loss}

        return LossModel()


def test_strategy_none_on_a_two_gpu_machine_trains_the_recipes_batch_on_one_gpu(monkeypatch, tmp_path):
    """Without a launcher, transformers counts every visible GPU as n_gpu and then doubles the micro-batch
    and the loss on two GPUs (the first 2 x H100 bench); the run must train the recipe's batch, its loss
    unscaled. The machine is faked where TrainingArguments reads it: torch.cuda.device_count()."""
    import dataclasses

    import torch
    from transformers import Trainer

    from qlora_doctor.trainer.arguments import training_arguments_kwargs
    from qlora_doctor.trainer.train import training_arguments

    r = recipe("training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
               f"training.output_dir={tmp_path / 'out'}")
    # GPU 0's precision without bf16 (whose check would look for a real GPU): use_cpu is False, so
    # TrainingArguments counts the CUDA devices as on the GPU machine.
    precision = dataclasses.replace(resolve_precision(r, machine(**CPU_MACHINE)), device="cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    kwargs = {**training_arguments_kwargs(r, precision), "eval_strategy": "no"}
    args, gpus = training_arguments(r, precision, **kwargs, label_names=["labels"])
    assert args.n_gpu == 1 and args.train_batch_size == 2
    assert gpus.to_json() == {"visible": 2, "used": 1, "idle": 1, "trainer_n_gpu": 1,
                              "note": "1 of the 2 visible GPUs stayed unused; `distributed.strategy: ddp` trains "
                                      "on all of them"}

    rows = [{"input_ids": [1, 2, 3], "labels": [1, 1, 1]} for _ in range(8)]
    trainer = Trainer(model=_LossModel.build(), args=args, train_dataset=rows)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2  # the recipe's micro-batch, not 2 per "GPU"
    # 6 label tokens in the micro-batch, each contributing 0.5: the mean is 0.5, not 2 x 0.5
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(6))
    assert loss.item() == pytest.approx(0.5)


def test_ddp_ranks_record_their_gpus(monkeypatch, tmp_path):
    import torch

    from qlora_doctor.trainer.train import GpuUse

    assert GpuUse("ddp", visible=4, used=2, trainer_n_gpu=1).to_json()["note"] == (
        "2 of the 4 visible GPUs stayed unused; `distributed.num_processes: auto` starts one process per GPU")
    assert "note" not in GpuUse("none", visible=1, used=1, trainer_n_gpu=1).to_json()
    assert GpuUse("none", visible=0, used=0, trainer_n_gpu=0).to_json()["idle"] == 0


def test_throughput_records_each_steps_tokens_and_when_it_ended(monkeypatch):
    """One row per optimizer step, all ranks' tokens (num_input_tokens_seen is gathered), so a bench can
    time the steps after warm-up by differences of `ended_at`."""
    from types import SimpleNamespace

    from qlora_doctor.trainer import callbacks

    clock = iter([100.0, 100.5, 102.0, 102.25, 103.0])  # train begin, step 1 begin/end, step 2 begin/end
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    throughput = callbacks.Throughput()
    state = SimpleNamespace(num_input_tokens_seen=4096, global_step=10)  # resumed: counts from here
    throughput.on_train_begin(None, state, None)
    for tokens in (8192, 8192):
        throughput.on_step_begin(None, state, None)
        state.num_input_tokens_seen += tokens
        state.global_step += 1
        throughput.on_step_end(None, state, None)
    assert throughput.steps == [{"step": 11, "tokens": 8192, "seconds": 1.5, "ended_at": 2.0},
                                {"step": 12, "tokens": 8192, "seconds": 0.75, "ended_at": 3.0}]
    assert throughput.tokens == 16384 and throughput.seconds == 2.25


# --- the launch command ---------------------------------------------------------------------------

def test_ddp_argv_is_a_list_for_accelerate_with_the_worker_module():
    r = recipe("distributed.strategy=ddp", "distributed.main_process_port=29611")
    precision = resolve_precision(r, machine(gpus=[H100, H100]))
    args = distributed.worker_args(run_plan="/tmp/plan.json", parent_report="/tmp/rep.json")
    argv = distributed.launch_argv(r, precision, 2, args, python="/py")
    assert argv[:5] == ["/py", "-m", "accelerate.commands.launch", "--num_processes", "2"]
    assert all(isinstance(a, str) for a in argv)
    joined = " ".join(argv)
    assert "--multi_gpu" in argv and "--use_fsdp" not in argv
    assert "--num_machines 1" in joined and "--main_process_port 29611" in joined and "--mixed_precision bf16" in joined
    assert argv[argv.index("--module") + 1:] == ["qlora_doctor.cli.worker", "--run-plan", "/tmp/plan.json",
                                                  "--parent-report", "/tmp/rep.json"]


def test_fsdp_argv_has_the_fsdp_qlora_settings():
    r = recipe("distributed.strategy=fsdp", "distributed.fsdp_auto_wrap_layer=LlamaDecoderLayer")
    precision = resolve_precision(r, machine(gpus=[H100, H100]))
    argv = distributed.launch_argv(r, precision, 2, ["x.yaml"])
    pairs = dict(zip(argv, argv[1:]))
    assert "--use_fsdp" in argv and "--multi_gpu" not in argv
    assert pairs["--fsdp_use_orig_params"] == "true"
    assert pairs["--fsdp_cpu_ram_efficient_loading"] == "true" and pairs["--fsdp_sync_module_states"] == "true"
    assert pairs["--fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert pairs["--fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert pairs["--fsdp_version"] == "1"


@pytest.mark.parametrize("gpus", [[], [H100, H100]])
def test_one_launcher_flag_per_strategy(gpus):
    """accelerate refuses `--multi_gpu` together with `--use_fsdp` (found on a CPU run)."""
    for strategy, flag in (("ddp", "--multi_gpu"), ("fsdp", "--use_fsdp")):
        r = recipe(f"distributed.strategy={strategy}")
        argv = distributed.launch_argv(r, resolve_precision(r, machine(gpus=gpus)), 2, ["x.yaml"])
        flags = [a for a in argv if a in ("--cpu", "--multi_gpu", "--use_fsdp", "--use_deepspeed", "--tpu")]
        assert flags == [flag], (strategy, gpus, argv)


def test_fsdp_without_a_gpu_fails_with_accelerates_error():
    check = by_id(recipe_checks(recipe("distributed.strategy=fsdp", "distributed.num_processes=2"),
                                machine(**CPU_MACHINE)), "recipe.distributed.gpus")
    assert check.status == "fail" and "no available devices found" in check.detail
    assert "distributed.strategy: ddp" in check.fix


def test_accelerate_parses_the_argv():
    """The flags are accelerate 1.x's own: its parser accepts every one of them."""
    from accelerate.commands.launch import launch_command_parser

    r = recipe("distributed.strategy=fsdp")
    argv = distributed.launch_argv(r, resolve_precision(r, machine(gpus=[H100, H100])), 2, ["x.yaml", "--set=a.b=1"])
    parsed = launch_command_parser().parse_args(argv[3:])
    assert parsed.use_fsdp and parsed.num_processes == 2 and parsed.module
    assert parsed.training_script == "qlora_doctor.cli.worker"
    assert parsed.training_script_args == ["x.yaml", "--set=a.b=1"]


def test_print_launch_for_a_multi_host_job(tmp_path):
    machine_file = write_machine(tmp_path / "m.json", gpus=[H100] * 8)
    result = CliRunner().invoke(cli, ["run", "demo", "--set", "distributed.strategy=fsdp", "--machine",
                                      str(machine_file), "--print-launch"])
    assert result.exit_code == 0, result.output
    command = [line for line in result.output.splitlines() if not line.startswith("#")]
    assert len(command) == 1
    line = command[0]
    assert line.startswith("python3 -m accelerate.commands.launch --num_processes 8 ")
    # the scheduler fills these in; left unquoted so the host's shell expands them
    for flag, value in distributed.MULTI_HOST_PLACEHOLDERS.items():
        assert f"{flag} {value}" in line
    assert "--use_fsdp" in line and "--module qlora_doctor.cli.worker" in line
    assert "--set=distributed.strategy=fsdp --parent-report -" in line
    assert "MACHINE_RANK = this host's index" in result.output and "MAIN_PROCESS_IP" in result.output


def test_print_launch_without_a_strategy_is_a_usage_error():
    result = CliRunner().invoke(cli, ["run", "demo", "--print-launch"])
    assert result.exit_code == 2, result.output
    assert "distributed.strategy: ddp" in result.output


def test_auto_processes_without_gpus_names_the_fix():
    r = recipe("distributed.strategy=ddp")
    with pytest.raises(InputError, match="distributed.num_processes: N"):
        distributed.resolve_num_processes(r, machine(**CPU_MACHINE), "demo.yaml")
    assert distributed.resolve_num_processes(r, machine(gpus=[H100] * 4), "demo.yaml") == 4


# --- the environment of the launched processes -----------------------------------------------------

def test_child_environment_passes_everything_through_and_finds_the_package(monkeypatch, tmp_path):
    for key, value in GUARDS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = distributed.child_environment()
    code = ("import json, os, qlora_doctor; print(json.dumps({k: os.environ.get(k) for k in %r} | "
            "{'pkg': qlora_doctor.__file__}))" % (list(GUARDS),))
    # from another folder, as accelerate's children start: qlora_doctor must come from PYTHONPATH
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    seen = json.loads(out.stdout)
    assert {k: seen[k] for k in GUARDS} == GUARDS
    assert Path(seen["pkg"]).resolve() == Path(distributed.__file__).resolve().parent.parent / "__init__.py"
    assert env["PYTHONPATH"].split(":")[1] == "/somewhere/else"


def _report(status: str) -> Report:
    return Report(checks=(Check("x.check", status, "A check", "detail", fix="the fix"),), machine={}, packages={})


def test_run_distributed_launches_with_the_guards_and_reports_a_worker_crash(monkeypatch, tmp_path):
    for key, value in GUARDS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    r = recipe("distributed.strategy=ddp", f"training.output_dir={tmp_path / 'out'}")
    calls = []

    def runner(argv, env, check):
        calls.append((argv, env))
        return subprocess.CompletedProcess(argv, 3)

    m = machine(gpus=[H100, H100])
    plan = build_run_plan(r, m, where="demo", decide_output=True)
    with pytest.raises(CheckFailed, match="exited with status 3 before rank 0 wrote its result"):
        distributed.launch_training(plan, m, _report("pass"), runner=runner)
    (argv, env), = calls
    assert {k: env[k] for k in GUARDS} == GUARDS
    assert "--parent-report" in argv and argv[argv.index("--num_processes") + 1] == "2"
    assert not (tmp_path / "out").exists()  # the parent writes nothing; rank 0 does


def test_sigterm_to_the_parent_reaches_the_launched_process(tmp_path):
    import os
    import signal
    import threading

    ready, got = tmp_path / "ready", tmp_path / "got"
    child = ("import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(got)!r}).write_text('SIGTERM'), sys.exit(7)))\n"
             f"pathlib.Path({str(ready)!r}).write_text('1')\n"
             "time.sleep(60)\n")

    def kill_parent_when_ready():
        for _ in range(300):
            if ready.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(0.05)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=kill_parent_when_ready, daemon=True).start()
    completed = distributed.run_forwarding_signals([sys.executable, "-c", child], os.environ)
    assert completed.returncode == 7 and got.read_text() == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # this process's own handling is back


def test_the_run_plan_reaches_the_ranks_as_data():
    """What a launched rank reads back is the parent's plan: same recipe, precision, levers, processes and
    output decision, nothing decided again."""
    r = recipe("distributed.strategy=ddp", "performance.checkpoint_layers=2")
    m = machine(gpus=[H100, H100])
    plan = build_run_plan(r, m, where="demo", decide_output=True)
    again = RunPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.recipe == plan.recipe and again.precision == plan.precision
    assert again.levers == plan.levers and again.num_processes == plan.num_processes == 2
    assert again.output == plan.output and again.cudnn_hazards == plan.cudnn_hazards


def test_distributed_run_refuses_in_the_parent_before_launching(tmp_path, monkeypatch):
    """A failing check stops `run` in the parent: no rank is launched, nothing is written (the installed
    torch here is a CPU build, which fails `torch.build` on a described 2 x H100 machine)."""
    monkeypatch.chdir(tmp_path)
    recipe_file = write_tiny_recipe(tmp_path)
    gpus = write_machine(tmp_path / "h100x2.json", gpus=[H100, H100])
    result = CliRunner().invoke(cli, ["run", str(recipe_file), "--machine", str(gpus),
                                      "--set", "distributed.strategy=ddp"])
    assert result.exit_code == 1, result.output
    assert "training refused" in result.output
    assert not (tmp_path / "out").exists()


def test_worker_records_the_parents_report():
    report = _report("warn")
    again = report_from_json(json.loads(json.dumps(report.to_json())))
    assert again == report and again.status == "warn"


def test_rank_info_from_the_launcher_variables():
    info = rank_info({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (3, 1, 4, False)
    assert rank_info({}).is_main


# --- the doctor's checks --------------------------------------------------------------------------

def test_single_gpu_recipes_get_no_distributed_checks_but_a_note_about_idle_gpus():
    assert not [c for c in recipe_checks(recipe(), machine(gpus=[H100])) if c.id.startswith("recipe.distributed")]
    checks = [c for c in recipe_checks(recipe(), machine(gpus=[H100, H100, H100]))
              if c.id.startswith("recipe.distributed")]
    assert [(c.id, c.status, c.found) for c in checks] == [("recipe.distributed.gpus", "pass", "3 GPUs")]
    assert "the other 2 of the 3 GPUs stay idle" in checks[0].detail
    assert "`distributed.strategy: ddp` trains on all 3" in checks[0].detail


def test_two_processes_on_one_gpu_fail_and_two_gpus_pass(tmp_path, nccl):
    r = recipe("distributed.strategy=ddp", "distributed.num_processes=2")
    one = by_id(recipe_checks(r, machine(gpus=[H100])), "recipe.distributed.gpus")
    assert one.status == "fail" and "distributed.num_processes: 1" in one.fix
    two = by_id(recipe_checks(r, machine(gpus=[H100, H100])), "recipe.distributed.gpus")
    assert two.status == "pass" and two.detail == "2 x NVIDIA H100 80GB HBM3"


def test_check_cli_with_machine_files(tmp_path, nccl):
    path = tmp_path / "r.yaml"
    demo = (Path(__file__).parent.parent / "recipes" / "demo.yaml").read_text()
    path.write_text(demo.replace("data/", str(Path(__file__).parent.parent / "recipes" / "data") + "/")
                    + "distributed:\n  strategy: ddp\n  num_processes: 2\n")
    for gpus, expected in (([H100], 1), ([H100, H100], 0)):
        machine_file = write_machine(tmp_path / f"m{len(gpus)}.json", gpus=gpus)
        result = CliRunner().invoke(cli, ["check", "--recipe", str(path), "--machine", str(machine_file), "--json"])
        report = json.loads(result.output)
        check = by_id([Check(**{**c, "sources": tuple(c["sources"])}) for c in report["checks"]],
                      "recipe.distributed.gpus")
        assert check.status == ("fail" if expected else "pass"), check
        if expected:  # the 2-GPU file can fail other checks here (this CPU torch), so only one way round
            assert result.exit_code == 1 and report["status"] == "fail", result.output


def test_mixed_gpus_warn():
    check = by_id(recipe_checks(recipe("distributed.strategy=ddp"), machine(gpus=[H100, A100_40])),
                  "recipe.distributed.gpus")
    assert check.status == "warn" and "CUDA_VISIBLE_DEVICES" in check.fix


def test_no_nccl_fails(monkeypatch):
    monkeypatch.setattr(distributed_checks, "nccl_available", lambda: False)
    check = by_id(recipe_checks(recipe("distributed.strategy=ddp"), machine(gpus=[H100, H100])),
                  "recipe.distributed.nccl")
    assert check.status == "fail" and "is_nccl_available() is False" in check.detail


def test_nccl_not_checked_on_cpu():
    checks = recipe_checks(recipe("distributed.strategy=ddp", "distributed.num_processes=2"), machine(**CPU_MACHINE))
    assert not [c for c in checks if c.id == "recipe.distributed.nccl"]
    assert by_id(checks, "recipe.distributed.gpus").status == "warn"


def test_ddp_on_a_model_too_big_for_one_gpu_fails_with_fsdp_as_the_fix(llama8b_config, nccl):
    r = recipe(f"model.name_or_path={llama8b_config}", "distributed.strategy=ddp", "distributed.num_processes=2")
    check = by_id(recipe_checks(r, machine(gpus=[GPU_13GB, GPU_13GB])), "recipe.distributed.strategy")
    assert check.status == "fail" and check.fix == "set `distributed.strategy: fsdp` (shards the 4-bit model across the GPUs)"


def test_fsdp_on_a_model_too_big_for_one_gpu_passes_per_rank(llama8b_config, nccl):
    r = recipe(f"model.name_or_path={llama8b_config}", "distributed.strategy=fsdp", "distributed.num_processes=2")
    # 15 GB: under FSDP the LoRA layers are peft's (not fused), whose dropout copies a 13 GB rank lacks room for
    checks = recipe_checks(r, machine(gpus=[GPU_15GB, GPU_15GB]))
    check = by_id(checks, "recipe.distributed.strategy")
    assert check.status == "pass", check
    assert "does not fit" in check.detail and "per rank with 2 ranks" in check.detail
    assert not [c for c in checks if c.id == "recipe.memory"]  # one GPU's fit does not apply to a shard


def test_fsdp_where_one_gpu_would_do_warns(llama8b_config, nccl):
    r = recipe(f"model.name_or_path={llama8b_config}", "distributed.strategy=fsdp")
    check = by_id(recipe_checks(r, machine(gpus=[H100, H100])), "recipe.distributed.strategy")
    assert check.status == "warn" and check.fix == "set `distributed.strategy: ddp`"


@pytest.mark.parametrize("tied, status", [(True, "fail"), (False, "warn")])
def test_fsdp_with_one_process_fails_on_a_tied_embedding_model(tmp_path, nccl, tied, status):
    """One process makes torch's FSDP1 NO_SHARD, whose second step asserts on tied embeddings (Llama-3.2-1B
    shape on one H200; tests/test_distributed.py reproduces it on the CPU below). Untied: only the warning
    that FSDP is pointless where one GPU holds the model."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA3_8B, "tie_word_embeddings": tied}))
    r = recipe(f"model.name_or_path={folder}", "distributed.strategy=fsdp", "distributed.num_processes=1")
    check = by_id(recipe_checks(r, machine(gpus=[H100])), "recipe.distributed.strategy")
    assert check.status == status
    if tied:
        assert "fsdp-no-shard-tied-embeddings" in check.detail
        assert check.fix.startswith("set `distributed.strategy: none`")


def test_one_rank_fsdp_on_tied_embeddings_fails_as_the_rule_says_and_two_ranks_train(tmp_path):
    """The torch behaviour behind the check above, on real FSDP1 ranks (gloo, CPU): with one rank a tied LoRA
    Llama's second step raises the assertion the knowledge base's rule matches; two ranks train 3 steps."""
    pytest.importorskip("peft")
    from qlora_doctor.knowledge.explain import explain_text

    runs = {n: run_fsdp_worker(tmp_path / str(n), "train-tied", n) for n in (1, 2)}
    assert runs[1].returncode != 0
    assert [m.id for m in explain_text(runs[1].stderr).matches][:1] == ["fsdp-no-shard-tied-embeddings"]
    assert runs[2].returncode == 0, runs[2].stderr[-3000:]
    assert json.loads((tmp_path / "2" / "rank0.json").read_text())["steps"] == 3


@pytest.mark.parametrize("save_strategy", ["steps", "no"])
def test_fsdp_checkpoints_are_said_to_be_the_products_and_to_need_the_same_process_count(save_strategy):
    r = recipe("distributed.strategy=fsdp", f"training.save_strategy={save_strategy}")
    check = by_id(recipe_checks(r, machine(gpus=[H100, H100])), "recipe.distributed.checkpoints")
    assert check.status == "pass"
    assert ("same distributed.num_processes" in check.detail) == (save_strategy != "no")
    plain = recipe_checks(recipe(), machine(gpus=[H100, H100]))
    assert not [c for c in plain if c.id == "recipe.distributed.checkpoints"]


def test_fsdp_checkpoint_resumes_exactly_on_two_real_fsdp_ranks(tmp_path):
    """trainer/fsdp_state.py's checkpoint on 2 gloo FSDP1 ranks (peft's wrap policy, as the Trainer builds):
    the gathered adapter and each rank's optimizer shard, loaded into a model with another LoRA init, give
    the same next two losses as training on without a checkpoint."""
    pytest.importorskip("peft")
    done = run_fsdp_worker(tmp_path, "resume", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["loaded"] == 2 * 7 * 2
    assert rank0["resumed"] == rank0["continued"]
    assert sorted(p.name for p in (tmp_path / "checkpoint-2").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.rank0-of-2.pt", "optimizer.rank1-of-2.pt"]


def test_an_fsdp_checkpoint_from_another_process_count_is_refused_with_the_count(tmp_path):
    torch = pytest.importorskip("torch")
    from qlora_doctor.core.errors import InputError
    from qlora_doctor.trainer import fsdp_state

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    fsdp_state.save_optimizer_shard(optimizer, tmp_path, rank=1, world=2)
    fsdp_state.load_optimizer_shard(optimizer, tmp_path, 1, 2)  # the same count loads
    with pytest.raises(InputError, match="written by 2 processes: resume with `distributed.num_processes: 2`"):
        fsdp_state.load_optimizer_shard(optimizer, tmp_path, 0, 4)


def test_the_trainers_fsdp_adapter_checkpoint_crashes_on_one_rank_and_is_empty_on_two(tmp_path):
    """Why the product writes FSDP checkpoints itself (trainer/fsdp_state.py): what accelerate's
    save_fsdp_model(adapter_only=True) does for the Trainer, on real FSDP1 ranks (gloo, CPU): one rank raises the assertion the knowledge base's rule matches (as on
    the H200), two ranks get an adapter with 0 tensors. If an upgrade fixes either, this test says so."""
    pytest.importorskip("peft")
    from qlora_doctor.knowledge.explain import explain_text

    runs = {n: run_fsdp_worker(tmp_path / str(n), "trainer-checkpoint", n) for n in (1, 2)}
    assert runs[1].returncode != 0
    assert "fsdp-peft-trainer-checkpoint" in [m.id for m in explain_text(runs[1].stderr).matches]
    assert runs[2].returncode == 0, runs[2].stderr[-3000:]
    assert json.loads((tmp_path / "2" / "rank0.json").read_text()) == {"adapter_tensors": 0}


def test_ddp_that_fits_one_gpu_passes(llama8b_config, nccl):
    r = recipe(f"model.name_or_path={llama8b_config}", "distributed.strategy=ddp")
    assert by_id(recipe_checks(r, machine(gpus=[H100, H100])), "recipe.distributed.strategy").status == "pass"


def test_fsdp_rank_share_divides_only_the_sharded_rows():
    breakdown = (("4-bit weights (NF4, 2 per byte)", 800), ("activations", 100), ("LoRA weights (float32)", 200))
    # 1000 sharded over 4 ranks = 250, + 2 of 10 layers gathered = 200, + 100 activations
    assert distributed_checks.fsdp_rank_bytes(breakdown, 1100, ranks=4, layers=10) == 550


def test_multicast_guards_are_reported_as_passed_through():
    r = recipe("distributed.strategy=ddp")
    m = machine(gpus=[H100, H100])
    run = build_run_plan(r, m, where="test")
    set_ = distributed_checks.multicast_guard_check(run, m, environ=GUARDS)
    assert set_.status == "pass" and "NCCL_NVLS_ENABLE=0" in set_.found and "passed through" in set_.detail
    unset = distributed_checks.multicast_guard_check(run, m, environ={})
    assert unset.found == "none set"


# --- a real run: two gloo ranks on the CPU ------------------------------------------------------------

@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, builtin_checkpoint):
    """Two ranks (torchrun via accelerate, gloo) train a tiny random Llama in 4 bit on the CPU for 2 steps."""
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(builtin_checkpoint)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    path = write_tiny_recipe(tmp_path, rows=8, max_steps=2, save_strategy="no", per_device_train_batch_size=2)
    data = yaml.safe_load(path.read_text())
    data["model"]["name_or_path"] = "tiny-llama"
    data["distributed"] = {"strategy": "ddp", "num_processes": 2, "main_process_port": 29517}
    path.write_text(yaml.safe_dump(data))

    result = CliRunner().invoke(cli, ["run", str(path), "--json", "--machine",
                                      str(write_machine(tmp_path / "cpu.json", **CPU_MACHINE))])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed_strategy"] == "ddp"
    assert metrics["effective_batch_size"] == 2 * 1 * 2
    assert metrics["steps"] == 2 and metrics["epochs"] == 1.0  # 8 rows / (2 per rank x 2 ranks) = 2 steps
    assert [r["step"] for r in metrics["train_step_history"]] == [1, 2]
    assert sum(r["tokens"] for r in metrics["train_step_history"]) == metrics["train_tokens"] > 0
    assert metrics["gpus"] == {"visible": 0, "used": 0, "idle": 0, "trainer_n_gpu": 0}
    assert (out / "adapter_model.safetensors").is_file()
    report = json.loads((out / "doctor-report.json").read_text())
    assert "recipe.distributed.gpus" in [c["id"] for c in report["checks"]]  # the parent's checks, recorded
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["command"].startswith("qlora-doctor run ")


def test_fsdp_ranks_get_expandable_segments_unless_the_user_set_the_allocator(monkeypatch):
    for key in distributed.ALLOCATOR_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert distributed.child_environment(strategy="fsdp")["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in distributed.child_environment(strategy="ddp")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    env = distributed.child_environment(strategy="fsdp")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:512"


@pytest.mark.parametrize("layout", ["layers", "peft"])
def test_fsdp_adapter_is_gathered_and_saved_from_a_real_fsdp_model(tmp_path, layout):
    """Two gloo ranks wrap a tiny LoRA Llama in FSDP1 - one unit per decoder layer (accelerate's wrap), or
    also one per LoRA Linear (peft's, what the Trainer uses) - so module names hold a nested
    `_fsdp_wrapped_module.`, where peft 0.21's own save finds no adapter key and writes an empty file, as it
    did on 2 H100s. gather_lora_state_dict, one unit at a time, gives rank 0 exactly the LoRA entries of the
    full state dict; saved through trainer/outputs.py, PeftModel.from_pretrained loads exactly the weights the
    ranks started from."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    done = run_fsdp_worker(tmp_path, layout, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["nested_wrapped_modules"] > 0  # the layout that defeats peft's key selection
    # 1 root + 2 layers; peft's policy adds a unit per LoRA Linear (2 layers x 7 modules x A, B)
    assert rank0["fsdp_units"] == (3 if layout == "layers" else 3 + 2 * 7 * 2)
    assert rank0["gathered_keys"] == rank0["full_state_dict_lora_keys"] and rank0["equal_to_full_state_dict"]
    assert rank0["saved"] == 2 * 7 * 2
    before = load_file(tmp_path / "before.safetensors")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), tmp_path)
    after = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[n], before[n]) for n in before)

"""The peer in the throughput bench (issue #20 item 3): unsloth's QLoRA training speed and memory on
the shape, batch, sequence, LoRA settings and optimizer of bench/train_throughput.py, one fresh process
per checkpointing mode.

Each mode: `FastLanguageModel.from_pretrained(load_in_4bit=True)` (NF4 + double quant, bf16 compute),
`get_peft_model` with LoRA r=16, alpha 16, dropout 0 (unsloth's fast path) on q/k/v/o/gate/up/down and
`use_gradient_checkpointing` = "unsloth" (offloaded to host memory) or True (plain), then a hand loop
(forward with labels under bf16 autocast, backward, fused AdamW step, zero_grad). Timed steps follow
--warmup untimed ones, CUDA synchronized at each step's start and end; tokens/s counts the (unpadded)
synthetic tokens; MFU on the 4N basis through train_throughput's own helpers. The checkpoint is the one
train_throughput builds under --models-dir (random weights), built the same way when missing, with a
small tokenizer written beside it (unsloth loads one).

The parent never imports torch or unsloth: it builds the checkpoint in a child, runs each mode in a
child under a share of --budget-s, kills a child that overruns, and rewrites --out after every point;
a mode that fails (unsloth not importable, OOM, time-out) leaves a point with an "error" key and the
traceback or log tail.

    python3 bench/peer_unsloth.py --out /tmp/o2/unsloth.json                     # both modes, 8B, b8, s2048
    python3 bench/peer_unsloth.py --out /tmp/o3/unsloth.json --modes unsloth --shape 1b --seq 512 --batch 4 \
        --warmup 0 --steps 200 --lr 3e-3 --lora-alpha 32 --data memorise --schedule cosine --max-grad-norm 0.3
        # the loss curve beside train_throughput.py --loss-steps 200 --loss-data memorise (the Trainer's settings)
    python3 bench/peer_unsloth.py --out /tmp/u.json --device cpu --shape tiny-8b --seq 64 --batch 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
MODES = {"unsloth": "unsloth", "plain": True}
"""--modes name -> `use_gradient_checkpointing` value: "unsloth" offloads checkpoints to host memory."""
VARIANT = {"unsloth": "unsloth_offload_ckpt", "plain": "unsloth_plain_ckpt"}
PACKAGES = ("torch", "unsloth", "unsloth_zoo", "transformers", "peft", "bitsandbytes", "trl", "accelerate",
            "datasets", "torchao", "triton", "xformers", "flash-attn", "cut_cross_entropy", "huggingface_hub")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TAIL = 4000
TORCH_LOG = re.compile(r"[WIE]\d{4} ")  # torch's own glog-style warnings ("torch.compile" matches BANNER)
BANNER = re.compile(r"unsloth|xformers|fa2|flash|sdpa|attention|compil|offload|torch:|bfloat16", re.IGNORECASE)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "UNSLOTH_DISABLE_STATISTICS": "1", "PYTHONUNBUFFERED": "1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file (rewritten after every point)")
    p.add_argument("--modes", default="unsloth,plain",
                   help="comma list of checkpointing modes: unsloth (offloaded), plain (True)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", default="8b", help="a train_throughput.py shape (8b, 1b, 135m, tiny-8b, ...)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (train_throughput's default)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--data", choices=["random", "memorise"], default="random",
                   help="random: train_throughput's timing rows (seed 1); memorise: its loss-curve rows, 16 fixed "
                        "random rows cycled (seed 7), whose loss falls from ~ln(vocab) toward 0")
    p.add_argument("--order", choices=["sequential", "trainer"], default="sequential",
                   help="the rows in order, or in the order the transformers Trainer's sampler draws them (seed 42, "
                        "as train_throughput's loss curves take them): the curves are then step-for-step comparable")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning-rate schedule over warmup + steps (cosine, no warm-up: the Trainer's as the bench "
                        "and the recipe default set it)")
    p.add_argument("--max-grad-norm", type=float, default=0.0,
                   help="clip the LoRA gradients' norm to this before each step (0: no clipping; the Trainer "
                        "in the bench clips at 0.3)")
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--budget-s", type=float, default=380,
                   help="whole run; each child gets its share of what is left and is killed past it")
    p.add_argument("--build-timeout-s", type=float, default=170, help="most the checkpoint build may take")
    p.add_argument("--mode", choices=["build", *MODES], help=argparse.SUPPRESS)  # internal: the child's job
    p.add_argument("--point-out", help=argparse.SUPPRESS)  # internal: where the child writes its point
    args = p.parse_args(argv)
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    if args.max_grad_norm < 0:
        p.error("--max-grad-norm must be >= 0")
    return args


# --- shared -----------------------------------------------------------------------------------------

def throughput_module() -> Any:
    """bench/train_throughput.py (stdlib-only at import): its shapes, model builder, data and MFU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", BENCH / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def tail(text: str, n: int = TAIL) -> str:
    return text[-n:]


# --- children ---------------------------------------------------------------------------------------

def write_tokenizer(path: Path) -> bool:
    """A small word-level tokenizer with the config's special ids (pad 0, bos 1, eos 2): unsloth loads one
    beside the weights; the bench feeds token ids, so its vocabulary does not matter."""
    if (path / "tokenizer.json").is_file():
        return False
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": 4 + i for i in range(60)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=131072)
    fast.save_pretrained(str(path))
    return True


def child_build(args: argparse.Namespace, tt: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    existed = (Path(args.models_dir) / f"llama-{args.shape}" / "config.json").is_file()
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tt.build_model(args.shape, args.device, args.models_dir))
    wrote = write_tokenizer(path)
    out = {"path": str(path), "reused": existed, "tokenizer_written": wrote}
    if args.order == "trainer":
        order = trainer_order(args.batch * (args.warmup + args.steps), args.batch, args.warmup + args.steps)
        order_path(args).write_text(json.dumps(order))
        out["trainer_order"] = str(order_path(args))
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def trainer_order(count: int, batch: int, steps: int, seed: int = 42) -> list[int]:
    """The row indices, in step order, that a transformers Trainer (its default sampler, `seed`) draws from a
    dataset of `count` rows over `steps` steps of `batch`: what train_throughput's loss curves train on. Run in the
    build child (never after `import unsloth`, which patches the Trainer)."""
    import itertools

    import torch
    from transformers import Trainer, TrainingArguments

    class Indices(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return count

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"i": torch.tensor(i)}

    with tempfile.TemporaryDirectory() as work:
        targs = TrainingArguments(output_dir=work, per_device_train_batch_size=batch, max_steps=steps, seed=seed,
                                  report_to="none", use_cpu=True, remove_unused_columns=False)
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=targs, train_dataset=Indices(),
                          data_collator=lambda rows: torch.stack([r["i"] for r in rows]))
        drawn = itertools.islice(trainer.get_train_dataloader(), steps)
        return [int(i) for step in drawn for i in step.flatten().tolist()]


def order_path(args: argparse.Namespace) -> Path:
    """Where the build child leaves trainer_order's indices for the mode children (beside their points)."""
    return Path(args.point_out).with_name("trainer_order.json")


def batches(tt: Any, args: argparse.Namespace, order: list[int] | None = None) -> list[dict[str, Any]]:
    """train_throughput's synthetic rows (full length, no padding, labels = inputs), as tensors: its timing rows,
    or with --data memorise the rows its loss curves train on; taken in `order` (row indices) when given."""
    import torch

    count = args.warmup + args.steps
    vocab = tt.SHAPES[args.shape]["vocab_size"]
    if args.data == "memorise":
        rows = tt.memorised_rows(args.batch * count, args.seq, seed=7, vocab=vocab).rows
    else:
        rows = tt.random_rows(args.batch * count, [args.seq], vocab, seed=1).rows
    if order is not None:
        rows = [rows[i] for i in order]
    out = []
    for k in range(count):
        ids = torch.tensor(rows[k * args.batch:(k + 1) * args.batch], dtype=torch.long, device=args.device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def record_steps(point: dict[str, Any], seconds: list[float], losses: list[float], warmup: int, tt: Any) -> None:
    """Step times so far into `point`: tokens/s over the steps after `warmup` (every row is full length),
    MFU on the 4N basis by train_throughput's own helper."""
    timed = seconds[warmup:]
    point.update(warmup_seconds=[round(s, 4) for s in seconds[:warmup]], step_seconds=[round(s, 4) for s in timed],
                 steps_timed=len(timed), losses=losses)
    if timed:
        point["tokens_per_s"] = round(point["batch"] * point["seq"] * len(timed) / sum(timed), 1)
        tt.add_mfu([point])


def optimizer_and_schedule(params: list[Any], args: argparse.Namespace, fused: bool) -> tuple[Any, Any]:
    """AdamW as the Trainer builds it (weight decay 0, its default; torch's own is 0.01) and, with --schedule
    cosine, the Trainer's cosine schedule without warm-up over all warmup + steps steps (None: constant)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=fused)
    if args.schedule == "constant":
        return optimizer, None
    from transformers import get_cosine_schedule_with_warmup

    return optimizer, get_cosine_schedule_with_warmup(optimizer, 0, args.warmup + args.steps)


def child_mode(args: argparse.Namespace, tt: Any, point: dict[str, Any], save: Any) -> None:
    """One checkpointing mode, recorded into `point` (saved after loading and after every step)."""
    t0 = time.perf_counter()
    import unsloth  # noqa: F401  -- before transformers/peft: it patches them
    from unsloth import FastLanguageModel

    point["import_seconds"] = round(time.perf_counter() - t0, 1)
    import torch

    cuda = args.device == "cuda"
    gib = 2**30
    point["card"] = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    mode = MODES[args.mode]
    path = str(Path(args.models_dir) / f"llama-{args.shape}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=True,
        use_gradient_checkpointing=mode)  # a local folder; HF_HUB_OFFLINE=1 keeps the hub out
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none", target_modules=TARGETS,
        use_gradient_checkpointing=mode, random_state=3407, max_seq_length=args.seq)
    model.train()
    point["load_seconds"] = round(time.perf_counter() - t0, 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    point["trainable_params"] = sum(p.numel() for p in trainable)
    point["trainable_dtypes"] = sorted({str(p.dtype) for p in trainable})
    if cuda:
        point["load_max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / gib, 2)
        torch.cuda.reset_peak_memory_stats()
    save()
    optimizer, scheduler = optimizer_and_schedule(trainable, args, fused=cuda)
    data = batches(tt, args, json.loads(order_path(args).read_text()) if args.order == "trainer" else None)
    seconds: list[float] = []
    losses: list[float] = []
    for batch in data:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # the Trainer's bf16=True
            loss = model(**batch).loss
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(round(float(loss.detach()), 6))
        record_steps(point, seconds, losses, args.warmup, tt)
        if cuda:
            point.update(max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 2),
                         max_memory_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2))
        save()


def child_main(args: argparse.Namespace) -> int:
    """Runs in a fresh process; writes its point to --point-out whatever happens."""
    out = Path(args.point_out)
    point: dict[str, Any] = {"shape": args.shape, "seq": args.seq, "batch": args.batch, "mode": args.mode}
    if args.mode in MODES:
        point.update(variant=VARIANT[args.mode], use_gradient_checkpointing=MODES[args.mode], padding_waste=0.0,
                     lora={"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "targets": TARGETS},
                     optimizer={"name": "torch.optim.AdamW", "fused": args.device == "cuda", "lr": args.lr,
                                "weight_decay": 0.0, "schedule": args.schedule, "max_grad_norm": args.max_grad_norm},
                     data=args.data, order=args.order,
                     loop="hand loop: forward(labels) under bf16 autocast, backward, step, zero_grad")

    def save() -> None:
        point["versions"] = versions()
        write_json(out, point)

    try:
        tt = throughput_module()
        if args.mode == "build":
            point.update(child_build(args, tt))
        else:
            child_mode(args, tt, point, save)
    except BaseException as err:  # noqa: BLE001 -- recorded, then the child exits non-zero
        name = type(err).__name__
        first = (str(err).splitlines() or [""])[0]
        point["error"] = f"{'OOM' if 'OutOfMemory' in name else name}: {first}"[:500]
        point["traceback"] = tail(traceback.format_exc())
        save()
        return 1
    save()
    return 0


# --- parent -----------------------------------------------------------------------------------------

ACTIVE: list[int] = []
"""Process group of the running child, killed with the parent (SIGTERM from an outer `timeout`)."""


def kill_active(signum: int, _frame: Any) -> None:
    for pgid in ACTIVE:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_child(args: argparse.Namespace, job: str, timeout: float, logs: Path, work: Path) -> dict[str, Any]:
    """`job` in a fresh process (own session, so a kill takes its compile workers too), at most `timeout` s.
    Its point and log go to `logs`; it runs in `work` (unsloth writes its compiled cache there)."""
    point_out = logs / f"{job}.json"
    log = logs / f"{job}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", args.out, "--mode", job,
           "--point-out", str(point_out), "--device", args.device, "--shape", args.shape, "--seq", str(args.seq),
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps), "--lr", str(args.lr),
           "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--models-dir", args.models_dir,
           "--data", args.data, "--order", args.order, "--schedule", args.schedule,
           "--max-grad-norm", str(args.max_grad_norm)]
    env = {**os.environ, **OFFLINE}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        ACTIVE.append(proc.pid)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
        finally:
            ACTIVE.remove(proc.pid)
    point: dict[str, Any] = json.loads(point_out.read_text()) if point_out.is_file() else {"mode": job}
    point.update(exit_code=rc, wall_seconds=round(time.perf_counter() - t0, 1), timeout_s=round(timeout, 1))
    if timed_out:
        point["error"] = f"timed out after {timeout:.3g} s (killed); what it measured before is kept"
    elif rc != 0 and "error" not in point:
        point["error"] = f"exited {rc} without writing its result"
    text = log.read_text(errors="replace")
    # unsloth's own lines say what it chose (attention backend, compile, offloading); the tail, what went wrong
    point["log_unsloth"] = [line[:300] for line in text.splitlines()
                            if BANNER.search(line) and not TORCH_LOG.match(line)][:60]
    point["log_tail"] = tail(text)
    return point


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode:
        return child_main(args)
    started = time.perf_counter()
    deadline = started + args.budget_s
    out = Path(args.out)
    logs = out.parent / f"{out.stem}_logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peer-unsloth-"))
    signal.signal(signal.SIGTERM, kill_active)
    res: dict[str, Any] = {
        "meta": {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "device": args.device,
                 "shape": args.shape, "seq": args.seq, "batch": args.batch, "warmup_steps": args.warmup, "data": args.data,
                 "order": args.order,
                 "timed_steps": args.steps, "versions": versions(), "env": OFFLINE, "logs": str(logs),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "build": None, "points": []}
    write_json(out, res)
    res["build"] = run_child(args, "build", min(args.build_timeout_s, deadline - time.perf_counter()), logs, work)
    write_json(out, res)
    modes = args.modes.split(",")
    for k, mode in enumerate(modes):
        left = deadline - time.perf_counter()
        if res["build"].get("error") or left < 5:
            why = "the checkpoint build failed" if res["build"].get("error") else "--budget-s reached"
            res["points"].append({"mode": mode, "variant": VARIANT[mode], "error": f"skipped: {why}"})
        else:
            res["points"].append(run_child(args, mode, left / (len(modes) - k), logs, work))
        write_json(out, res)
    res["meta"]["card"] = next((p["card"] for p in res["points"] if p.get("card")), None)
    res["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(out, res)
    brief = {p["mode"]: {k: p.get(k) for k in ("tokens_per_s", "mfu_4n", "max_memory_reserved_gib", "error")}
             for p in res["points"]}
    print(json.dumps({"card": res["meta"]["card"], **brief}, indent=1))
    return 0 if all("error" not in p for p in res["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())

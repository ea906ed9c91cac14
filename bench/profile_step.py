"""Where a training step's GPU time goes: torch.profiler over a few steps of `qlora-doctor run`'s path
(bench/train_throughput.py's `ours_trainer_parts`, a `performance:` variant of it) or of the plain path.

    python3 bench/profile_step.py --out $OUT/profile --variant fast --batch 8          # 8B shape, seq 2048
    python3 bench/profile_step.py --out /tmp/p --device cpu --tiny --variant fast --batch 2

Writes --out/<variant>-b<batch>.json: GPU time per kernel category (GEMMs, attention, bitsandbytes
dequantization, Triton kernels, elementwise/copies, ...), the top kernels by self GPU time, the step
times and peak memory of this fresh process; and --out/<variant>-b<batch>.txt, the profiler's table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as tt  # noqa: E402

CATEGORIES = (  # first match wins; matched against the lower-cased kernel name
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("gemm", ("gemm", "xmma", "cutlass", "sm90", "cublas", "matmul", "ampere_bf16", "nvjet")),
    ("bnb_dequant", ("kdequantize", "dequantize")),
    ("triton (liger etc.)", ("triton", "liger", "_rms_norm", "_swiglu", "_rope", "cross_entropy")),
    ("dropout/rng", ("dropout", "philox", "fused_dropout")),
    ("copies/casts", ("copy", "memcpy", "cast", "to_copy")),
    ("reductions", ("reduce", "sum", "norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill", "mul", "add")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON and table")
    p.add_argument("--variant", default="fast", help=f"one of {', '.join(tt.VARIANTS)}")
    p.add_argument("--performance", default=None, help="JSON object of `performance:` keys (overrides --variant's)")
    p.add_argument("--shape", default="8b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--active", type=int, default=2, help="profiled steps")
    p.add_argument("--timed", type=int, default=3, help="unprofiled timed steps after the profiled ones")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--name", default=None, help="file name stem (default <variant>-b<batch>)")
    p.add_argument("--lora-dropout", type=float, default=tt.LORA_DROPOUT, help="0 is unsloth's fast path")
    p.add_argument("--optim", default=None, help="optimizer (default paged_adamw_8bit on cuda, adamw_torch on cpu)")
    args = p.parse_args(argv)
    tt.LORA_DROPOUT = args.lora_dropout
    if args.tiny and not args.shape.startswith("tiny-"):
        args.shape, args.seq = f"tiny-{args.shape}", min(args.seq, 64)
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import Trainer, TrainerCallback

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.variant}-b{args.batch}"
    if args.performance:
        tt.VARIANTS[stem] = {**(tt.VARIANTS.get(args.variant) or {}), **json.loads(args.performance)}
        args.variant = stem
    cuda = args.device == "cuda"
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    path = tt.build_model(args.shape, args.device, args.models_dir)
    steps = args.warmup + args.active + args.timed
    work = Path(tempfile.mkdtemp(prefix="qlora-profile-"))
    optim = args.optim or ("paged_adamw_8bit" if cuda else "adamw_torch")
    torch.manual_seed(0)
    if tt.VARIANTS[args.variant] is None:
        model, targs, inner = tt.baseline_trainer_parts(path, args.device, args.batch, steps, optim, 2e-4, 1000, work)
        levers = None
    else:
        model, targs, inner, levers = tt.ours_trainer_parts(path, tt.VARIANTS[args.variant], args.device, args.batch,
                                                            args.seq, steps, optim, 2e-4, 1000, work)
    collator = tt.CountingCollator(inner)
    losses: list[float] = []
    timer = tt.step_timer(args.device, collator, losses)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=args.warmup, warmup=0, active=args.active, repeat=1))

    class Step(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            prof.step()

    data = tt.random_rows(args.batch * steps, [args.seq], tt.SHAPES[args.shape]["vocab_size"], seed=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collator, callbacks=[timer, Step()])
    t0 = time.perf_counter()
    with prof:
        trainer.train()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    rows = []
    for e in events:
        t = getattr(e, attr, 0) if cuda else e.self_cpu_time_total
        if t > 0 and not (cuda and e_is_cpu_op(e.key)):
            rows.append((e.key, t, e.count))
    total = sum(t for _, t, _ in rows) or 1
    by_cat: dict[str, float] = {}
    for key, t, _ in rows:
        by_cat[category(key)] = by_cat.get(category(key), 0) + t
    rows.sort(key=lambda r: -r[1])
    (out / f"{stem}.txt").write_text(events.table(sort_by=attr if cuda else "self_cpu_time_total", row_limit=60))
    timed = timer.steps[args.warmup + args.active:]
    seconds = sum(s for s, _, _ in timed)
    real = sum(r for _, r, _ in timed)
    n = tt.matmul_params(tt.SHAPES[args.shape])
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "card": torch.cuda.get_device_name(0) if cuda else "cpu", "versions": tt.versions(),
        "shape": args.shape, "seq": args.seq, "batch": args.batch, "variant": args.variant,
        "performance": tt.VARIANTS[args.variant], "levers": levers, "wall_seconds": round(wall, 1),
        "step_seconds": [round(s, 4) for s, _, _ in timer.steps],
        "timed_tokens_per_s": round(real / seconds, 1) if seconds else None,
        "mfu_4n": round(real / seconds * 4 * n / tt.PEAK_FLOPS, 4) if seconds else None,
        "profiled_steps": args.active, "lora_dropout": args.lora_dropout, "optim": optim,
        "streams": _or_error(stream_busy, prof, args.active) if cuda else None,
        "gpu_ms_per_step_by_category": {k: round(v / 1000 / args.active, 2)
                                        for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": k[:160], "ms_per_step": round(t / 1000 / args.active, 3), "calls_per_step":
                         c // max(args.active, 1), "share": round(t / total, 4)} for k, t, c in rows[:40]],
    }
    if cuda:
        result.update(max_memory_allocated_gib=round(torch.cuda.max_memory_allocated() / tt.GIB, 2),
                      max_memory_reserved_gib=round(torch.cuda.max_memory_reserved() / tt.GIB, 2))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("top_kernels", "levers", "versions")}, indent=1))
    return 0


def stream_busy(prof: Any, steps: int, gaps: int = 12, device: str = "CUDA") -> Any:
    """Per CUDA stream: kernels and copies, busy time (union of their intervals) per profiled step, the span
    from its first start to its last end, and its longest idle gaps with the kernels either side: where the
    GPU waited for the host (launch overhead, Python, synchronisation) or for another stream (copies)."""
    by_stream: dict[int, list[tuple[int, int, str]]] = {}
    for e in prof.profiler.kineto_results.events():
        if str(e.device_type()).endswith(device) and e.duration_ns() > 0:
            by_stream.setdefault(e.device_resource_id(), []).append((e.start_ns(), e.end_ns(), e.name()))
    out = []
    for stream, evs in by_stream.items():
        evs.sort()
        busy, end, holes = 0, evs[0][0], []
        prev = ""
        for start, stop, name in evs:
            if start > end:
                holes.append((start - end, prev[:70], name[:70]))
            busy += max(0, stop - max(start, end))
            if stop > end:
                end, prev = stop, name
        span = end - evs[0][0]
        holes.sort(reverse=True)
        out.append({"stream": stream, "events": len(evs), "busy_ms_per_step": round(busy / 1e6 / steps, 2),
                    "span_ms_per_step": round(span / 1e6 / steps, 2),
                    "idle_ms_per_step": round((span - busy) / 1e6 / steps, 2),
                    "gaps_over_50us": sum(1 for h in holes if h[0] > 50_000) // max(steps, 1),
                    "longest_gaps": [{"us": round(h[0] / 1e3, 1), "after": h[1], "before": h[2]} for h in holes[:gaps]]})
    out.sort(key=lambda r: -r["busy_ms_per_step"])
    return out


def _or_error(fn: Any, *a: Any) -> Any:
    try:  # an analysis that fails must not lose the profile it analyses
        return fn(*a)
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


def e_is_cpu_op(key: str) -> bool:
    """Operator-level events (aten::, custom ops such as bitsandbytes::, autograd Functions such as Liger's,
    Triton launches) carry their kernels' device time again; only kernels are counted."""
    return (key.startswith(("aten::", "autograd::", "Optimizer.", "ProfilerStep", "cudaLaunch", "cuda", "##"))
            or "::" in key.split("(")[0] and not key.startswith(("void ", "Memcpy", "Memset"))
            or key.startswith(("Liger", "Command Buffer Full")) or key.endswith("Function") or key.endswith("FunctionBackward"))


if __name__ == "__main__":
    sys.exit(main())

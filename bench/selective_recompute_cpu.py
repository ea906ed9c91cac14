"""CPU step time of one model under full, selective and no recomputation (`performance.recompute`,
`performance.checkpoint_layers`), the modes interleaved round by round so that load from other processes on
a shared machine falls on all of them alike. Each model is built by the product's own `load_for_training`;
a step is one forward and backward of the same batch (no optimizer step). Also counts, in one extra step
per mode, the ops that ran: 4-bit base GEMMs and attention forward kernels (the replay's savings).

    python3 bench/selective_recompute_cpu.py --out bench/results/selective_recompute_cpu.json

CPU numbers only: float32, bitsandbytes' CPU 4-bit matmul; they say nothing about a GPU's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # qlora_doctor from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES: dict[str, dict[str, Any]] = {
    "full": {"checkpoint_layers": "all", "recompute": "full"},
    "selective": {"checkpoint_layers": "all", "recompute": "selective"},
    "none": {"checkpoint_layers": 0},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="135m", help="a shape of bench/train_throughput.py (default: the builtin model's)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each runs every mode once), after one untimed")
    p.add_argument("--models-dir", default="/tmp/models")
    args = p.parse_args(argv)

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import train_throughput as bench
    from qlora_doctor.recipe.levers import speed_plan
    from qlora_doctor.trainer.model import load_for_training

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    precision = bench.precision_for("cpu")
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    path = bench.build_model(args.shape, "cpu", args.models_dir)
    work = Path(tempfile.mkdtemp(prefix="qlora-selective-"))
    models, levers = {}, {}
    for mode, performance in MODES.items():
        recipe = bench.make_recipe(path, performance, work, args.batch, args.seq, 1, "adamw_torch", 2e-4, 1)
        torch.manual_seed(0)
        models[mode] = load_for_training(recipe, precision, path, speed_plan(recipe, precision))
        models[mode].train()
        levers[mode] = speed_plan(recipe, precision).to_json()["recompute"]
    ids = torch.randint(3, bench.SHAPES[args.shape]["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))

    def step(model: Any) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - t0

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.name()] = self.counts.get(func.name(), 0) + 1
            return func(*args, **(kwargs or {}))

    ops = {}
    for mode, model in models.items():
        step(model)  # untimed: first-call costs
        counter = OpCounter()
        with counter:
            step(model)
        ops[mode] = {"gemm_4bit": counter.counts.get("bitsandbytes::gemm_4bit", 0),
                     "attention_forward": sum(n for k, n in counter.counts.items()
                                              if "scaled_dot_product" in k and "backward" not in k)}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, model in models.items():
            times[mode].append(round(step(model), 4))
    tokens = args.batch * args.seq
    result = {
        "meta": {"command": " ".join(["python3", *sys.argv]), "device": "cpu", "cpu": platform.processor() or "cpu",
                 "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                 "versions": bench.versions(), "shape": args.shape, "seq": args.seq, "batch": args.batch,
                 "rounds": args.rounds, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "note": "forward+backward of one batch, float32 on CPU, NF4 + double quant, LoRA r=16 all-linear "
                         "dropout 0.05, fused LoRA; modes interleaved per round on a shared machine"},
        "modes": {mode: {"performance": MODES[mode], "recompute_lever": levers[mode], "step_seconds": times[mode],
                         "min_s": min(times[mode]), "median_s": statistics.median(times[mode]),
                         "tokens_per_s_at_median": round(tokens / statistics.median(times[mode]), 1),
                         "ops_per_step": ops[mode]} for mode in MODES},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(json.dumps({m: {k: v for k, v in r.items() if k in ("min_s", "median_s", "ops_per_step")}
                      for m, r in result["modes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

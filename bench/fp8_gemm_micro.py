"""Where the float8 base GEMM's time goes, per Llama-3-8B projection shape (issue #20: fp8_base ran slower than
bf16 in a whole step, and a GEMM estimate says it should not).

    python3 bench/fp8_gemm_micro.py --out $OUT/micro.json            # GPU, 8 x 2048 tokens
    python3 bench/fp8_gemm_micro.py --out /tmp/m.json --tokens 64 --device cpu --iters 2   # the code runs

For each shape (in, out) and a [tokens, in] bf16 input it times, with CUDA events (median of --iters after
warm-up), the pieces the step runs and the ways to run them:

    bf16 forward    bitsandbytes' matmul_4bit (dequantize NF4 + bf16 GEMM), and the GEMM alone
    bf16 backward   grad @ dequantize(W), as fused LoRA's backward runs it
    fp8 (product)   trainer/fp8.py Fp8BaseGemm forward / grad_input, without and with the weight cache
    subclass        the same through torchao's Float8TrainingTensor (the product before session 13)
    fp8 pieces      the input cast alone, torch._scaled_mm alone (fast accumulation on and off)

and each one's host time per call (perf_counter without a sync; a host time near the GPU time means the host
would be the limit). Writes one JSON with a row per (shape, piece).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate_proj/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}
"""(in_features, out_features) of the Llama-3-8B projections."""


def timed(fn: Callable[[], Any], iters: int, device: str) -> dict[str, float]:
    import torch

    for _ in range(2):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return {"gpu_ms": round((time.perf_counter() - t0) * 1e3 / iters, 4), "host_us": None}
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        h0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - h0) * 1e6)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return {"gpu_ms": round(statistics.median(gpu), 4), "host_us": round(statistics.median(host), 1)}


def cast_tensorwise(x: Any, float8_dtype: Any) -> tuple[Any, Any]:
    """torchao's tensorwise dynamic cast without its tensor subclass: (float8 data, 1 / scale)."""
    import torch

    fmax = torch.finfo(float8_dtype).max
    amax = x.abs().amax().to(torch.float32)
    scale = fmax / torch.clamp(amax, min=1e-12)
    return (x.to(torch.float32) * scale).clamp(-fmax, fmax).to(float8_dtype), scale.reciprocal()


def main(argv: list[str] | None = None) -> int:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
    import torch

    from qlora_doctor.trainer.fp8 import Fp8BaseGemm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    dev, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    emulate = dev != "cuda"
    gemms = {False: Fp8BaseGemm.create(emulate=emulate, compile_casts=dev == "cuda"),
             True: Fp8BaseGemm.create(emulate=emulate, compile_casts=dev == "cuda", cache_weights=True)}
    # torchao's subclass path (the product before session 13), for comparison
    subclass = {False: Fp8BaseGemm.create(emulate=emulate, compile_casts=dev == "cuda", direct=False),
                True: Fp8BaseGemm.create(emulate=emulate, compile_casts=dev == "cuda", cache_weights=True,
                                         direct=False)}
    rows = []
    for name, (fin, fout) in SHAPES.items():
        layer = bnb.nn.Linear4bit(fin, fout, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to(dev)
        w, qs = layer.weight, layer.weight.quant_state
        x = torch.randn(args.tokens, fin, device=dev, dtype=dtype)
        g = torch.randn(args.tokens, fout, device=dev, dtype=dtype)
        wd = bnb_f.dequantize_4bit(w, qs).to(dtype)
        flops = 2 * args.tokens * fin * fout
        pieces: dict[str, Callable[[], Any]] = {
            "bf16 fwd matmul_4bit": lambda: bnb.matmul_4bit(x, w, quant_state=qs),
            "bf16 fwd gemm only": lambda: x @ wd.t(),
            "dequantize only": lambda: bnb_f.dequantize_4bit(w, qs),
            "bf16 bwd dequant+gemm": lambda: g @ bnb_f.dequantize_4bit(w, qs).to(dtype),
        }
        for family, pair in (("fp8", gemms), ("subclass", subclass)):
            for cached, gemm in pair.items():
                suffix = " cached" if cached else ""
                pieces[f"{family} fwd{suffix}"] = lambda gemm=gemm: gemm._forward_impl(x, w, qs)
                pieces[f"{family} bwd{suffix}"] = lambda gemm=gemm: gemm.grad_input(g, w, qs)
            pieces[f"{family} input cast only"] = lambda pair=pair: pair[True].casts["input"](x)
            pieces[f"{family} grad cast only"] = lambda pair=pair: pair[True].casts["grad_output"](g)
        same = {"fwd": torch.equal(gemms[True]._forward_impl(x, w, qs), subclass[True]._forward_impl(x, w, qs)),
                "bwd": torch.equal(gemms[True].grad_input(g, w, qs), subclass[True].grad_input(g, w, qs))}
        rows.append({"shape": name, "piece": "direct equals subclass, bit for bit", **same})
        print(f"{name:18} direct equals subclass: {same}", flush=True)
        if dev == "cuda":
            x8 = subclass[True].casts["input"](x)
            w8 = subclass[True]._weight8("weight", w, qs, dtype)
            one = torch.ones((), device=dev, dtype=torch.float32)
            xd, wdt = x8._data, w8._data  # [tokens, in] row-major; W^T [in, out] column-major
            for fast in (True, False):
                pieces[f"_scaled_mm only fast_accum={fast}"] = (
                    lambda fast=fast: torch._scaled_mm(xd, wdt, one, one, out_dtype=dtype, use_fast_accum=fast))
            gd = subclass[True].casts["grad_output"](g)._data
            w_col = wdt.contiguous().t()  # W [out, in] column-major: grad @ W's mat2
            for fast in (True, False):
                pieces[f"_scaled_mm bwd only fast_accum={fast}"] = (
                    lambda fast=fast: torch._scaled_mm(gd, w_col, one, one, out_dtype=dtype, use_fast_accum=fast))
            pieces["fp8 weight transpose copy"] = lambda: wdt.contiguous()
        for piece, fn in pieces.items():
            try:
                t = timed(fn, args.iters, dev)
            except Exception as err:  # noqa: BLE001 - record and go on: one piece failing says something too
                t = {"error": f"{type(err).__name__}: {err}"[:300]}
            if t.get("gpu_ms") and any(k in piece for k in ("fwd", "bwd", "gemm")):
                t["tflops"] = round(flops / (t["gpu_ms"] * 1e-3) / 1e12, 1)
            rows.append({"shape": name, "in": fin, "out": fout, "tokens": args.tokens, "piece": piece, **t})
            print(f"{name:18} {piece:40} {t}", flush=True)
        del layer, x, g, wd
        for gemm in (*gemms.values(), *subclass.values()):
            gemm.cached.clear()
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "fallbacks": {str(k): v.fallbacks() for k, v in gemms.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""scaled_dot_product_attention forward + backward per backend (cuDNN, flash, memory-efficient) at the
attention shapes of the QLoRA benches: what `performance.cudnn_attention: auto` costs where it turns cuDNN
off, and whether cuDNN fails at long sequences outside the 70B FSDP run where it failed.

    python3 bench/sdpa_backends.py --out $OUT/sdpa_backends.json

Shapes (bf16, causal, no mask - what transformers passes for unpadded rows), as transformers' sdpa
attention calls it: key/value heads repeated to the query heads. Each point: 2 untimed calls, then
--reps timed forward+backward calls (CUDA events); a backend that raises records its error instead.
FLOPs: causal attention forward 2 * 2 * b * h * s^2 * d / 2, backward 2.5x that (the usual convention).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

SHAPES = (  # name, batch, query heads, sequence, head dim
    ("llama-3-8b b8 s2048", 8, 32, 2048, 128),
    ("llama-3-8b b1 s8192", 1, 32, 8192, 128),
    ("llama-3-70b b1 s24576", 1, 64, 24576, 128),
)


def measure(backend: Any, batch: int, heads: int, seq: int, dim: int, reps: int) -> dict[str, Any]:
    import torch
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([backend]):
            for _ in range(2):
                scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                out = scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(grad)
            end.record()
            torch.cuda.synchronize()
        ms = start.elapsed_time(end) / reps
        finite = bool(torch.isfinite(q.grad).all() and torch.isfinite(out).all())
        flops = 3.5 * 2 * batch * heads * seq * seq * dim  # fwd 2*2*b*h*s^2*d/2, bwd 2.5x fwd
        return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "finite": finite}
    except Exception as err:  # the point of the bench: record which backend fails where
        return {"error": f"{type(err).__name__}: {str(err)[:400]}"}
    finally:
        del q, k, v, grad
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    import torch
    from torch.nn.attention import SDPBackend

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    result: dict[str, Any] = {
        "command": "python3 bench/sdpa_backends.py", "device": torch.cuda.get_device_name(0),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "python": platform.python_version()},
        "default_cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled(), "points": []}
    started = time.time()
    for name, batch, heads, seq, dim in SHAPES:
        point = {"shape": name, "batch": batch, "heads": heads, "seq": seq, "head_dim": dim}
        for label, backend in backends.items():
            point[label] = measure(backend, batch, heads, seq, dim, args.reps)
        if "ms" in point["cudnn"] and "ms" in point["flash"]:
            point["flash_over_cudnn_time"] = round(point["flash"]["ms"] / point["cudnn"]["ms"], 3)
        result["points"].append(point)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(point), flush=True)
    result["wall_seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

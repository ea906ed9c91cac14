"""Does trainer/fp8_swiglu.py's SwiGLU give Liger's bits, and what do its row maxima save the float8 casts?
(issue #20: the two largest casts of the fp8_base step read tensors Liger's SwiGLU has just written.)

    python3 bench/fp8_swiglu_micro.py --out $OUT/swiglu.json                 # GPU, 8 x 2048 tokens of 8B
    python3 bench/fp8_swiglu_micro.py --out /tmp/s.json --device cpu --tokens 64 --width 256 --iters 2

On [tokens, width] bf16 gate/up outputs (a, b) and an output gradient dc it checks, bit for bit:

    forward    fp8_swiglu.silu_mul(a, b) against liger_kernel's swiglu_forward; its row maxima against |c|'s
    backward   fp8_swiglu.silu_mul_backward(dc, a, b) against liger's swiglu_backward (da, db); their maxima
    casts      each cast given the maxima against the same cast reading the tensor (data and scale)

and times, with CUDA events (median of --iters), the pieces as the step runs them:

    liger fwd + cast(c)                       vs  ours fwd + cast(c, row maxima)
    liger bwd + cast(da) + cast(db)           vs  ours bwd + both casts given their maxima

(each backward starts by copying a and b back, since both write the gradients into them; the copies are in both
rows alike and timed alone as `restore a, b`). On CPU (no Liger) only ours and the casts run. One JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_gemm_micro import timed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import torch

    from qlora_doctor.trainer.fp8 import Fp8BaseGemm
    from qlora_doctor.trainer.fp8_swiglu import silu_mul, silu_mul_backward

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=8 * 2048)
    p.add_argument("--width", type=int, default=14336, help="the intermediate size (Llama-3-8B: 14336)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args(argv)
    dev = args.device
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.tokens, args.width)
    # gate/up outputs of a real layer are of order 1; a few large values, as activations have
    a0 = (torch.randn(shape, device=dev, generator=g) * 2).to(torch.bfloat16)
    b0 = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
    dc = (torch.randn(shape, device=dev, generator=g) * 1e-3).to(torch.bfloat16)
    gemm = Fp8BaseGemm.create(emulate=dev != "cuda", compile_casts=dev == "cuda")
    cast_in, cast_grad = gemm.casts["input"], gemm.casts["grad_output"]
    checks: dict[str, bool] = {}

    c, amax = silu_mul(a0, b0)
    checks["ours: row maxima are |c|'s"] = torch.equal(amax, c.float().abs().amax(dim=-1))
    a, b = a0.clone(), b0.clone()
    da, db, amax_a, amax_b = silu_mul_backward(dc, a, b)
    checks["ours: row maxima are |da|'s and |db|'s"] = (torch.equal(amax_a, da.float().abs().amax(dim=-1))
                                                         and torch.equal(amax_b, db.float().abs().amax(dim=-1)))
    for name, cast, x, maxima in (("cast(c)", cast_in, c, amax), ("cast(da)", cast_grad, da, amax_a),
                                  ("cast(db)", cast_grad, db, amax_b)):
        (d1, s1), (d2, s2) = cast(x), cast(x, row_amax=maxima)
        checks[f"{name} given the maxima equals {name}"] = torch.equal(s1, s2) and torch.equal(d1.view(torch.uint8),
                                                                                               d2.view(torch.uint8))
    liger = None
    if dev == "cuda":
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

        liger = swiglu_forward, swiglu_backward
        checks["forward equals liger's"] = torch.equal(swiglu_forward(a0, b0)[2], c)
        la, lb = swiglu_backward(a0.clone(), b0.clone(), dc)
        checks["backward equals liger's (da, db)"] = torch.equal(la, da) and torch.equal(lb, db)
        del la, lb
    for name, ok in checks.items():
        print(f"{name:55} {ok}", flush=True)

    a, b = a0.clone(), b0.clone()

    def restore() -> None:
        a.copy_(a0)
        b.copy_(b0)

    def ours_forward() -> Any:
        c, amax = silu_mul(a0, b0)
        return cast_in(c, row_amax=amax)

    def ours_backward() -> Any:
        restore()
        da, db, amax_a, amax_b = silu_mul_backward(dc, a, b)
        return cast_grad(da, row_amax=amax_a), cast_grad(db, row_amax=amax_b)

    pieces: dict[str, Callable[[], Any]] = {"ours fwd + cast(c, row maxima)": ours_forward,
                                            "ours bwd + cast(da), cast(db) given maxima": ours_backward,
                                            "restore a, b": restore}
    if liger is not None:
        swiglu_forward, swiglu_backward = liger

        def liger_backward() -> Any:
            restore()
            da, db = swiglu_backward(a, b, dc)
            return cast_grad(da), cast_grad(db)

        pieces = {"liger fwd + cast(c)": lambda: cast_in(swiglu_forward(a0, b0)[2]), **pieces,
                  "liger bwd + cast(da), cast(db)": liger_backward,
                  "liger fwd only": lambda: swiglu_forward(a0, b0),
                  "ours fwd only": lambda: silu_mul(a0, b0)}
    rows = []
    for piece, fn in pieces.items():
        t = timed(fn, args.iters, dev)
        rows.append({"piece": piece, "tokens": args.tokens, "width": args.width, **t})
        print(f"{piece:55} {t}", flush=True)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "fallbacks": gemm.fallbacks()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

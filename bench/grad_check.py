"""Which LoRA gradients a variant of the fast path gets wrong on the GPU: one forward and backward of the same batch
through `qlora-doctor run`'s path (bench/train_throughput.py ours_trainer_parts) for a reference variant, the
reference again (the GPU's own non-determinism: the noise floor) and each compared variant; per projection kind
(q/k/v/o/gate/up/down, lora_A and lora_B) the median and largest relative error |g - g_ref| / |g_ref|.

    python3 bench/grad_check.py --out $OUT/grads.json --reference fast_full_recompute --variants fast,fast_no_whole_lora
    python3 bench/grad_check.py --out /tmp/g.json --device cpu --shape tiny-1b --seq 64 --variants fast_selective
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train_throughput as tt  # noqa: E402


def grads_of(variant: str, path: str, args: argparse.Namespace, ids: Any) -> tuple[float, dict[str, Any]]:
    import torch

    work = Path(tempfile.mkdtemp(prefix="qlora-grads-"))
    model, _, _, _ = tt.ours_trainer_parts(path, tt.VARIANTS[variant] or {}, args.device, args.batch, args.seq, 1,
                                           "adamw_torch", 2e-4, 1, work)
    model.train()
    with torch.no_grad():  # peft starts B at zero (A's gradient would be zero): the same non-zero B in every build
        for name, param in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name)), dtype=torch.float32)
                param.copy_(noise * 0.02)
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    del model
    tt.free(args.device)
    return float(loss.detach()), grads


KIND = re.compile(r"\.(\w+_proj)\.(lora_[AB])")


def compare(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = {}
    for name, g in ref.items():
        m = KIND.search(name)
        kind = f"{m.group(1)}.{m.group(2)}" if m else name
        err = float((other[name] - g).norm() / g.norm().clamp_min(1e-30)) if name in other else float("inf")
        by_kind.setdefault(kind, []).append(err)
    return {k: {"median": round(statistics.median(v), 5), "max": round(max(v), 5), "n": len(v)}
            for k, v in sorted(by_kind.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--reference", default="fast_full_recompute")
    p.add_argument("--variants", default="fast")
    p.add_argument("--shape", default="1b")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--models-dir", default="/tmp/models")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    args = p.parse_args(argv)
    tt.LORA_DROPOUT = args.lora_dropout
    import torch

    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    path = tt.build_model(args.shape, args.device, args.models_dir)
    ids = torch.randint(3, tt.SHAPES[args.shape]["vocab_size"], (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(7)).to(args.device)
    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "shape": args.shape,
                              "seq": args.seq, "batch": args.batch, "reference": args.reference,
                              "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                              "versions": tt.versions(), "loss": {}, "relative_error": {}}
    torch.manual_seed(0)
    loss, ref = grads_of(args.reference, path, args, ids)
    result["loss"][args.reference] = loss
    for variant in [f"{args.reference}@again", *args.variants.split(",")]:
        torch.manual_seed(0)
        try:
            loss, grads = grads_of(variant.split("@")[0], path, args, ids)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next variant
            result["relative_error"][variant] = {"error": repr(exc)[:2000]}
            continue
        result["loss"][variant] = loss
        result["relative_error"][variant] = compare(ref, grads)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(variant, loss, json.dumps({k: v["max"] for k, v in result["relative_error"][variant].items()}))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

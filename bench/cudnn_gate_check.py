"""Does the cuDNN attention gate (trainer/speed.py gate_cudnn_attention) keep the NaN of pytorch/pytorch#196678
out, and cuDNN in? GPU only (H100/H200, torch 2.11-2.14.0: the rule cudnn-sdpa-nan-grad-q-hopper fires).

For each key length L, the issue's 12-line reproducer (bf16, one head of 64, every logit ~ -120 so each row's
logsumexp is below -88.7, an explicit causal mask) runs twice: through torch's SDPA as it is, and through the
gate the trainer installs from the knowledge base's rule. Recorded per run: grad_q's non-finite count and the
backward node (which kernel ran). Expected: plain cuDNN NaNs at L % 128 == 64; the gate none, with cuDNN's node
at every other L.

    python3 bench/cudnn_gate_check.py --out $OUT/cudnn_gate.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

LENGTHS = (640, 704, 768, 2048, 2112)


def repro(length: int, sdpa) -> dict:
    import torch

    torch.manual_seed(0)
    d = 64
    q = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16) * 0.1
    k = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16) * 0.1
    v = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(d)
    for t in (q, k, v):
        t.requires_grad_()
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    out = sdpa(q, k, v, attn_mask=mask)
    node = out.grad_fn.name() if out.grad_fn is not None else None
    out.backward(torch.randn_like(out))
    return {"grad_q_non_finite": int((~torch.isfinite(q.grad)).sum().item()), "backward_node": node}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch

    from qlora_doctor.knowledge.workarounds import cudnn_attention_hazards
    from qlora_doctor.sources.installed import installed_environment
    from qlora_doctor.sources.machine import probe_machine
    from qlora_doctor.trainer.speed import gate_cudnn_attention

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    hazards = cudnn_attention_hazards(probe_machine(), installed_environment(with_conflicts=False))
    scopes = tuple(h.scope for h in hazards if h.scope)
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "hazards": [h.to_json() for h in hazards], "lengths": {}}
    plain = torch.nn.functional.scaled_dot_product_attention
    undo = gate_cudnn_attention(scopes) if scopes else None
    gated = torch.nn.functional.scaled_dot_product_attention
    for length in LENGTHS:
        result["lengths"][str(length)] = {"plain": repro(length, plain),
                                          "gated": repro(length, gated) if undo else None}
    if undo:
        undo()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loss curves of every path against the plain one (issue #20): train_throughput.py's `loss_curves` (the plain
Trainer path as reference, ours as variants) plus peer_unsloth.py's points trained on the same rows
(`--data memorise`), each compared with the reference by train_throughput's own `compare_losses` and drawn by
its `plot_losses`, one panel per path.

    python3 bench/loss_plot.py --curves OUT/curves/curves.json --peer OUT/curves/unsloth.json --out OUT/curves/all.json

Writes --out (the comparison, with every curve) and a PNG beside it. Exits 1 when a curve is missing or a peer
ran other rows, steps or shape than the reference, 0 otherwise (whether the curves agree is in the JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_unsloth  # noqa: E402 -- stdlib-only at import, like train_throughput

TT = peer_unsloth.throughput_module()


def peer_curves(peer: dict[str, Any], loss: dict[str, Any]) -> tuple[dict[str, list[float]], list[str]]:
    """The peer's loss curves by variant, and why any cannot stand beside the reference."""
    curves, problems = {}, []
    meta = peer.get("meta", {})
    for want, got in (("shape", meta.get("shape")), ("seq", meta.get("seq")), ("batch", meta.get("batch"))):
        if loss.get(want) != got:
            problems.append(f"the peer ran {want} {got}, the reference {loss.get(want)}")
    if meta.get("data") != "memorise":
        problems.append(f"the peer trained on {meta.get('data')!r} rows, not the reference's memorised ones")
    # two runs of one peer (rows in order, rows in the Trainer's order) stand side by side under distinct names
    order = "" if meta.get("order") in (None, "trainer") else f" ({meta['order']} rows)"
    for point in peer.get("points", []):
        name = (point.get("variant") or point.get("mode")) + order
        losses = point.get("losses") or []
        if point.get("error"):
            problems.append(f"{name}: {point['error']}")
        if len(losses) != loss.get("steps"):
            problems.append(f"{name}: {len(losses)} losses for {loss.get('steps')} steps")
        elif not problems:
            curves[name] = losses
    return curves, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curves", required=True, help="train_throughput.py --out of a --loss-steps run")
    p.add_argument("--peer", action="append", default=[], help="peer_unsloth.py --out of a --data memorise run")
    p.add_argument("--out", required=True, help="the combined comparison (JSON); its PNG goes beside it")
    args = p.parse_args(argv)
    loss = json.loads(Path(args.curves).read_text()).get("loss_curves") or {}
    if not loss.get("curves"):
        print(f"{args.curves}: no loss_curves.curves (a train_throughput.py --loss-steps run writes them)",
              file=sys.stderr)
        return 1
    curves = dict(loss["curves"])
    problems = [f"{name}: {err}" for name, err in (loss.get("errors") or {}).items()]
    for path in args.peer:
        got, why = peer_curves(json.loads(Path(path).read_text()), loss)
        curves.update(got)
        problems += [f"{path}: {w}" for w in why]
    reference = loss["reference_variant"]
    out = {k: v for k, v in loss.items() if k not in ("curves", "compared", "plot", "levers")}
    out.update(variants=[n for n in curves if n != reference], peers=args.peer, curves=curves, problems=problems,
               compared={n: TT.compare_losses(curves[reference], c, loss["tolerance"], loss["abs_tolerance"])
                         for n, c in curves.items() if n != reference})
    out["plot"] = TT.plot_losses(reference, curves, Path(args.out).with_suffix(".png"), out)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, got in out["compared"].items():
        print(f"{name:40} {got}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

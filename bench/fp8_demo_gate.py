"""Issue #20's FP8 gate on the SmolLM2 demo: the demo recipe (real weights, real text) trained through
`qlora-doctor run` once per variant, the frozen base's GEMMs in the compute dtype (`bf16`) and in float8
(`fp8`: `performance.fp8_base: true`), with the same steps, seed, data and every other recipe value. Each run's
per-step training losses (metrics.json `train_loss_history`) are compared with the reference's by
train_throughput's `compare_losses` and drawn by its `plot_losses`, one panel per variant; each run's eval loss
before and after training is kept beside them.

    python3 bench/fp8_demo_gate.py --out $OUT/demo_fp8 --steps 200            # on a GPU with FP8 (cc >= 8.9)
    python3 bench/fp8_demo_gate.py --out /tmp/g --steps 3 --variants bf16,bf16_again   # a CPU try-out

Writes --out/gate.json (the comparison, every curve, each run's command, exit code and eval losses) and
--out/gate.png; the runs' own folders and logs stay under --out. A run stopped by --timeout-s keeps the curve its
log printed, compared with the reference's same first steps (`steps_compared`). `--rescore` compares what an
earlier gate left under --out again without running anything (e.g. after fetching a device call's files). Exits 0 when every run finished and every curve is
within the tolerance of the reference's (last-10-step means: `--tolerance` relative or `--abs-tolerance`
absolute), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_unsloth  # noqa: E402 -- stdlib-only at import, like train_throughput

TT = peer_unsloth.throughput_module()

VARIANTS = {
    "bf16": ["performance.fp8_base=false"],
    "fp8": ["performance.fp8_base=true"],
    "fp8_cache": ["performance.fp8_base=true", "performance.fp8_weight_cache=true"],
    "bf16_again": ["performance.fp8_base=false"],  # the reference twice: how far two identical runs drift apart
}
"""Each variant's recipe overrides on top of the shared ones."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a folder: the runs, gate.json and gate.png go here")
    p.add_argument("--recipe", default="demo", help="a recipe name or path (default: the demo)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every run (training.max_steps)")
    p.add_argument("--variants", default="bf16,fp8",
                   help=f"comma list, the first is the reference; of {', '.join(VARIANTS)}")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative, on the last-10-step means")
    p.add_argument("--abs-tolerance", type=float, default=0.05, help="absolute, on the last-10-step means")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="another recipe override for every run (SECTION.KEY=VALUE, repeatable)")
    p.add_argument("--timeout-s", type=int, default=600, help="per run")
    p.add_argument("--rescore", action="store_true",
                   help="run nothing: compare the runs an earlier gate left under --out (a stopped run by its log)")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    return args


def run_command(args: argparse.Namespace, variant: str, out: Path) -> list[str]:
    """`qlora-doctor run` of the recipe for one variant, its losses logged at every step."""
    shared = [f"training.output_dir={out / variant}", f"training.max_steps={args.steps}", "training.logging_steps=1",
              *args.overrides]
    return [sys.executable, "-m", "qlora_doctor.cli", "run", args.recipe, "--overwrite",
            *[f"--set={o}" for o in shared + VARIANTS[variant]]]


def losses_of(metrics: dict[str, Any]) -> list[float]:
    """The training loss at each step, in step order, from a run's metrics.json."""
    return [row["loss"] for row in sorted(metrics.get("train_loss_history") or [], key=lambda r: r["step"])
            if "loss" in row]


LOGGED = re.compile(r"^\{'(loss|eval_loss)': '?([0-9.eE+-]+)'?,", re.M)
"""The Trainer's own log lines (`{'loss': '2.632', 'grad_norm': ...}`, `{'eval_loss': '0.8896', ...}`)."""


def losses_from_log(text: str) -> tuple[list[float], list[float]]:
    """The training losses (one per step with logging_steps 1) and eval losses a run printed, in order: what is
    left of a run that was stopped before it wrote metrics.json."""
    train, evals = [], []
    for key, value in LOGGED.findall(text):
        (train if key == "loss" else evals).append(float(value))
    return train, evals


def text_of(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def point_of(variant: str, out: Path, code: int | None, log: str) -> dict[str, Any]:
    """One run's curve and eval losses: from its metrics.json when it finished, else from what its log holds."""
    point: dict[str, Any] = {"variant": variant, "exit_code": code}
    metrics_path = out / variant / "metrics.json"
    if code == 0 and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        point.update(losses=losses_of(metrics), eval_loss_before=metrics.get("eval_loss_before"),
                     eval_loss_after=metrics.get("eval_loss_after"),
                     eval_losses=[row["eval_loss"] for row in metrics.get("eval_history") or []],
                     tokens_per_s=metrics.get("train_tokens_per_second"),
                     fp8=(metrics.get("performance") or {}).get("fp8_base"))
        return point
    train, evals = losses_from_log(log)
    point.update(losses=train, eval_losses=evals, partial=True)
    last = [line for line in log.strip().splitlines() if line.strip() and not LOGGED.match(line)][-3:]
    why = "timed out" if code is None else f"exit {code}"
    point["error"] = f"{why} after {len(train)} logged steps" + (f": {' | '.join(last)[-300:]}" if code else "")
    return point


def run_variant(args: argparse.Namespace, variant: str, out: Path) -> dict[str, Any]:
    argv = run_command(args, variant, out)
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout_s)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, log = None, text_of(e.stdout) + text_of(e.stderr)
    (out / f"{variant}.log").write_text(log)
    return {**point_of(variant, out, code, log), "command": " ".join(argv),
            "seconds": round(time.perf_counter() - started, 1)}


def rescored_variant(variant: str, out: Path) -> dict[str, Any]:
    """--rescore: a run's point from the files an earlier gate left under --out (nothing is run)."""
    log_path = out / f"{variant}.log"
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    finished = (out / variant / "metrics.json").is_file()
    return point_of(variant, out, 0 if finished else None, log)


def recipe_info(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The plot's title: model, sequence, batch and learning rate as the reference run resolved its recipe."""
    import yaml

    path = run_dir / "recipe.yaml"  # the run's resolved recipe; else the recipe it was given, without overrides
    if not path.is_file():
        from qlora_doctor.recipe.schema import find_recipe

        path = find_recipe(args.recipe)
    recipe = yaml.safe_load(path.read_text())
    model, training = recipe.get("model") or {}, recipe.get("training") or {}
    return {"shape": str(model.get("name_or_path", args.recipe)), "seq": training.get("max_seq_length"),
            "batch": training.get("per_device_train_batch_size"), "lr": training.get("learning_rate"),
            "data": f"the {args.recipe} recipe's dataset, {args.steps} steps"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    points = [rescored_variant(v, out) if args.rescore else run_variant(args, v, out) for v in variants]
    curves = {p["variant"]: p["losses"] for p in points if p.get("losses")}
    reference = variants[0]
    problems = [f"{p['variant']}: {p['error']}" for p in points if p.get("error")]
    problems += [f"{p['variant']}: {len(p['losses'])} losses for {args.steps} steps" for p in points
                 if p.get("losses") and len(p["losses"]) != args.steps and not p.get("error")]
    compared = {}
    for v, c in curves.items():  # a stopped run against the reference's same first steps
        if v != reference and reference in curves:
            steps = min(len(c), len(curves[reference]))
            compared[v] = {**TT.compare_losses(curves[reference][:steps], c[:steps], args.tolerance,
                                               args.abs_tolerance), "steps_compared": steps}
    result = {"recipe": args.recipe, "steps": args.steps, "reference_variant": reference, "variants": variants,
              "overrides": args.overrides, "tolerance": args.tolerance, "abs_tolerance": args.abs_tolerance,
              "points": points, "curves": curves, "compared": compared, "problems": problems}
    info = {**recipe_info(out / reference, args), "compared": compared}
    result["plot"] = TT.plot_losses(reference, curves, out / "gate.png", info) if len(curves) > 1 else None
    (out / "gate.json").write_text(json.dumps(result, indent=1) + "\n")
    for p in points:
        print(f"{p['variant']:12} exit {p['exit_code']} {p.get('seconds')} s eval {p.get('eval_loss_before')} -> "
              f"{p.get('eval_loss_after')} {p.get('tokens_per_s')} tokens/s")
    for name, got in compared.items():
        print(f"{name:12} {got}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    agree = (all(c.get("within_tolerance") and c["steps_compared"] == args.steps for c in compared.values())
             and len(compared) == len(variants) - 1)
    return 0 if agree and not problems else 1


if __name__ == "__main__":
    sys.exit(main())

"""What bench/distributed_scaling.py computes from the runs' metrics.json, as pure functions (tested in
tests/test_distributed_bench.py without a GPU): tokens/s of the steps after warm-up, each step's token
count against the batch it should have had, the one-GPU and DDP loss curves compared step by step, and
the FSDP point chosen from the memory planner's rows.

Both runs are measured from the same source, `train_step_history` in metrics.json (one row per optimizer
step: `tokens` of all ranks, `ended_at` = seconds since training began when the step ended; written by
qlora_doctor/trainer/callbacks.py's Throughput).
"""

from __future__ import annotations

from statistics import median
from typing import Any, Iterable, Mapping, Sequence


def timed_throughput(step_history: Sequence[Mapping[str, Any]], warmup: int) -> dict[str, Any]:
    """Tokens per second over the optimizer steps after the first `warmup` ones.

    The clock runs from the end of the last warm-up step to the end of the last step (differences of
    `ended_at`), so everything those steps cost is inside it (data loading, logging, GPU work still
    queued when a step's callback fired), and the first steps' Triton/Liger compilation is not.
    `warmup` must be >= 1: the first step's end is the earliest clock reading."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the clock starts at a step's end), got {warmup}")
    steps = list(step_history)
    timed = steps[warmup:]
    if not timed:
        return {"warmup_steps": warmup, "timed_steps": 0, "error": f"only {len(steps)} steps, none after warm-up"}
    seconds = float(timed[-1]["ended_at"]) - float(steps[warmup - 1]["ended_at"])
    tokens = sum(int(s["tokens"]) for s in timed)
    return {"warmup_steps": warmup, "timed_steps": len(timed), "first_timed_step": timed[0]["step"],
            "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "seconds_per_step": round(seconds / len(timed), 4),
            "warmup_seconds": round(float(steps[warmup - 1]["ended_at"]), 3)}


def step_token_check(step_history: Sequence[Mapping[str, Any]], expected_per_step: int) -> dict[str, Any]:
    """Every step must have trained exactly `expected_per_step` tokens (effective batch x sequence, the
    rows being longer than the sequence). A step with twice that is the micro-batch x n_gpu of an
    unpinned Trainer; one with fewer is an epoch's short last step."""
    wrong = [{"step": s["step"], "tokens": s["tokens"]} for s in step_history if int(s["tokens"]) != expected_per_step]
    return {"expected_per_step": expected_per_step, "steps": len(step_history), "ok": bool(step_history) and not wrong,
            "wrong_steps": wrong}


def step_losses(train_loss_history: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """Logged training loss by optimizer step (needs logging_steps: 1).

    Normalization, the same for both runs once n_gpu is 1 (train.py's training_arguments pins it): the
    Trainer divides each micro-batch's summed token losses by the step's label-token count over all its
    micro-batches and all ranks (num_items_in_batch, gathered under average_tokens_across_devices), scales
    by the number of processes (DDP averages the ranks' gradients, and the log the ranks' losses) and
    sums the micro-batches of the step: the mean loss per label token of the optimizer step, on one GPU
    with accumulation as on two ranks without."""
    return {int(r["step"]): float(r["loss"]) for r in train_loss_history}


def compare_losses(one: Mapping[int, float], other: Mapping[int, float], steps: int,
                   tolerance: float) -> dict[str, Any]:
    """Step-by-step comparison of two runs' per-token losses. They agree when all `steps` steps were
    logged by both and no step differs by more than `tolerance` (nats). The ratio's median exposes a
    constant factor (a loss multiplied by n_gpu shows as 2.0)."""
    shared = sorted(set(one) & set(other))
    diffs = {s: round(one[s] - other[s], 4) for s in shared}
    max_abs = max((abs(d) for d in diffs.values()), default=None)
    return {"steps_compared": len(shared), "per_step_diff": [diffs[s] for s in shared],
            "max_abs_diff": round(max_abs, 4) if max_abs is not None else None,
            "ratio_median": round(median(one[s] / other[s] for s in shared), 4) if shared else None,
            "tolerance": tolerance,
            "agree": len(shared) == steps and max_abs is not None and max_abs <= tolerance}


def choose_fsdp_point(rows: Sequence[Mapping[str, Any]], card_gib: float, one_gpu_excess_gib: float,
                      rank_margin_gib: float) -> Mapping[str, Any] | None:
    """The first row (candidates come smallest first) where the planner says one GPU does NOT hold the
    run, by at least `one_gpu_excess_gib` beyond the card, and the doctor's FSDP check passes with the
    per-rank prediction at least `rank_margin_gib` under the card. None when no row qualifies."""
    for row in rows:
        if (row.get("one_gpu_fits") is False and row["one_gpu_gib"] >= card_gib + one_gpu_excess_gib
                and row.get("strategy_check") == "pass" and row["per_rank_gib"] <= card_gib - rank_margin_gib):
            return row
    return None

"""Batch collators: padding-free (flattened) batches, or the data pipeline's padding collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qlora_doctor.recipe.levers import SpeedPlan


@dataclass(frozen=True)
class FlatteningCollator:
    """Padding-free batches: one row of every example end to end, position ids restarting at 0 per
    example (transformers builds a per-example causal mask from them), the first label of each
    example ignored (it would be predicted from the previous example)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from qlora_doctor.trainer.data import IGNORE_INDEX

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for f in features:
            n = len(f["input_ids"])
            ids += list(f["input_ids"])
            labels += [IGNORE_INDEX] + list(f.get("labels", f["input_ids"]))[1:]
            positions += list(range(n))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


def make_collator(plan: SpeedPlan, tokenizer: Any) -> Any:
    """The batch collator for the plan: padding-free, or the data pipeline's padding collator."""
    if plan.padding_free.on:
        return FlatteningCollator()
    from qlora_doctor.trainer.data import make_collator as padding_collator

    return padding_collator(tokenizer)

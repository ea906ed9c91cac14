"""Batch collators: padding-free (flattened) batches, or padded ones.

Padding-free is transformers' own `DataCollatorWithFlattening` (return_position_ids=True,
separator_id=-100): every example of the batch end to end in one row, position ids restarting at 0 per
example (transformers builds a per-example causal mask from them), the first label of each example
ignored (it would be predicted from the previous example). It gives the same tensors as the collator
this module had before (tests/test_speed.py checks the values and that the loss equals the padded one).

Padding stays ours (`PaddingCollator`), not transformers' `DataCollatorForSeq2Seq`. Where both apply
they give the same tensors (right padding, pad id, attention mask 0, labels -100, pad_to_multiple_of;
tests/test_data_shapes.py checks it), but Seq2Seq pads through `tokenizer.pad`, so it:
  - pads on the tokenizer's `padding_side`, which is `left` for some checkpoints; training examples
    are then shifted right and their positions change with the batch they land in;
  - raises when the tokenizer has no pad token (common for base models), where this one pads with
    EOS: the padded positions are masked and never learned, so which id fills them does not matter;
  - converts each batch through the tokenizer's Python padding path, which is slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_doctor.core.errors import InputError

if TYPE_CHECKING:
    from qlora_doctor.recipe.levers import SpeedPlan

IGNORE_INDEX = -100
"""Label of a token that is not learned (transformers' and torch's CrossEntropyLoss ignore_index)."""


def flattening_collator() -> Any:
    """transformers' padding-free collator, set as this package's batches need it."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


@dataclass(frozen=True)
class PaddingCollator:
    """Pads a batch on the right: input_ids with the pad token (EOS when the tokenizer has none),
    attention_mask with 0, labels with -100 so padding is never learned."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def padding_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> PaddingCollator:
    """The padding collator for the data pipeline's datasets (pad_to_multiple_of=8 for tensor cores)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("the model's tokenizer has neither a pad nor an EOS token, so batches cannot be padded; "
                         "use a model whose tokenizer defines one")
    return PaddingCollator(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)


def make_collator(plan: SpeedPlan, tokenizer: Any) -> Any:
    """The batch collator for the plan: padding-free, or padded."""
    if plan.padding_free.on:
        return flattening_collator()
    return padding_collator(tokenizer)

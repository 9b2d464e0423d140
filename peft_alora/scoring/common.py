"""What every scorer shares: the fixed scoring set, its loss, and eval mode while scoring."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100
NO_SCORING_DATA = (
    "ALoRA has no scoring data: give the trainer an eval_dataset, or pass scoring_dataset= to "
    "ALoRACallback / scoring batches to RankAllocator."
)


@dataclass
class ScoringSet:
    """Collated micro-batches of the fixed scoring examples."""

    batches: list[dict]

    def __post_init__(self):
        if not self.batches:
            raise ValueError(NO_SCORING_DATA)
        for i, batch in enumerate(self.batches):
            if "labels" not in batch:
                raise ValueError(f"scoring batch {i} has no 'labels': the collator must produce training labels.")
            if trained_token_count(batch["labels"]) == 0:
                raise ValueError(
                    f"scoring batch {i} has no trained token (every label is {IGNORE_INDEX}, e.g. the completions "
                    "were truncated away): raise max_length or use longer scoring examples."
                )

    @property
    def n_tokens(self) -> int:
        return sum(trained_token_count(b["labels"]) for b in self.batches)


def trained_token_count(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while scoring; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _to_device(batch: Mapping, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def scoring_loss(model: torch.nn.Module, scoring: ScoringSet, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean next-token cross-entropy over all trained tokens of the scoring set."""
    device = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    for batch in scoring.batches:
        batch = _to_device(batch, device)
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits
        shift_logits = logits[..., :-1, :].float()
        shift_labels = labels[..., 1:]
        total += F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()
        count += int((shift_labels != IGNORE_INDEX).sum().item())
    return total / count

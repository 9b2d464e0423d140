"""AB-LoRA importance scores (ALGORITHM.md §3).

    score(rho) = CE(model without rho) - CE(base model plus only rho)

on one fixed scoring set, CE being the mean cross-entropy over the trained tokens (labels != -100,
the same masking as training). Ranks are identified by ``(module_name, slot)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .allocation import Rank

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


class GateEditor:
    """Temporarily rewrites the gates of one adapter; ``restore()`` puts the saved gates back."""

    def __init__(self, layers: Mapping[str, torch.nn.Module], adapter: str):
        self.layers, self.adapter = layers, adapter
        self.saved = {name: layer.lora_gate[adapter].clone() for name, layer in layers.items()}

    def gate(self, name: str) -> torch.Tensor:
        return self.layers[name].lora_gate[self.adapter]

    def restore(self) -> None:
        for name, saved in self.saved.items():
            self.gate(name).copy_(saved)

    def only(self, rank: Optional[Rank]) -> None:
        """All gates off except ``rank`` (None: the base model)."""
        for name in self.layers:
            self.gate(name).zero_()
        if rank is not None:
            self.gate(rank[0])[rank[1]] = 1.0


def exact_scores(
    model: torch.nn.Module,
    layers: Mapping[str, torch.nn.Module],
    adapter: str,
    scoring: ScoringSet,
    ranks: Sequence[Rank],
    autocast: Callable = contextlib.nullcontext,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> dict[Rank, float]:
    """Exact AB-LoRA score of each of ``ranks``: 2 scoring passes per rank (reference scorer)."""
    editor = GateEditor(layers, adapter)
    scores: dict[Rank, float] = {}
    try:
        with eval_mode(model):
            for rank in (progress(ranks) if progress else ranks):
                module, slot = rank
                editor.restore()
                editor.gate(module)[slot] = 0.0
                without = scoring_loss(model, scoring, autocast)
                editor.only(rank)
                only = scoring_loss(model, scoring, autocast)
                scores[rank] = without - only
    finally:
        editor.restore()
    return scores


def distributed_exact_scores(model, layers, adapter, scoring, ranks, autocast=contextlib.nullcontext, progress=None):
    """Split ``ranks`` over the processes, score each share, and give every process all scores.

    Each score is computed by exactly one process and summed into a zero vector everywhere, so
    every process ends with bit-identical scores, hence identical decisions.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return exact_scores(model, layers, adapter, scoring, ranks, autocast, progress)
    world, me = dist.get_world_size(), dist.get_rank()
    mine = list(ranks)[me::world]
    local = exact_scores(model, layers, adapter, scoring, mine, autocast, progress)
    vector = torch.zeros(len(ranks), dtype=torch.float64)
    index = {rank: i for i, rank in enumerate(ranks)}
    for rank, value in local.items():
        vector[index[rank]] = value
    device = next(p.device for p in model.parameters())
    if dist.get_backend() == "nccl":
        vector = vector.to(device)
    dist.all_reduce(vector)
    return {rank: float(vector[i]) for i, rank in enumerate(ranks)}

"""The exact AB-LoRA score (docs/algorithm.md §3), the reference every fast scorer is measured against.

    score(rho) = CE(model without rho) - CE(base model plus only rho)

2 passes over the scoring set per active rank. Ranks are identified by ``(module_name, slot)``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..allocation import Rank
from ..distributed import share_work, world
from .common import ScoringSet, eval_mode, model_device, scoring_loss


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
                without = scoring_loss(model, scoring)
                editor.only(rank)
                only = scoring_loss(model, scoring)
                scores[rank] = without - only
    finally:
        editor.restore()
    return scores


def distributed_exact_scores(model, layers, adapter, scoring, ranks, progress=None, config=None, n_prune=None):
    """Split ``ranks`` over the processes, score each share, and give every process all scores.

    Each score is computed by exactly one process and summed into a zero vector everywhere, so
    every process ends with bit-identical scores, hence identical decisions.
    """
    if world()[0] == 1:
        return exact_scores(model, layers, adapter, scoring, ranks, progress)
    work = share_work(model, ranks)
    local = exact_scores(model, layers, adapter, scoring, work.mine, progress)
    vector = torch.zeros(len(ranks), dtype=torch.float64)
    index = {rank: i for i, rank in enumerate(ranks)}
    for rank, value in local.items():
        vector[index[rank]] = value
    vector = work.total(vector, model_device(model))
    return {rank: float(vector[i]) for i, rank in enumerate(ranks)}

"""The exact AB-LoRA score (docs/algorithm.md §3), the reference every fast scorer is measured against.

    score(rho) = CE(model without rho) - CE(base model plus only rho)

2 passes over the scoring set per active rank (from the rank's decoder block on, see ``prefix.py``). Ranks are identified by ``(module_name, slot)``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..allocation import Rank
from ..distributed import share_work, world
from .common import ScoringSet, base_cache_key, base_is_frozen, eval_mode, model_device, scoring_loss
from .prefix import PrefixCache, decoder_blocks


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
    parts: tuple[str, ...] = ("without", "only"),
    current: Optional[PrefixCache] = None,
) -> dict[Rank, float]:
    """Exact AB-LoRA score of each of ``ranks`` (reference scorer).

    Two scoring passes per rank, each starting at the rank's decoder block (``prefix.py``). With
    ``parts`` one term can be left out: the result is then ``{rank: CE(without rank)}`` or
    ``{rank: CE(only rank)}`` instead of the score. ``current``: block outputs at the current gates
    already recorded this round (by the fast scorer's gradient pass).
    """
    editor = GateEditor(layers, adapter)
    blocks, block_of = decoder_blocks(model, layers)
    scores: dict[Rank, float] = {}
    if not ranks:
        return scores
    try:
        with eval_mode(model):
            base = None
            if blocks is not None:
                if "without" in parts and current is None:
                    current = PrefixCache.record(model, blocks, scoring)
                if "only" in parts:
                    base = base_prefix(model, editor, blocks, scoring)
            for rank in (progress(ranks) if progress else ranks):
                module, slot = rank
                block = block_of.get(module)
                value = 0.0
                if "without" in parts:
                    editor.restore()
                    editor.gate(module)[slot] = 0.0
                    value += current.loss(model, scoring, block) if current else scoring_loss(model, scoring)
                if "only" in parts:
                    editor.only(rank)
                    only = base.loss(model, scoring, block) if base else scoring_loss(model, scoring)
                    value = value - only if "without" in parts else only
                scores[rank] = value
    finally:
        editor.restore()
    return scores


def base_prefix(model, editor: GateEditor, blocks, scoring: ScoringSet) -> PrefixCache:
    """Block outputs of the base model (every gate off): recorded once per scoring set while only LoRA
    factors train, every time otherwise."""
    key = base_cache_key(model, "base_prefix", editor.adapter, editor.layers)
    if key in scoring.cache:
        return scoring.cache[key]
    editor.only(None)
    try:
        prefix = PrefixCache.record(model, blocks, scoring)
    finally:
        editor.restore()
    if base_is_frozen(model):
        scoring.cache[key] = prefix
    return prefix


def distributed_exact_scores(model, layers, adapter, scoring, ranks, progress=None, config=None, n_prune=None,
                             parts=("without", "only"), current=None, grown=None):
    """Split ``ranks`` over the processes, score each share, and give every process all scores.

    Each score is computed by exactly one process and summed into a zero vector everywhere, so
    every process ends with bit-identical scores, hence identical decisions. With sharded weights
    every process scores every rank and process 0's scores are broadcast (``distributed.share_work``).
    ``grown`` is part of the scorer interface and not needed here: every rank is scored exactly.
    """
    if world()[0] == 1:
        return exact_scores(model, layers, adapter, scoring, ranks, progress, parts, current)
    work = share_work(model, ranks)
    local = exact_scores(model, layers, adapter, scoring, work.mine, progress, parts, current)
    vector = torch.zeros(len(ranks), dtype=torch.float64)
    index = {rank: i for i, rank in enumerate(ranks)}
    for rank, value in local.items():
        vector[index[rank]] = value
    vector = work.total(vector, model_device(model))
    return {rank: float(vector[i]) for i, rank in enumerate(ranks)}

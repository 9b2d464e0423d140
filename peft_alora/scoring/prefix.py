"""Exact scoring passes that start at the edited rank's decoder block.

Switching one rank of decoder block ``l`` on or off cannot change what blocks ``0 .. l-1`` compute,
so their outputs on the scoring set are recorded once per gate setting (the current gates once per
round; all gates off, the base model, once per run) and an ablation runs only blocks ``l ..`` and the
head. The skipped blocks return the recorded output instead of computing, so the result is the
full forward's, bit for bit. On average an ablation then costs about half a pass.

Recorded outputs take ``blocks x tokens x hidden`` fp32 values per gate setting; above
:data:`PREFIX_LIMIT_BYTES` only every k-th block's output is kept and a pass starts from the last
kept block below ``l``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Optional

import torch

from .common import ScoringSet, batch_loss_sum, forwards_replaced, model_device

PREFIX_LIMIT_BYTES = 512 << 20  # SmolLM2-135M, 32 x 128 tokens, all 30 blocks: 0.28 GB


def decoder_blocks(model: torch.nn.Module, layers: Mapping[str, torch.nn.Module]):
    """``(blocks, block_of)``: the ModuleList of repeated blocks holding most adapted layers, and the
    index of each adapted layer's block (layers outside it are absent from ``block_of``)."""
    names = {id(layer): name for name, layer in layers.items()}
    best, best_map = None, {}
    for list_name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        found = {}
        for index, block in enumerate(module):
            for sub in block.modules():
                if id(sub) in names:
                    found[names[id(sub)]] = index
        if len(found) > len(best_map):
            best, best_map = module, found
    return best, best_map


def _skipped(blocks, count: int, output):
    """Blocks ``0 .. count-1`` return ``output`` instead of computing (only the last one's is used)."""
    return forwards_replaced(blocks[:count], lambda block: lambda *args, **kwargs: output)


class PrefixCache:
    """Block outputs of one gate setting on the scoring set, and scoring passes that reuse them."""

    def __init__(self, blocks, kept: dict[int, list]):
        self.blocks, self.kept = blocks, kept

    @classmethod
    @torch.no_grad()
    def record(cls, model: torch.nn.Module, blocks, scoring: ScoringSet,
               limit_bytes: int = PREFIX_LIMIT_BYTES) -> "PrefixCache":
        """One scoring pass at the gates as they are now, keeping block outputs within ``limit_bytes``."""
        device = model_device(model)
        with recording(blocks, scoring, limit_bytes) as recorder:
            for batch in scoring.batches:
                batch_loss_sum(model, batch, device)
        return recorder.cache()

    def loss(self, model: torch.nn.Module, scoring: ScoringSet, block: Optional[int]) -> float:
        """Mean CE over the scoring set with the gates as they are now, when only block ``block`` and
        later ones can differ from the recorded setting (``None``: a full pass)."""
        device = model_device(model)
        start = max((k for k in self.kept if block is not None and k < block), default=None)
        total = 0.0
        with torch.no_grad():
            for i, batch in enumerate(scoring.batches):
                if start is None:
                    total += float(batch_loss_sum(model, batch, device))
                    continue
                with _skipped(self.blocks, start + 1, self.kept[start][i]):
                    total += float(batch_loss_sum(model, batch, device))
        return total / scoring.n_tokens


class _Recorder:
    def __init__(self, blocks, scoring: ScoringSet, limit_bytes: int):
        self.blocks, self.limit_bytes = blocks, limit_bytes
        self.tokens = [b["input_ids"].numel() for b in scoring.batches]
        self.kept: dict[int, list] = {}
        self.stride: Optional[int] = None

    def hook(self, index: int):
        def keep(module, args, output):
            if self.stride is None:  # first output seen: how many blocks fit in the limit
                per_block = output.numel() * output.element_size() * sum(self.tokens) / self.tokens[0]
                fits = int(self.limit_bytes // max(per_block, 1))
                self.stride = math.ceil(len(self.blocks) / fits) if fits else 0
            if self.stride and (index + 1) % self.stride == 0 and index < len(self.blocks) - 1:
                self.kept.setdefault(index, []).append(output.detach() if isinstance(output, torch.Tensor) else output)
        return keep

    def cache(self) -> PrefixCache:
        complete = all(len(outputs) == len(self.tokens) and isinstance(outputs[0], torch.Tensor)
                       for outputs in self.kept.values())
        # blocks that return tuples or caches are not replayed; neither is a pass that missed batches
        return PrefixCache(self.blocks, self.kept if complete else {})


@contextlib.contextmanager
def recording(blocks, scoring: ScoringSet, limit_bytes: int = PREFIX_LIMIT_BYTES):
    """Keep the block outputs of the passes over ``scoring.batches`` (in order) run inside; then
    ``recorder.cache()``. A gradient pass may record too: its outputs are the same bits."""
    recorder = _Recorder(blocks, scoring, limit_bytes)
    handles = [block.register_forward_hook(recorder.hook(i)) for i, block in enumerate(blocks)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()

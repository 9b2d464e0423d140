"""Fast AB-LoRA scores: first-order estimates of both terms from gradient passes.

With ``y = s * B diag(g) A x`` the loss is a smooth function of every gate ``g_rho``, so

    CE(without rho) ~ CE(M) - dCE/dg_rho            at the current gates (switching rho off: g 1 -> 0)
    CE(only rho)    ~ CE(base) + dCE/dg_rho         at all gates 0 (switching rho on alone: g 0 -> 1)

One forward+backward pass over the scoring set at the current gates and one at all gates off give
these derivatives for every rank at once, instead of 2 passes per rank. The pass at all gates off
is the frozen base model's: it runs once per run and is kept as weight gradients where they fit
(``base_gradient.py``). The ranks near the pruning threshold can then be re-scored exactly.

Everything runs in fp32 with the training loop's autocast off; gate gradients are accumulated in
fp32. Under several processes the micro-batches are split and the sums all-reduced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..allocation import Rank
from ..distributed import share_work
from .base_gradient import CACHE_LIMIT_BYTES, BaseGradients, gradient_bytes
from .common import ScoringSet, batch_loss_sum, eval_mode, model_device
from .exact import GateEditor, distributed_exact_scores


@contextlib.contextmanager
def _gates_as_leaves(model: torch.nn.Module, gates: Sequence[torch.Tensor]):
    """Only the gates take gradients: parameters are frozen meanwhile (no LoRA or DDP gradients)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for gate in gates:
        gate.grad = None
        gate.requires_grad_(True)
    try:
        yield
    finally:
        for gate in gates:
            gate.requires_grad_(False)
            gate.grad = None
        for p in trainable:
            p.requires_grad_(True)


def gate_gradients(model, editor: GateEditor, scoring: ScoringSet, batches: Sequence[int],
                   progress: Optional[Callable[[Iterable], Iterable]] = None) -> torch.Tensor:
    """``[summed CE, d(summed CE)/d gate of every slot of every layer ...]`` over ``batches`` (float64).

    Gates are taken as they are set in ``editor``'s layers; the layer order is ``editor.layers``'.
    """
    gates = [editor.gate(name) for name in editor.layers]
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    # autocast off for the backward too (on the CPU it runs in this thread, under the caller's autocast)
    with _gates_as_leaves(model, gates), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for i in (progress(batches) if progress else batches):
            loss = batch_loss_sum(model, scoring.batches[i], device)
            loss.backward()
            total += loss.detach().double().cpu()
        grads = [gate.grad.double().cpu() if gate.grad is not None else torch.zeros(gate.numel(), dtype=torch.float64)
                 for gate in gates]
    return torch.cat([total.reshape(1)] + grads)


@dataclass
class TaylorTerms:
    """First-order AB-LoRA terms: ``CE(without rho) ~ loss + removal[rho]``, ``CE(only rho) ~ base_loss + alone[rho]``."""

    loss: float
    base_loss: float
    removal: dict
    alone: dict

    def scores(self) -> dict[Rank, float]:
        return {rank: (self.loss + self.removal[rank]) - (self.base_loss + self.alone[rank]) for rank in self.removal}

    def uncertainty(self) -> dict[Rank, float]:
        """How far a score may be off: the size of both first-order terms."""
        return {rank: abs(self.removal[rank]) + abs(self.alone[rank]) for rank in self.removal}


def taylor_terms(model, layers: Mapping[str, torch.nn.Module], adapter: str, scoring: ScoringSet,
                 ranks: Sequence[Rank], progress=None) -> TaylorTerms:
    """Gate derivatives at the current gates and at all gates off, for every rank in ``ranks``."""
    work = share_work(model, range(len(scoring.batches)))
    mine = work.mine
    device = model_device(model)
    editor = GateEditor(layers, adapter)
    cache_key = ("base_gradients", adapter, tuple(layers))
    base = scoring.cache.get(cache_key)
    try:
        with eval_mode(model):
            on = gate_gradients(model, editor, scoring, mine, progress)  # current gates
            with torch.no_grad():
                editor.only(None)  # the base model
            base_pass = lambda: gate_gradients(model, editor, scoring, mine, progress)  # noqa: E731
            if base is None and gradient_bytes(layers) <= CACHE_LIMIT_BYTES:
                base = scoring.cache[cache_key] = BaseGradients.compute(layers, base_pass, device, work.total)
            off = base_pass() if base is None else None
    finally:
        editor.restore()
    on = work.total(on, device) / scoring.n_tokens
    if off is not None:
        off = work.total(off, device) / scoring.n_tokens
    else:  # the same derivatives from the cached base gradients
        off = torch.cat([torch.tensor([base.loss], dtype=torch.float64)]
                        + [base.alone(editor.layers[name], name, adapter) for name in editor.layers]) / scoring.n_tokens
    offsets, start = {}, 1
    for name in editor.layers:
        offsets[name] = start
        start += editor.gate(name).numel()
    index = {(name, slot): offsets[name] + slot for name, slot in ranks}
    return TaylorTerms(
        loss=float(on[0]), base_loss=float(off[0]),
        removal={rank: -float(on[i]) for rank, i in index.items()},  # switching rho off: g 1 -> 0
        alone={rank: float(off[i]) for rank, i in index.items()},    # switching rho on alone: g 0 -> 1
    )


def refinement_candidates(estimates: Mapping[Rank, float], uncertainty: Mapping[Rank, float], n_prune: int,
                          limit: int) -> list[Rank]:
    """Ranks whose exact score could fall among the ``n_prune`` lowest: the ``limit`` lowest estimates among them.

    Each estimate is trusted to within its uncertainty. The ``n_prune``-th lowest upper bound is a
    score that at least ``n_prune`` ranks are surely below; a rank whose lower bound is above it cannot
    be pruned and needs no exact score. Of the others, the lowest estimates go first (ordering by
    lower bound instead let ranks with wide intervals crowd out the near-ties at the threshold).
    """
    if limit <= 0 or not estimates:
        return []
    n = min(max(n_prune, 1), len(estimates))
    bound = sorted(estimates[r] + uncertainty[r] for r in estimates)[n - 1]
    lower = {r: estimates[r] - uncertainty[r] for r in estimates}
    return sorted((r for r in estimates if lower[r] <= bound), key=lambda r: (estimates[r], r))[:limit]


def fast_scores(model, layers, adapter, scoring, ranks, progress=None, config=None, n_prune: Optional[int] = None,
                refine: Optional[int] = None) -> dict[Rank, float]:
    """Taylor scores of every rank; up to ``refine`` (default ``config.scoring_refine``) of those that could be
    pruned are re-scored exactly.

    A first-order term is taken to be off by at most its own size (seen: the "only" term of a rank
    regrown one round earlier was off by 57%, most terms by under 10%), so a rank is a candidate for
    exact re-scoring when its score, widened by the sizes of both terms, reaches the pruning threshold.
    """
    terms = taylor_terms(model, layers, adapter, scoring, ranks, progress)
    scores = terms.scores()
    if refine is None:
        refine = getattr(config, "scoring_refine", 0) or 0
    if refine > 0:
        candidates = refinement_candidates(scores, terms.uncertainty(), n_prune or 1, refine)
        scores.update(distributed_exact_scores(model, layers, adapter, scoring, candidates, progress=progress))
    return scores

"""Fast AB-LoRA scores: first-order estimates of both terms from gradient passes.

With ``y = s * B diag(g) A x`` the loss is a smooth function of every gate ``g_rho``, so

    CE(without rho) ~ CE(M) - dCE/dg_rho            at the current gates (switching rho off: g 1 -> 0)
    CE(only rho)    ~ CE(base) + dCE/dg_rho         at all gates 0 (switching rho on alone: g 0 -> 1)

One forward+backward pass over the scoring set at the current gates and one at all gates off give
these derivatives for every rank at once, instead of 2 passes per rank. The pass at all gates off
is the frozen base model's: it runs once per run and is kept as weight gradients where they fit
(``base_gradient.py``). For low-scored ranks that first order cannot place on either side of the
pruning threshold, the "without" term is then taken exactly, until the ranks to prune are settled
(``refine_lazily``, at most ``scoring_refine`` ranks).

Everything runs in fp32 with the training loop's autocast off; gate gradients are accumulated in
fp32. Under several processes with replicated weights the micro-batches are split and the sums
all-reduced; with sharded weights every process runs them all (``distributed.share_work``).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping, Optional, Sequence

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..allocation import Rank
from ..distributed import is_sharded, share_work, world
from .base_gradient import CACHE_LIMIT_BYTES, BaseGradients, gradient_bytes
from .common import (ScoringSet, base_cache_key, base_is_frozen, batch_loss_sum, eval_mode, forwards_replaced,
                     model_device)
from .exact import GateEditor, distributed_exact_scores
from .prefix import PrefixCache, decoder_blocks, recording


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


def _checkpointed_as_in_training(model: torch.nn.Module):
    """Gradient passes run in eval mode (no dropout), and transformers checkpoints a block only while it
    trains: without this, a pass would keep every block's activations for its backward (a 4-bit 8B model
    at micro-batches of 4 x 1024 tokens: a round peaked at 31.0 GiB against 15.1 GiB, on an H100).
    Blocks with checkpointing enabled are called through their own checkpoint function for the pass,
    as in training; a cache of past keys is dropped as in training (a recompute would extend it twice)."""
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]

    def checkpointed(block):
        forward = block.forward  # in eval mode the class's wrapper calls the block's own forward

        def run(*args, **kwargs):
            for key in ("past_key_values", "layer_past"):
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            return block._gradient_checkpointing_func(functools.partial(forward, **kwargs), *args)
        return run

    return forwards_replaced(blocks, checkpointed)


def gate_gradients(model, editor: GateEditor, scoring: ScoringSet, batches: Sequence[int],
                   progress: Optional[Callable[[Iterable], Iterable]] = None) -> torch.Tensor:
    """``[summed CE, d(summed CE)/d gate of every slot of every layer ...]`` over ``batches`` (float64).

    Gates are taken as they are set in ``editor``'s layers; the layer order is ``editor.layers``'.
    """
    gates = [editor.gate(name) for name in editor.layers]
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64)
    # autocast off for the backward too (on the CPU it runs in this thread, under the caller's autocast)
    with _gates_as_leaves(model, gates), _checkpointed_as_in_training(model), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
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
    prefix: Optional[PrefixCache] = None  # block outputs at the current gates, when the gradient pass saw every batch

    def scores(self) -> dict[Rank, float]:
        return {rank: (self.loss + self.removal[rank]) - (self.base_loss + self.alone[rank]) for rank in self.removal}


def taylor_terms(model, layers: Mapping[str, torch.nn.Module], adapter: str, scoring: ScoringSet,
                 ranks: Sequence[Rank], progress=None, record_prefix: bool = False) -> TaylorTerms:
    """Gate derivatives at the current gates and at all gates off, for every rank in ``ranks``.

    ``record_prefix``: also keep the block outputs of the pass at the current gates (``prefix.py``),
    which exact passes of the same round can start from; on one process only, where that pass
    sees every scoring batch.
    """
    work = share_work(model, range(len(scoring.batches)))
    mine = work.mine
    device = model_device(model)
    editor = GateEditor(layers, adapter)
    cache_key = base_cache_key(model, "base_gradients", adapter, layers)
    base = scoring.cache.get(cache_key)
    keep = base_is_frozen(model) and gradient_bytes(layers) <= CACHE_LIMIT_BYTES
    try:
        blocks = decoder_blocks(model, layers)[0] if record_prefix and world()[0] == 1 else None
        with eval_mode(model):
            with recording(blocks, scoring) if blocks is not None else contextlib.nullcontext() as recorder:
                on = gate_gradients(model, editor, scoring, mine, progress)  # current gates
            with torch.no_grad():
                editor.only(None)  # the base model
            base_pass = lambda: gate_gradients(model, editor, scoring, mine, progress)  # noqa: E731
            if base is None and keep:
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
        loss=float(on[0]), base_loss=float(off[0]), prefix=recorder.cache() if blocks is not None else None,
        removal={rank: -float(on[i]) for rank, i in index.items()},  # switching rho off: g 1 -> 0
        alone={rank: float(off[i]) for rank, i in index.items()},    # switching rho on alone: g 0 -> 1
    )


def default_refine(n_prune: int) -> int:
    """``scoring_refine`` left unset: at most twice the ranks pruned per round (the quick benchmark's two
    seeds, 16 rounds: 16 identical plans with up to 2 x 7 re-scored ranks, 9.3 re-scored on average)."""
    return 2 * n_prune


BOUND_SLACK = 2.0  # how far first order may still miss a rank not re-scored, in units of the worst seen
CALIBRATION = 2  # re-scored ranks of the run's first allocation before their misses bound the others from above


def rank_sizes(layers: Mapping[str, torch.nn.Module], adapter: str, ranks: Sequence[Rank]) -> dict[Rank, float]:
    """``(s |B[:, rho]| |A[rho]|)^2`` per rank: how large its second-order term can be, up to a factor."""
    slots: dict[str, list[int]] = {}
    for name, slot in ranks:  # dicts keep order: every process gathers the same layers in the same order
        slots.setdefault(name, []).append(slot)
    sizes = {}
    for name, chosen in slots.items():
        layer = layers[name]
        weight_a, weight_b = layer.slot_weights(adapter)
        rows = weight_a.detach().double().pow(2).sum(1)
        columns = weight_b.detach().double().pow(2).sum(0)
        scale = float(layer.scaling[adapter]) ** 2
        sizes.update({(name, slot): scale * float(rows[slot] * columns[slot]) for slot in chosen})
    return sizes


class _Bounds:
    """Where each rank's re-scored value can lie, from the first-order estimates and the misses seen so far.

    Below: the estimate minus :data:`BOUND_SLACK` x the largest overestimate per unit size seen on
    any re-scored rank. Above: the estimate plus the slack x the largest miss per unit size seen on
    re-scored ranks that were never grown by a round, and only once :data:`CALIBRATION` of those
    are known. Grown ranks get no upper bound: a rank grown from ``B = 0`` with its ``A`` row on the
    gradient's leading direction can sit at the bottom of a steep valley, so first order misses its
    removal cost by far more per unit size (quick benchmark: up to 1.4 against at most 0.045 for
    the run's first ranks).
    """

    def __init__(self, estimates, size, grown, n_prune):
        self.estimates, self.size, self.grown, self.n_prune = estimates, size, grown, n_prune
        self.refined: dict[Rank, float] = {}
        self.over = self.miss = 0.0
        self.calibrated = 0

    def add(self, rank, value):
        self.refined[rank] = value
        miss = (value - self.estimates[rank]) / self.size(rank)
        self.over = max(self.over, -miss)
        if self.grown is not None and rank not in self.grown:
            self.miss = max(self.miss, abs(miss))
            self.calibrated += 1

    def undecided(self) -> list[Rank]:
        """Ranks not re-scored yet that may or may not be among the ``n_prune`` lowest, lowest estimate first."""
        low, high = {}, {}
        for rank, estimate in self.estimates.items():
            if rank in self.refined:
                low[rank] = high[rank] = self.refined[rank]
                continue
            size = self.size(rank)
            low[rank] = estimate - BOUND_SLACK * self.over * size
            bounded = self.grown is not None and self.calibrated >= CALIBRATION and rank not in self.grown
            high[rank] = estimate + BOUND_SLACK * self.miss * size if bounded else math.inf
        lows, highs = sorted(low.values()), sorted(high.values())
        undecided = []
        for rank in self.estimates:
            may_be_below = bisect.bisect_left(lows, high[rank]) - (low[rank] < high[rank])
            surely_below = bisect.bisect_left(highs, low[rank])
            if may_be_below >= self.n_prune and surely_below < self.n_prune and rank not in self.refined:
                undecided.append(rank)
        return sorted(undecided, key=lambda r: (self.estimates[r], r))


def refine_lazily(estimates: Mapping[Rank, float], n_prune: int, limit: int,
                  rescore: Callable[[list[Rank]], Mapping[Rank, float]], sizes: Optional[Mapping[Rank, float]] = None,
                  chunk: int = 1, grown: Optional[Collection[Rank]] = None) -> dict[Rank, float]:
    """Re-score ranks until the ``n_prune`` to prune are settled: ``{rank: re-scored value}`` for at most
    ``limit`` ranks.

    The gap between a first-order estimate and the re-scored value is second order, so it scales
    with the rank's size (``rank_sizes``; 1 for every rank when ``sizes`` is None); the gaps seen so
    far bound the others (``_Bounds``). Each step re-scores the undecided rank (one that could be on
    either side of the threshold) with the lowest estimate, and stops when none is left: the ranks
    certainly among the lowest need no exact value either. Only ranks of the run's first
    allocation can be settled without one; ``grown`` lists the ranks grown by earlier rounds
    (None: not known, so none is). Why the lowest first rather than only those nearest the
    threshold: a grown rank can sit at the bottom of its loss valley, gradient ~0, so first order
    puts it among the lowest while removing it costs a lot (seen on the quick benchmark:
    estimated -7e-5, exact +3.7e-3).

    ``rescore`` takes ranks ``chunk`` at a time (one per process); re-scored ranks that one-at-a-time
    refinement would not have chosen next are dropped, so the result does not depend on ``chunk``.
    """
    limit = min(max(limit, 0), len(estimates))
    size = (lambda rank: max(sizes[rank], 1e-30)) if sizes is not None else (lambda rank: 1.0)
    bounds = _Bounds(estimates, size, None if grown is None else set(grown), n_prune)
    undecided = bounds.undecided() if n_prune > 0 and limit > 0 else []
    while undecided:
        first = CALIBRATION if not bounds.refined else 1  # no bound from above before these: the lowest estimates
        chosen = undecided[:min(max(chunk, first), limit - len(bounds.refined))]
        values = rescore(chosen)
        for rank in chosen:
            if rank != undecided[0]:  # not what one-at-a-time refinement picks next
                break
            bounds.add(rank, values[rank])
            undecided = bounds.undecided()
            if not undecided or len(bounds.refined) >= limit:
                return bounds.refined
    return bounds.refined


def current_prefix(model, layers, scoring: ScoringSet) -> Optional[PrefixCache]:
    """Block outputs at the current gates on the whole scoring set (None: no repeated blocks to skip)."""
    blocks = decoder_blocks(model, layers)[0]
    if blocks is None:
        return None
    with eval_mode(model):
        return PrefixCache.record(model, blocks, scoring)


def fast_scores(model, layers, adapter, scoring, ranks, progress=None, config=None, n_prune: Optional[int] = None,
                refine: Optional[int] = None, grown: Optional[Collection[Rank]] = None) -> dict[Rank, float]:
    """Taylor scores of every rank; for the ranks that first order cannot place on either side of the
    pruning threshold, at most ``refine`` (default ``config.scoring_refine``) of them, the "without
    rho" term is replaced by its exact value (``refine_lazily``; ``grown``: the ranks grown by
    earlier rounds, which it always re-scores before pruning them).

    Why only that term: late in a run the loss sits near a minimum in every gate, so the gradient
    at the current gates (first order of "without rho") says little about what removing a rank
    costs; the "only rho" term is taken at the base model, where it does not vanish. On the quick
    benchmark, exact "without" terms alone took the same decisions as exact scores in every round.
    The exact passes start at the rank's decoder block (``prefix.py``): about half a pass each.
    """
    if refine is None:
        refine = getattr(config, "scoring_refine", None)
    if refine is None:
        refine = default_refine(n_prune or 0)
    terms = taylor_terms(model, layers, adapter, scoring, ranks, progress, record_prefix=refine > 0)
    scores = terms.scores()
    if refine > 0:
        bar, current = progress, terms.prefix

        def rescore(chosen):  # a progress bar for the first chunk only: later ones are a rank or two each
            nonlocal bar, current
            if current is None:  # several processes: the gradient pass saw a share of the batches
                current = current_prefix(model, layers, scoring)  # once per round, not once per chunk
            without = distributed_exact_scores(model, layers, adapter, scoring, chosen, progress=bar,
                                               parts=("without",), current=current)
            bar = None
            return {rank: without[rank] - (terms.base_loss + terms.alone[rank]) for rank in chosen}
        scores.update(refine_lazily(scores, n_prune if n_prune is not None else refine, refine, rescore,
                                    sizes=rank_sizes(layers, adapter, ranks),
                                    chunk=1 if is_sharded(model) else world()[0], grown=grown))
    return scores

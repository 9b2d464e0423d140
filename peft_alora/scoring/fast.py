"""Fast AB-LoRA scores: first-order estimates of both terms from two gradient passes.

With ``y = s * B diag(g) A x`` the loss is a smooth function of every gate ``g_rho``, so

    CE(without rho) ~ CE(M) - dCE/dg_rho            at the current gates (switching rho off: g 1 -> 0)
    CE(only rho)    ~ CE(base) + dCE/dg_rho         at all gates 0 (switching rho on alone: g 0 -> 1)

One forward+backward pass over the scoring set at the current gates and one at all gates off give
these derivatives for every rank at once, instead of 2 passes per rank. The ``refine`` lowest
estimates (the ranks near the pruning threshold) can then be re-scored exactly.

Everything runs in fp32 with the training loop's autocast off; gate gradients are accumulated in
fp32. Under several processes the micro-batches are split and the sums all-reduced.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..allocation import Rank
from ..distributed import sum_across_processes, world
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
    with _gates_as_leaves(model, gates), torch.enable_grad():
        for i in (progress(batches) if progress else batches):
            loss = batch_loss_sum(model, scoring.batches[i], device)
            loss.backward()
            total += loss.detach().double().cpu()
        grads = [gate.grad.double().cpu() if gate.grad is not None else torch.zeros(gate.numel(), dtype=torch.float64)
                 for gate in gates]
    return torch.cat([total.reshape(1)] + grads)


def taylor_scores(model, layers: Mapping[str, torch.nn.Module], adapter: str, scoring: ScoringSet,
                  ranks: Sequence[Rank], progress=None) -> dict[Rank, float]:
    """First-order AB-LoRA scores of ``ranks``: CE(M) - g_on - (CE(base) + g_off), g the gate derivatives."""
    processes, me = world()
    mine = list(range(len(scoring.batches)))[me::processes]
    editor = GateEditor(layers, adapter)
    sums = []
    try:
        with eval_mode(model):
            sums.append(gate_gradients(model, editor, scoring, mine, progress))  # current gates
            with torch.no_grad():
                editor.only(None)  # the base model
            sums.append(gate_gradients(model, editor, scoring, mine, progress))
    finally:
        editor.restore()
    device = model_device(model)
    on, off = (sum_across_processes(v, device) / scoring.n_tokens for v in sums)
    offsets, start = {}, 1
    for name in editor.layers:
        offsets[name] = start
        start += editor.gate(name).numel()
    scores = {}
    for name, slot in ranks:
        i = offsets[name] + slot
        without = on[0] - on[i]   # CE(M) - dCE/dg at the current gates
        only = off[0] + off[i]    # CE(base) + dCE/dg at all gates off
        scores[(name, slot)] = float(without - only)
    return scores


def fast_scores(model, layers, adapter, scoring, ranks, progress=None, config=None,
                refine: Optional[int] = None) -> dict[Rank, float]:
    """Taylor scores of every rank; the ``refine`` lowest (default ``config.scoring_refine``) scored exactly."""
    scores = taylor_scores(model, layers, adapter, scoring, ranks, progress)
    if refine is None:
        refine = getattr(config, "scoring_refine", 0) or 0
    if refine > 0:
        lowest = sorted(scores, key=lambda rank: (scores[rank], rank))[:refine]
        scores.update(distributed_exact_scores(model, layers, adapter, scoring, lowest, progress=progress))
    return scores

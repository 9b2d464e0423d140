"""Gradient-aligned regrowth (``ALoRAConfig.regrow_init="gradient"``), beyond the paper.

A regrown rank starts with B = 0, so at first it learns only through its B column, whose gradient
is ``s * G @ a`` for its A row ``a``, where ``G = sum_tokens (dL/dy) x^T`` is the loss gradient of
the module's weight. A random ``a`` catches a ~1/sqrt(d_in) share of ``G``; the leading right
singular vectors of ``G`` (outside the span of the module's active A rows, which already cover
their own directions) catch the most. The output is still unchanged when the rank is added.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .scoring.common import IGNORE_INDEX, ScoringSet, _to_device, eval_mode


def _weight_gradients(model, layers: Mapping[str, torch.nn.Module], scoring: ScoringSet, autocast) -> dict:
    """``G`` (out x in, fp32) of each layer, from the loss of the scoring set (no ``.grad`` is touched)."""
    inputs, outputs, handles = {}, {}, []

    def keep(name):
        def hook(module, args, output):
            inputs[name], outputs[name] = args[0].detach(), output
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(keep(name)))
    grads = {name: None for name in layers}
    device = next(p.device for p in model.parameters())
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in scoring.batches:
                batch = _to_device(batch, device)
                labels = batch.pop("labels")
                with autocast():
                    logits = model(**batch).logits
                loss = F.cross_entropy(logits[..., :-1, :].float().flatten(0, 1), labels[..., 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
                names = [n for n in layers if n in outputs and outputs[n].requires_grad]
                dys = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
                for name, dy in zip(names, dys):
                    if dy is None:
                        continue
                    g = dy.float().flatten(0, -2).T @ inputs[name].float().flatten(0, -2)
                    grads[name] = g if grads[name] is None else grads[name] + g
                inputs.clear()
                outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return grads


def gradient_directions(
    model,
    layers: Mapping[str, torch.nn.Module],
    adapter: str,
    counts: Mapping[str, int],
    scoring: ScoringSet,
    autocast: Callable = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """For each module of ``counts``: ``counts[m]`` orthonormal rows (k x d_in, fp32, CPU) along which new
    A rows gain the most gradient. A module whose gradient is zero gets no entry (random rows then)."""
    chosen = {name: layers[name] for name, k in counts.items() if k > 0}
    grads = _weight_gradients(model, chosen, scoring, autocast)
    directions = {}
    for name, g in grads.items():
        if g is None or not torch.isfinite(g).all() or float(g.abs().max()) == 0.0:
            continue
        layer = chosen[name]
        rows = layer.lora_A[adapter].weight.detach().float().to(g.device)[layer.active_slots(adapter)]
        if rows.numel():
            basis, _ = torch.linalg.qr(rows.T)  # d_in x r_active, orthonormal
            g = g - (g @ basis) @ basis.T
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        directions[name] = vh[: counts[name]].cpu()
    return _same_everywhere(directions)


def _same_everywhere(directions: dict) -> dict:
    """Under torch.distributed, every process takes process 0's rows (decisions must be identical)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return directions
    out = {}
    for name in sorted(directions):
        row = directions[name].contiguous()
        if dist.get_backend() == "nccl":
            row = row.cuda()
        dist.broadcast(row, src=0)
        out[name] = row.cpu()
    return out

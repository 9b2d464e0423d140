"""The base model's loss and weight gradients on the scoring set, computed once per run.

The base model is frozen and the scoring set fixed, so ``CE(base)`` and ``G = dCE(base)/dW`` of
every adapted layer stay the same for the whole run. With them, the first-order "only rho" term
of any rank is ``s * B[:, rho]^T G A[rho]``: a few small matrix products per round instead of a
gradient pass over the scoring set. ``G`` is as large as the adapted weights in fp32, so it is
kept only while that fits in :data:`CACHE_LIMIT_BYTES`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..distributed import sum_across_processes
from .common import ScoringSet

CACHE_LIMIT_BYTES = 1 << 30  # SmolLM2-135M all-linear: 0.42 GB; a 7B model would need ~26 GB


def gradient_bytes(layers: Mapping[str, torch.nn.Module]) -> int:
    return sum(4 * layer.in_features * layer.out_features for layer in layers.values())


class BaseGradients:
    """``loss`` (summed CE of the base model) and ``grads[name]`` (d_out x d_in, summed over tokens)."""

    def __init__(self, loss: float, grads: dict[str, torch.Tensor]):
        self.loss, self.grads = loss, grads

    @classmethod
    def compute(cls, layers: Mapping[str, torch.nn.Module], gradient_pass: Callable[[], torch.Tensor],
                device: torch.device, total=sum_across_processes) -> "BaseGradients":
        """Run ``gradient_pass`` (a backward over the scoring set with every gate off) while hooks sum
        ``dy^T x`` at every layer; ``total`` makes the processes' partial sums one (all end with the same)."""
        grads = {name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=device)
                 for name, layer in layers.items()}

        def hook(name):
            def capture(module, args, output):
                if not output.requires_grad:  # a reentrant checkpoint's first forward: its recompute comes back
                    return
                x = args[0].detach()

                def accumulate(grad_y):
                    if grad_y is None:  # no gradient reached this layer
                        return
                    grads[name].addmm_(grad_y.reshape(-1, grad_y.shape[-1]).float().t(),
                                       x.reshape(-1, x.shape[-1]).float())
                output.register_hook(accumulate)
            return capture

        handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        try:
            sums = gradient_pass()
        finally:
            for handle in handles:
                handle.remove()
        loss = float(total(sums[:1], device)[0])
        for name in grads:
            grads[name] = total(grads[name], device)
        return cls(loss, grads)

    def alone(self, layer: torch.nn.Module, name: str, adapter: str) -> torch.Tensor:
        """``d(summed CE)/d g`` at all gates off, for every slot of ``layer`` (float64)."""
        grad = self.grads[name]
        weight_a, weight_b = (w.detach().to(grad.device, torch.float32) for w in layer.slot_weights(adapter))
        with torch.autocast(grad.device.type, enabled=False):  # fp32 whatever the caller's autocast
            per_slot = ((weight_b.t() @ grad) * weight_a).sum(dim=1)
        return (per_slot * layer.scaling[adapter]).double().cpu()

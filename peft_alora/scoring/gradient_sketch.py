"""A small sketch of every layer's weight gradient, taken during the fast scorer's gradient pass, from
which gradient-aligned regrowth (``regrowth.py``) picks its new A rows without a pass of its own.

Regrowth wants the leading right singular vectors of ``G = sum_tokens dy x^T`` (d_out x d_in), the
loss gradient of a layer's weight. Keeping ``G`` for every layer costs as much memory as the adapted
weights and one more weight-gradient product per layer; the sketch keeps ``Y = Omega^T G`` instead,
``Omega`` a fixed Gaussian ``d_out x k`` matrix (``k`` = :data:`SKETCH_WIDTH`): ``Y^T Y`` is ``G^T G``
up to the noise of ``k`` random projections, so its leading right singular vectors are ``G``'s where
``G``'s spectrum falls off (the randomised range finder, Halko, Martinsson and Tropp 2011). A layer
with ``d_out <= k`` keeps ``G`` itself.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..distributed import full

SKETCH_WIDTH = 32
SKETCH_SEED = 20240325  # one fixed draw: every process and every round project alike


def leading_new_directions(gradient: torch.Tensor, layer: torch.nn.Module, adapter: str, k: int) -> Optional[torch.Tensor]:
    """The ``k`` leading right singular vectors (``k x d_in``, fp32, CPU) of ``gradient`` (any ``n x d_in``
    whose row space is the weight gradient's) once the span of the layer's active A rows is taken out;
    None when nothing is left or the gradient is not finite."""
    if gradient is None or not torch.isfinite(gradient).all() or float(gradient.abs().max()) == 0.0:
        return None
    rows = full(layer.lora_A[adapter].weight).detach().float().to(gradient.device)[layer.active_slots(adapter)]
    if rows.numel():
        basis, _ = torch.linalg.qr(rows.T)  # d_in x r_active, orthonormal
        gradient = gradient - (gradient @ basis) @ basis.T
    _, _, vh = torch.linalg.svd(gradient, full_matrices=False)
    return vh[:k].cpu()


class GradientSketch:
    """``Y[name] = Omega[name]^T G[name]`` of every layer, summed over the backward passes it hooks
    (``scoring.base_gradient.output_gradients``), in fp32."""

    def __init__(self, layers: Mapping[str, torch.nn.Module], device: torch.device, width: int = SKETCH_WIDTH):
        generator = torch.Generator().manual_seed(SKETCH_SEED)
        self.projection: dict[str, Optional[torch.Tensor]] = {}
        self.sketch: dict[str, torch.Tensor] = {}
        for name in sorted(layers):  # drawn in one order, so every process holds the same projections
            layer = layers[name]
            if layer.out_features <= width:
                self.projection[name] = None  # as small as a sketch: keep G
                rows = layer.out_features
            else:
                self.projection[name] = torch.randn(layer.out_features, width, generator=generator).to(device)
                rows = width
            self.sketch[name] = torch.zeros(rows, layer.in_features, dtype=torch.float32, device=device)

    def accumulate(self, name: str, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        projection = self.projection[name]
        left = grad_y if projection is None else grad_y @ projection
        self.sketch[name].addmm_(left.t(), x)

    def total(self, work_total, device) -> None:
        """Make the processes' partial sketches one (``WorkShare.total``); in sorted order everywhere."""
        for name in sorted(self.sketch):
            self.sketch[name] = work_total(self.sketch[name], device)

    def directions(self, layers: Mapping[str, torch.nn.Module], adapter: str,
                   counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """For each module of ``counts``, its ``counts[m]`` new A-row directions (see ``regrowth.py``)."""
        out = {}
        for name, k in counts.items():
            if k > 0:
                rows = leading_new_directions(self.sketch[name], layers[name], adapter, k)
                if rows is not None:
                    out[name] = rows
        return out

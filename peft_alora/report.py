"""Allocation report: a JSON record and a PNG figure of how ranks moved.

The history is a list of dicts, one per round; round 0 is the allocation before
any round::

    {"round": int, "step": int, "pruned": [[module, slot], ...],
     "grown": {module: count}, "active": {module: active_count},
     "active_total": int, "budget": int, "trainable_params": int,
     "scoring_seconds": float}

matplotlib is imported only when a figure is drawn, with the Agg backend.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["NO_LAYER", "split_module_name", "allocation_matrix", "write_report"]

#: Row index used for modules whose name has no numeric (layer) component.
NO_LAYER = -1

_DIGITS = re.compile(r"[0-9]+")


def split_module_name(name: str) -> Tuple[Optional[int], str]:
    """Split a dotted module path into (layer index, module type).

    The layer index is the last purely numeric component (None if there is
    none); the module type is the last component.
    ``"base_model.model.model.layers.3.self_attn.q_proj"`` -> ``(3, "q_proj")``.
    """
    parts = name.split(".")
    layer = None
    for part in reversed(parts):
        if _DIGITS.fullmatch(part):
            layer = int(part)
            break
    return layer, parts[-1]


def _cells(active: Mapping[str, int]):
    """Layers, types, and a matrix with None where no module exists."""
    types: List[str] = []
    sums: Dict[Tuple[int, str], int] = {}
    for name, count in active.items():
        layer, mtype = split_module_name(name)
        layer = NO_LAYER if layer is None else layer
        if mtype not in types:
            types.append(mtype)
        sums[(layer, mtype)] = sums.get((layer, mtype), 0) + int(count)
    layers = sorted({layer for layer, _ in sums})
    matrix = [[sums.get((layer, mtype)) for mtype in types] for layer in layers]
    return layers, types, matrix


def allocation_matrix(active: Mapping[str, int]) -> Tuple[List[int], List[str], List[List[int]]]:
    """Active ranks arranged as layer (rows) x module type (columns).

    Layers are sorted; types keep their first-seen order. Modules without a
    layer index go into row ``NO_LAYER`` (-1, so it sorts first). Modules that
    land in the same cell (e.g. encoder and decoder layer 0) are summed; cells
    with no module hold 0.
    """
    layers, types, matrix = _cells(active)
    return layers, types, [[0 if v is None else v for v in row] for row in matrix]


def type_totals(active: Mapping[str, int]) -> Dict[str, int]:
    """Active ranks summed per module type (the last part of each module name)."""
    totals: Dict[str, int] = {}
    for name, count in active.items():
        mtype = split_module_name(name)[1]
        totals[mtype] = totals.get(mtype, 0) + int(count)
    return totals


def _active_total(entry: Mapping) -> int:
    if entry.get("active_total") is not None:
        return int(entry["active_total"])
    return sum(int(v) for v in entry["active"].values())


def _summary(history: List[Mapping]) -> dict:
    first, last = history[0], history[-1]
    return {
        "rounds": int(last.get("round", len(history) - 1)),
        "budget": last.get("budget"),
        "budget_initial": first.get("budget_initial", first.get("budget")),
        "initial_active_total": _active_total(first),
        "final_active_total": _active_total(last),
        "final_trainable_params": last.get("trainable_params"),
        "initial_per_type_totals": type_totals(first["active"]),
        "final_per_type_totals": type_totals(last["active"]),
        "total_scoring_seconds": sum(float(e.get("scoring_seconds") or 0.0) for e in history),
    }


def write_report(
    history: List[Mapping],
    out_dir: Union[str, Path],
    title: str = "ALoRA allocation",
    loss_curve: Optional[Sequence[Tuple[int, float]]] = None,
) -> Dict[str, Path]:
    """Write ``alora_allocation.json`` and ``alora_allocation.png`` to ``out_dir``.

    The JSON holds ``{"summary": {...}, "history": [...], "loss_curve": [...]}``. The PNG shows the
    final allocation as a layer x type heatmap (left); on the right, the training loss over
    optimizer steps with the rounds marked (or, without ``loss_curve``, the total active ranks)
    and the per-type active ranks over the rounds. Returns ``{"json": path, "png": path}``.
    Raises ValueError for an empty history.
    """
    if not history:
        raise ValueError("history is empty: it needs at least round 0 (the initial allocation)")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("active"), Mapping):
            raise ValueError(f"history[{i}] has no 'active' mapping of module -> active rank count")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "alora_allocation.json"
    png_path = out / "alora_allocation.png"

    summary = _summary(history)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "history": list(history),
                   "loss_curve": [list(point) for point in loss_curve or []]}, f, indent=2)
        f.write("\n")

    _draw(history, summary, png_path, title, list(loss_curve or []))
    return {"json": json_path, "png": png_path}


def _draw(history: List[Mapping], summary: dict, path: Path, title: str, loss_curve: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    layers, types, cells = _cells(history[-1]["active"])
    data = np.ma.masked_invalid(
        np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float)
    )
    n_rows, n_cols = len(layers), len(types)

    height = max(5.0, 0.28 * n_rows + 2.0)
    fig = plt.figure(figsize=(max(12.0, 5.0 + 0.7 * n_cols + 6.0), height), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[max(1.0, 0.45 * n_cols), 5.0])
    ax_map = fig.add_subplot(grid[:, 0])
    ax_total = fig.add_subplot(grid[0, 1])
    ax_types = fig.add_subplot(grid[1, 1], sharex=None if loss_curve else ax_total)

    # Left: final allocation heatmap.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    vmax = max(1.0, float(data.max()) if data.count() else 1.0)
    image = ax_map.imshow(data, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax_map.set_xticks(range(n_cols))
    ax_map.set_xticklabels(types, rotation=45, ha="right", rotation_mode="anchor")
    ax_map.set_yticks(range(n_rows))
    ax_map.set_yticklabels(["(none)" if layer == NO_LAYER else str(layer) for layer in layers])
    ax_map.set_xlabel("module type")
    ax_map.set_ylabel("layer")
    ax_map.set_title(f"active ranks after round {history[-1].get('round', len(history) - 1)}")
    font = 8 if n_rows <= 40 else 6
    if n_rows <= 96 and n_cols <= 32:
        for i in range(n_rows):
            for j in range(n_cols):
                value = cells[i][j]
                if value is None:
                    continue
                color = "black" if value > 0.6 * vmax else "white"
                ax_map.text(j, i, str(value), ha="center", va="center", fontsize=font, color=color)
    fig.colorbar(image, ax=ax_map, label="active ranks", shrink=0.8)

    # Right, top: the training loss with the rounds marked, or the total active ranks.
    rounds = [int(e.get("round", i)) for i, e in enumerate(history)]
    budget = summary.get("budget")
    if loss_curve:
        ax_total.plot([p[0] for p in loss_curve], [p[1] for p in loss_curve], color="black", label="training loss")
        for k, entry in enumerate(history[1:]):
            ax_total.axvline(entry.get("step", 0), color="tab:blue", alpha=0.4, linestyle="--",
                             label="allocation round" if k == 0 else None)
        ax_total.set_xlabel("optimizer step")
        ax_total.set_ylabel("loss")
        ax_total.set_title("training loss")
        ax_total.legend(loc="upper right", fontsize=8)
    else:
        ax_total.plot(rounds, [_active_total(e) for e in history], marker="o", color="black", label="active total")
        if budget is not None:
            ax_total.axhline(budget, linestyle="--", color="tab:red", label=f"budget ({budget})")
        ax_total.set_ylabel("active ranks")
        ax_total.set_title("active ranks over rounds")
        ax_total.legend(loc="lower left", fontsize=8)
        ax_total.yaxis.set_major_locator(MaxNLocator(integer=True))
        plt.setp(ax_total.get_xticklabels(), visible=False)
    ax_total.grid(alpha=0.3)

    per_round = [type_totals(e["active"]) for e in history]
    for mtype in types:
        ax_types.plot(rounds, [t.get(mtype, 0) for t in per_round], marker=".", label=mtype)
    ax_types.set_ylabel("active ranks per type")
    ax_types.set_xlabel("round (optimizer step)")
    ax_types.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_types.grid(alpha=0.3)
    ax_types.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="type")
    steps = [e.get("step") for e in history]
    ax_types.set_xticks(rounds)
    ax_types.set_xticklabels(
        [f"{r}\n({s})" if s is not None else str(r) for r, s in zip(rounds, steps)], fontsize=8
    )

    fig.suptitle(
        f"{title}: {summary['rounds']} rounds, "
        f"{summary['final_active_total']}" + (f" / {budget}" if budget is not None else "") + " ranks"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)

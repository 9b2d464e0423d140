"""The loss-curve picture of a run: training loss per logged step, eval loss before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def write_loss_curve(log_history: list[dict], path: Path, eval_before: Optional[float] = None,
                     eval_after: Optional[float] = None, round_steps: tuple = ()) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    last_step = max([s for s, _ in train] + [e.get("step", 0) for e in log_history] + [1])
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], marker=".", color="black", label="training loss")
    for k, step in enumerate(round_steps):
        ax.axvline(step, color="tab:blue", alpha=0.35, linestyle="--", label="allocation round" if k == 0 else None)
    if eval_before is not None:
        ax.scatter([0], [eval_before], color="tab:red", zorder=3, label=f"eval loss before ({eval_before:.3f})")
    if eval_after is not None:
        ax.scatter([last_step], [eval_after], color="tab:green", zorder=3, label=f"eval loss after ({eval_after:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("alora-sft: loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

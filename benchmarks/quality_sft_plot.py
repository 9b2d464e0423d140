"""Held-out loss vs active ranks, from ``quality_sft.py`` JSON files: one point per run, a bar at each median.

    python benchmarks/quality_sft_plot.py LABEL=RESULT.json[,RESULT.json ...] ... --out docs/images/x.png

Each LABEL is one series (e.g. ``"ALoRA r=1"=a.json,b.json`` merges two seed ranges); the y value is
the loss on the eval rows that no method scored on (``eval_loss_unseen``).
"""

from __future__ import annotations

import argparse
import json
import statistics


def series(spec: str) -> tuple[str, list[dict]]:
    label, _, files = spec.rpartition("=")  # labels may hold "=" (r=1), paths do not
    rows = [row for path in files.split(",") for row in json.load(open(path))["rows"]]
    if not rows:
        raise SystemExit(f"{spec!r}: no runs in those files")
    return label, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="+", help="LABEL=RESULT.json[,RESULT.json ...]")
    parser.add_argument("--title", default="real SFT (SmolLM2-135M-Instruct, ISO dates, 30 steps)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [series(spec) for spec in args.series]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, rows) in enumerate(loaded):
        xs = [row["active_ranks"] * (1 + 0.03 * (i - 1)) for row in rows]  # a small shift keeps series apart
        ys = [row["eval_loss_unseen"] for row in rows]
        dots = ax.scatter(xs, ys, s=14, alpha=0.6)
        median = statistics.median(ys)
        ax.hlines(median, min(xs) * 0.97, max(xs) * 1.03, colors=dots.get_facecolor()[:1], linewidth=2.5,
                  label=f"{label}: median {median:.4f} ({len(ys)} seeds)")
    ax.set_xscale("log")
    ticks = sorted({row["active_ranks"] for _, rows in loaded for row in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("active LoRA ranks at the end (log scale)")
    ax.set_ylabel("held-out loss (rows no method scored on)")
    ax.set_title(args.title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

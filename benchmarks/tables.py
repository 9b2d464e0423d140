"""Markdown tables (and the docs picture) from the JSON files that quality.py and overhead.py wrote.

    python benchmarks/tables.py RESULT.json ... [--relabel old=new ...] [--figure docs/images/quality.png]

``--relabel`` renames methods in the output only (e.g. a run made when another variant was the default).
"""

import argparse
import json
import statistics


def quality_table(data) -> str:
    runs = data["runs"]
    lines = ["| task | method | held-out KL, median (min–max) | vs LoRA: median / median (worst seed) | rank match | "
             "churn | run s (median) |", "|---|---|---|---|---|---|---|"]
    for key, s in data["summary"].items():
        task, method = key.split("/")
        mine = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == method}
        lora = {r["seed"]: r["held_out_kl"] for r in runs if r["task"] == task and r["method"] == "lora"}
        ratios = [mine[k]["held_out_kl"] / lora[k] for k in mine if k in lora]
        lora_median = statistics.median(lora.values())
        churns = [r["churn"] for r in mine.values() if r.get("churn") is not None]
        lines.append(
            f"| {task} | {method} | {s['median']:.4f} ({s['min']:.4f}–{s['max']:.4f}) | "
            f"{s['median'] / lora_median:.3f} ({max(ratios):.3f}) | {s['rank_match']:.2f} | "
            f"{statistics.median(churns):.2f} | {s['seconds']:.0f} |" if churns else
            f"| {task} | {method} | {s['median']:.4f} ({s['min']:.4f}–{s['max']:.4f}) | "
            f"{s['median'] / lora_median:.3f} ({max(ratios):.3f}) | {s['rank_match']:.2f} | – | {s['seconds']:.0f} |")
    return "\n".join(lines)


def overhead_table(data) -> str:
    lines = ["| precision | LoRA step s | ALoRA step s | ratio | LoRA MiB | ALoRA MiB | ratio |",
             "|---|---|---|---|---|---|---|"]
    for precision, t in data["table"].items():
        lines.append(f"| {precision} | {t['lora_step_seconds']:.3f} | {t['alora_step_seconds']:.3f} | "
                     f"{t['step_time_ratio']:.3f} | {t['lora_model_and_training_mib']:.0f} | "
                     f"{t['alora_model_and_training_mib']:.0f} | {t['peak_memory_ratio']:.3f} |")
    runs = data["runs"]
    med = {m: statistics.median(r["run_seconds"] for r in runs if r["method"] == m) for m in ("lora", "alora")}
    scoring = statistics.median(r["scoring_seconds"] for r in runs if r["method"] == "alora")
    lines.append("")
    lines.append(f"Whole SFT run: LoRA {med['lora']:.1f} s, ALoRA {med['alora']:.1f} s (of which scoring "
                 f"{scoring:.1f} s): ratio {data['headline']['run_time_ratio']:.2f}.")
    return "\n".join(lines)


def relabel(data, names: dict):
    for run in data.get("runs", []):
        run["method"] = names.get(run["method"], run["method"])
    if "summary" in data and "steps" not in data:
        data["summary"] = {f"{k.split('/')[0]}/{names.get(k.split('/')[1], k.split('/')[1])}": v
                           for k, v in data["summary"].items()}
    return data


def figure(datasets, path):
    """Held-out KL vs wall time per method (median, min-max bars), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.9), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        runs = data["runs"]
        for i, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
            sel = [r for r in runs if r["method"] == method]
            kl = [r["held_out_kl"] for r in sel]
            x, y = statistics.median(r["seconds"] for r in sel), statistics.median(kl)
            ax.errorbar([x], [y], yerr=[[y - min(kl)], [max(kl) - y]], fmt="o", ms=7, capsize=3, color=f"C{i}",
                        label=method)
        ax.set_title(f"{runs[0]['task']}: {len({r['seed'] for r in runs})} seeds, same rank budget")
        ax.set_xlabel("wall time of a run, s (2-core CPU, shared)")
        ax.set_ylabel("held-out KL(teacher || student)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--relabel", nargs="*", default=[], help="old=new method names")
    parser.add_argument("--figure", default=None, help="write the quality picture here")
    args = parser.parse_args(argv)
    names = dict(pair.split("=", 1) for pair in args.relabel)
    quality = []
    for path in args.paths:
        with open(path) as handle:
            data = relabel(json.load(handle), names)
        print(f"\n<!-- {path} -->")
        print(overhead_table(data) if "steps" in data else quality_table(data))
        if "steps" not in data:
            quality.append(data)
    if args.figure and quality:
        figure(quality, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()

"""Markdown tables for docs/benchmarks.md from the JSON files that quality.py and overhead.py wrote.

    python benchmarks/tables.py benchmarks/results/quality_tiny-llama.json benchmarks/results/overhead.json ...
"""

import json
import statistics
import sys


def quality_table(data) -> str:
    runs = data["runs"]
    lines = ["| task | method | held-out KL, median (min–max) | vs LoRA, median (worst seed) | rank match | "
             "churn | run s (median) |", "|---|---|---|---|---|---|---|"]
    for key, s in data["summary"].items():
        task, method = key.split("/")
        mine = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == method}
        lora = {r["seed"]: r["held_out_kl"] for r in runs if r["task"] == task and r["method"] == "lora"}
        ratios = [mine[k]["held_out_kl"] / lora[k] for k in mine if k in lora]
        churns = [r["churn"] for r in mine.values() if r.get("churn") is not None]
        lines.append(
            f"| {task} | {method} | {s['median']:.4f} ({s['min']:.4f}–{s['max']:.4f}) | "
            f"{statistics.median(ratios):.3f} ({max(ratios):.3f}) | {s['rank_match']:.2f} | "
            f"{statistics.median(churns):.2f} | {s['seconds']:.0f} |" if churns else
            f"| {task} | {method} | {s['median']:.4f} ({s['min']:.4f}–{s['max']:.4f}) | "
            f"{statistics.median(ratios):.3f} ({max(ratios):.3f}) | {s['rank_match']:.2f} | – | {s['seconds']:.0f} |")
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


def main(paths):
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        print(f"\n<!-- {path} -->")
        print(overhead_table(data) if "steps" in data else quality_table(data))


if __name__ == "__main__":
    main(sys.argv[1:])

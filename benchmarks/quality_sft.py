"""Real SFT at equal budget: LoRA vs PEFT's AdaLoRA vs ALoRA on the default recipe (CPU).

The run of ``alora-sft`` with no arguments (the real SmolLM2-135M-Instruct, the shipped ISO-dates
task, r=8 on all linear layers, 30 steps), with only the adapter changed: uniform LoRA from the
same ModelConfig, AdaLoRA (init_r = 2r pruned to target_r = r, its cubic schedule: warm-up 10%,
final budget for the last 30%), and ALoRA with its callback and defaults. Held-out loss and exact
match on the 80 test questions after training, per seed; median over seeds. ALoRA scores its ranks
on 16 of those rows (the recipe's scoring set, drawn from the eval split), so every method is also
measured on the 64 other rows ("unseen"): the fair comparison.

    python benchmarks/quality_sft.py                   # 3 seeds x 3 methods, ~3-4 min per run on one core
    python benchmarks/quality_sft.py --max-steps 15    # a shorter run, where the task is not yet solved
    python benchmarks/quality_sft.py --methods alora --alora-flags="--allocation_end 0.2"  # an ALoRA variant
    python benchmarks/quality_sft.py --methods adalora --adalora-flags="--learning_rate 1e-2"  # AdaLoRA at another lr
    python benchmarks/quality_sft.py --methods alora --leave-out 32  # unseen rows comparable with a 32-row scoring set

Writes benchmarks/results/quality_sft.json; the last line is one JSON object with
``eval_loss_ratio_alora_vs_lora`` and ``eval_loss_ratio_alora_vs_adalora`` (medians over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import AdaLoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import get_peft_config  # noqa: E402

from peft_alora import ALoRACallback  # noqa: E402
from peft_alora.callback import scoring_indices  # noqa: E402
from peft_alora.cli.args import parse_args  # noqa: E402
from peft_alora.cli.evaluation import loss_and_exact_match  # noqa: E402
from peft_alora.cli.sft import build_trainer  # noqa: E402
from peft_alora.report import type_totals  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lora", "adalora", "alora")


class AdaLoraSchedule(TrainerCallback):
    """AdaLoRA's budget step after each optimizer step, while the gradients are still there (as PEFT asks)."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def adapter(method: str, model_args, steps: int):
    if method == "lora":
        return get_peft_config(model_args)
    if method == "adalora":
        r = model_args.lora_r
        return AdaLoraConfig(init_r=2 * r, target_r=r, tinit=steps // 10, tfinal=3 * steps // 10,
                             deltaT=max(1, steps // 50), total_step=steps, lora_alpha=2 * model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules)
    return None  # the recipe's own ALoRA adapter


def active_ranks(model, method: str) -> int:
    tuner = model.base_model
    if method == "alora":
        return tuner.count_active_ranks()
    if method == "adalora":
        return sum(int((m.lora_E["default"] != 0).sum()) for m in tuner.model.modules() if hasattr(m, "lora_E"))
    return sum(m.lora_A["default"].weight.shape[0] for m in tuner.model.modules()
               if hasattr(m, "lora_A") and "default" in m.lora_A)


def final_ranks(model) -> dict:
    """ALoRA's final active ranks, per module and summed per module type (where the rounds moved the budget)."""
    per_module = {name: layer.num_active("default") for name, layer in model.base_model.gated_layers()}
    return {"per_type_ranks": type_totals(per_module), "final_ranks": per_module}


def alora_scoring_examples(flags: str) -> int:
    """The ALoRA runs' scoring-set size, from every flag they get (the same rows are left out for every
    method, to compare alike)."""
    _, _, _, _, alora, _ = parse_args(flags.split())
    return alora.scoring_examples


def run(method: str, seed: int, args) -> dict:
    flags = ["--output_dir", tempfile.mkdtemp(prefix=f"quality-sft-{method}-"), "--seed", str(seed),
             "--disable_tqdm", "true", "--max_steps", str(args.max_steps)]
    if args.learning_rate is not None:
        flags += ["--learning_rate", str(args.learning_rate)]
    flags += args.flags.split()  # every method's, e.g. "--lora_r 2 --lora_alpha 4"
    if method == "alora":
        flags += args.alora_flags.split()  # e.g. "--allocation_end 0.2": a variant of the recipe's ALoRA
    if method == "adalora":
        flags += args.adalora_flags.split()  # e.g. "--learning_rate 1e-2"
    script, training, model_args, data, alora, _ = parse_args(flags)
    trainer, *_ = build_trainer(script, training, model_args, data, alora,
                                peft_config=adapter(method, model_args, args.max_steps))
    if method == "alora":
        trainer.add_callback(ALoRACallback(trainer))
    elif method == "adalora":
        trainer.add_callback(AdaLoraSchedule(trainer.model))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = loss_and_exact_match(trainer, desc="eval")
    # ALoRA scores ranks (and aims regrown ones) on scoring_examples rows of the eval split: every method is
    # also measured on the other rows, which no method has seen (the callback's own seeded draw)
    scored = set(scoring_indices(len(trainer.eval_dataset), args.leave_out, seed))
    full_eval = trainer.eval_dataset
    trainer.eval_dataset = full_eval.select([i for i in range(len(full_eval)) if i not in scored])
    unseen = loss_and_exact_match(trainer, desc="eval (rows not scored on)")
    trainer.eval_dataset = full_eval
    return {"method": method, "seed": seed, "eval_loss": after["eval_loss"], "exact_match": after["exact_match"],
            "eval_loss_unseen": unseen["eval_loss"], "exact_match_unseen": unseen["exact_match"],
            "unseen_rows": unseen["exact_match_examples"],
            "active_ranks": active_ranks(trainer.model, method), "train_seconds": seconds,
            **(final_ranks(trainer.model) if method == "alora" else {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-steps", type=int, default=30, help="the recipe's 30 by default")
    parser.add_argument("--learning-rate", type=float, default=None, help="every method's (default: the recipe's)")
    parser.add_argument("--flags", default="",
                        help='alora-sft flags for every method (give them after \'=\'), e.g. --flags="--lora_r 2 --lora_alpha 4"')
    parser.add_argument("--alora-flags", default="",
                        help="alora-sft flags for the ALoRA runs only (give them after '='), "
                             'e.g. --alora-flags="--allocation_start 0.05 --allocation_end 0.2"')
    parser.add_argument("--adalora-flags", default="",
                        help='alora-sft flags for the AdaLoRA runs only, e.g. --adalora-flags="--learning_rate 1e-2"')
    parser.add_argument("--leave-out", type=int, default=None,
                        help="rows of the seeded draw kept out of the unseen-row measure (default: the ALoRA runs' "
                             "scoring_examples); give the largest scoring set of the runs you compare, whose draws "
                             "are prefixes of one another")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "quality_sft.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # before any trainer: parsing resets accelerate
    args.scoring_examples = alora_scoring_examples(f"{args.flags} {args.alora_flags}")
    if args.leave_out is None:
        args.leave_out = args.scoring_examples
    elif args.leave_out < args.scoring_examples:
        parser.error(f"--leave-out {args.leave_out} is below the ALoRA runs' scoring set ({args.scoring_examples} "
                     "rows): rows ALoRA scored on would count as unseen")
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            row = run(method, seed, args)
            rows.append(row)
            print(f"seed {seed} {method:8} eval loss {row['eval_loss']:.4f} exact match {row['exact_match']:.3f} "
                  f"(rows not scored on: {row['eval_loss_unseen']:.4f}, {row['exact_match_unseen']:.3f}) "
                  f"active ranks {row['active_ranks']} train {row['train_seconds']:.0f}s", flush=True)
    summary = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        summary[method] = {"eval_loss_median": statistics.median(r["eval_loss"] for r in mine),
                           "eval_loss_range": [min(r["eval_loss"] for r in mine), max(r["eval_loss"] for r in mine)],
                           "exact_match_median": statistics.median(r["exact_match"] for r in mine),
                           "eval_loss_unseen_median": statistics.median(r["eval_loss_unseen"] for r in mine),
                           "exact_match_unseen_median": statistics.median(r["exact_match_unseen"] for r in mine)}
    print(f"\n{'method':8} {'eval loss (median, range)':>32} {'exact match':>12}")
    for method, s in summary.items():
        low, high = s["eval_loss_range"]
        print(f"{method:8} {s['eval_loss_median']:12.4f} ({low:.4f}-{high:.4f}) {s['exact_match_median']:12.3f}")
    line = {"max_steps": args.max_steps, "seeds": len(args.seeds), "learning_rate": args.learning_rate}
    for other in ("lora", "adalora"):
        if "alora" not in summary or other not in summary:
            continue
        for prefix, loss in (("", "eval_loss"), ("unseen_", "eval_loss_unseen")):  # all 80 rows; rows not scored on
            line[f"{prefix}eval_loss_ratio_alora_vs_{other}"] = (summary["alora"][f"{loss}_median"]
                                                                 / summary[other][f"{loss}_median"])
            theirs = {r["seed"]: r[loss] for r in rows if r["method"] == other}
            line[f"{prefix}seeds_alora_worse_than_{other}"] = sum(
                r[loss] > theirs[r["seed"]] for r in rows if r["method"] == "alora")
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": f"{os.cpu_count()} CPU cores, no GPU",
                                          "rows": rows, "summary": summary, "headline": line}, indent=1))
    print(json.dumps(line))


if __name__ == "__main__":
    main()

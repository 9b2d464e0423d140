"""Where a fast-scoring round's time goes on the real SmolLM2-135M-Instruct, in training steps.

    python benchmarks/scoring_breakdown.py      # ~3 min on 2 CPU cores

The set-up of ``scoring.py --model smollm2 --in-run`` (r=8 on all 210 linear layers, 32 scoring
examples of 128 tokens, training batch 8 x 128), after 2 training steps: the time of a training
step, of the gradient pass (both first-order terms), of a no-grad pass over the scoring set with
and without the adapter's path, and of exact "without rho" ablations starting in the first and
in the last decoder block. Each item is timed 3 times (median), side by side with training steps.
Writes benchmarks/results/scoring_breakdown.json; the last line is its summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from scoring import RESULTS, smollm2_setup, timed  # noqa: E402

from peft_alora.scoring.common import scoring_loss  # noqa: E402
from peft_alora.scoring.exact import exact_scores  # noqa: E402
from peft_alora.scoring.fast import taylor_terms  # noqa: E402
from peft_alora.scoring.prefix import PrefixCache, decoder_blocks  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = argparse.Namespace(r=8, length=128, batch=8, steps=2 + 2 * args.repeats, lr=1e-3, start=0.1, end=0.4,
                               rounds=6, scoring_examples=32, seed=0)
    model, batches, scoring = smollm2_setup(setup, target_modules="all-linear")
    layers = dict(model.base_model.gated_layers())
    ranks = [(n, s) for n in sorted(layers) for s in layers[n].active_slots("default")]
    blocks, block_of = decoder_blocks(model, layers)
    first = [r for r in ranks if block_of[r[0]] == 0][:1]
    last = [r for r in ranks if block_of[r[0]] == len(blocks) - 1][:1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setup.lr)
    order = iter(batches)

    def train_step():
        model.train()
        model(**next(order)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def no_adapter_pass():
        with model.disable_adapter():
            scoring_loss(model, scoring)

    train_step()
    train_step()  # B off zero; the base-model pass of the first round is cached by this call:
    taylor_terms(model, layers, "default", scoring, ranks)
    model.eval()
    current = PrefixCache.record(model, blocks, scoring)
    items = {
        "gradient pass (both first-order terms)": lambda: taylor_terms(model, layers, "default", scoring, ranks),
        "no-grad pass over the scoring set": lambda: scoring_loss(model, scoring),
        "the same, adapter switched off": no_adapter_pass,
        "exact ablation from block 0": lambda: exact_scores(model, layers, "default", scoring, first,
                                                             parts=("without",), current=current),
        f"exact ablation from block {len(blocks) - 1}": lambda: exact_scores(model, layers, "default", scoring, last,
                                                                            parts=("without",), current=current),
    }
    times = {name: [] for name in items}
    steps = []
    for rep in range(args.repeats):  # a training step before and after each repetition's items
        steps += timed(train_step, 1)[0]
        for name, fn in items.items():
            times[name] += timed(fn, 1)[0]
        steps += timed(train_step, 1)[0]
        print(f"rep {rep}: " + ", ".join(f"{name} {times[name][-1]:.1f}s" for name in items), flush=True)
    step = statistics.median(steps)
    table = {name: {"seconds": statistics.median(t), "training_steps": statistics.median(t) / step}
             for name, t in times.items()}
    for name, row in table.items():
        print(f"{name:45s} {row['seconds']:6.1f} s = {row['training_steps']:5.2f} training steps of {step:.2f} s")
    with_adapter = table["no-grad pass over the scoring set"]["seconds"]
    summary = {"train_step_seconds": step,
               **{name: round(row["training_steps"], 3) for name, row in table.items()},
               "adapter_share_of_a_pass": 1 - table["the same, adapter switched off"]["seconds"] / with_adapter}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scoring_breakdown.json").write_text(json.dumps(
        {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {args.threads}, no GPU",
         "train_steps_seconds": steps, "times": times, "table": table, "summary": summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

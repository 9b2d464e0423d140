"""Fast AB-LoRA scorer against the exact one: time per round and agreement of the decisions.

    python benchmarks/scoring.py --quick          # random-init Llama, 8 layers x 7 types x r=8 = 448 ranks (< 10 min)
    python benchmarks/scoring.py --model smollm2  # the real SmolLM2-135M-Instruct (1,680 ranks), see --help

An allocation run driven by the exact scorer on the offline toy instruction task; at every round
both scorers score the same model state. Per round: wall time of each scorer (median of
--repeats), their Spearman correlation, whether the fast scorer's round plan (pruned ranks and
regrown counts per module) equals the exact one, and the regret: the exact score of the ranks the
fast scorer would prune minus that of the ranks the exact scorer prunes (>= 0, 0 when they agree).
Writes benchmarks/results/scoring_<mode>.json and a scatter PNG; the last output line is one JSON
object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_alora  # noqa: E402
from peft_alora.allocation import plan_round  # noqa: E402
from peft_alora.allocator import RankAllocator  # noqa: E402
from peft_alora.scoring import ScoringSet, distributed_exact_scores, fast_scores, scoring_loss  # noqa: E402
from peft_alora.scoring.common import IGNORE_INDEX  # noqa: E402
from peft_alora.scoring.fast import default_refine  # noqa: E402
from peft_alora.scoring.prefix import PrefixCache, decoder_blocks  # noqa: E402
from peft_alora.toy import toy_llama, toy_pairs, toy_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def collate(tokenizer, pairs, max_length: int = 64) -> dict:
    """Prompt tokens masked out of the loss, completion (and EOS) trained; right padding."""
    rows = []
    for question, answer in pairs:
        prompt = tokenizer(f"Q: {question}\nA:")["input_ids"]
        completion = tokenizer(f" {answer}")["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        rows.append((ids, ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in rows]),
    }


def timed(fn, repeats: int):
    """``(every wall time, last result)`` of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def median_time(fn, repeats: int):
    times, result = timed(fn, repeats)
    return statistics.median(times), result


def spearman(a: dict, b: dict) -> float:
    keys = sorted(a)
    x = torch.tensor([a[k] for k in keys], dtype=torch.float64)
    y = torch.tensor([b[k] for k in keys], dtype=torch.float64)
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def toy_setup(args):
    """The quick model: random-init Llama on the offline toy task, prompt tokens masked."""
    tokenizer = toy_tokenizer()
    model = toy_llama(len(tokenizer), hidden_size=args.hidden, layers=args.layers, seed=args.seed)
    model = get_peft_model(model, alora_config(args, target_modules="all-linear"))
    train = toy_pairs(args.steps * args.batch, seed=args.seed)
    held_out = toy_pairs(args.scoring_examples, seed=10_000 + args.seed)
    batches = [collate(tokenizer, train[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps)]
    size = args.scoring_batch_size
    scoring = ScoringSet([collate(tokenizer, held_out[i:i + size]) for i in range(0, len(held_out), size)])
    return model, batches, scoring


def alora_config(args, **kwargs):
    return peft_alora.ALoRAConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, allocation_start=args.start,
                                  allocation_end=args.end, allocation_rounds=args.rounds, **kwargs)


def chat_example(tokenizer, seed: int, length: int):
    """A multi-turn chat of toy questions in the model's own template, ``length`` tokens, first half untrained."""
    messages = []
    for question, answer in toy_pairs(24, seed=seed):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])[:length]
    return ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2:]


def smollm2_setup(args, **target):
    """The real SmolLM2-135M-Instruct (packaged weights, see peft_alora.models) on chat-formatted toy tasks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_alora.models import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(args.seed)  # the adapter's A rows: without it, every run started from other ones
    model = get_peft_model(base, alora_config(args, **target))

    def batch(seeds):
        rows = [chat_example(tokenizer, seed, args.length) for seed in seeds]
        return {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows])}

    batches = [batch(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.steps)]
    scoring = ScoringSet([batch(range(10_000 + i, 10_000 + i + 8)) for i in range(0, args.scoring_examples, 8)])
    return model, batches, scoring


def exact_driven_run(args, model, batches, scoring, score_round, on_step=None) -> None:
    """Train with the allocator, whose rounds take their scores from ``score_round(allocator)`` (the
    exact scores: the run follows the reference scorer); ``on_step(step)`` before each allocator step."""
    torch.manual_seed(args.seed)
    allocator = RankAllocator(model, scoring, total_steps=args.steps, seed=args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    allocator.score = lambda: score_round(allocator)
    model.train()
    for step in range(1, args.steps + 1):
        model(**batches[step - 1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if on_step:
            on_step(step)
        allocator.step(step, optimizer)


def run(args, model, batches, scoring) -> dict:
    """Every round scores with both scorers; the exact scores decide."""
    rounds = []
    current = {"step": 0}

    def compare_scorers(allocator) -> dict:
        layers, adapter = allocator.layers, allocator.adapter
        active = allocator.active_slots()
        capacity = {name: layer.capacity(adapter) for name, layer in layers.items()}
        ranks = [(name, slot) for name in sorted(active) for slot in active[name]]
        n = allocator.ranks_per_round
        grown = allocator.grown_ranks()
        pass_seconds, _ = median_time(lambda: scoring_loss(model, scoring), args.repeats)
        exact_seconds, exact = median_time(
            lambda: distributed_exact_scores(model, layers, adapter, scoring, ranks), 1)
        row = {"round": allocator.rounds_done + 1, "step": current["step"], "ranks": len(ranks),
               "exact_seconds": exact_seconds, "scoring_pass_seconds": pass_seconds}
        plan_exact = plan_round(exact, active, capacity, n)
        for refine in args.refine:
            times, fast = timed(
                lambda: fast_scores(model, layers, adapter, scoring, ranks, n_prune=n, refine=refine,
                                    grown=grown), args.repeats)
            seconds = statistics.median(times)
            plan_fast = plan_round(fast, active, capacity, n)
            regret = sum(exact[r] for r in plan_fast.pruned) - sum(exact[r] for r in plan_exact.pruned)
            row[f"refine{refine}"] = {
                "seconds": seconds, "all_seconds": times, "pass_equivalents": seconds / pass_seconds,
                "speedup": exact_seconds / seconds, "spearman": spearman(fast, exact),
                "pruned_same": set(plan_fast.pruned) == set(plan_exact.pruned),
                "plan_same": set(plan_fast.pruned) == set(plan_exact.pruned) and plan_fast.grown == plan_exact.grown,
                "regret": regret, "scores": {f"{m}:{s}": fast[(m, s)] for m, s in ranks},
            }
        if "refine0" in row:  # how many ranks each setting re-scored exactly
            first = row["refine0"]["scores"]
            for refine in args.refine:
                scores = row[f"refine{refine}"]["scores"]
                row[f"refine{refine}"]["rescored"] = sum(scores[k] != first[k] for k in scores)
        row["exact_scores"] = {f"{m}:{s}": exact[(m, s)] for m, s in ranks}
        ordered = sorted(exact.values())
        row["exact_threshold_gap"] = ordered[n] - ordered[n - 1] if n < len(ordered) else None
        if row["round"] == args.rounds and args.noise_sample:
            row["bf16_noise"] = bf16_noise(model, layers, adapter, scoring, ranks, exact, args.noise_sample)
        rounds.append(row)
        print(format_row(row, args.refine), flush=True)
        return exact  # the run is driven by the reference scorer

    exact_driven_run(args, model, batches, scoring, compare_scorers, on_step=lambda step: current.update(step=step))
    return {"rounds": rounds}


def bf16_noise(model, layers, adapter, scoring, ranks, exact, sample: int) -> dict:
    """How much the exact scores of a sample of ranks move when the same model runs in bf16."""
    import copy

    low = copy.deepcopy(model).to(torch.bfloat16)
    low_layers = dict(low.base_model.gated_layers(adapter))
    for layer in low_layers.values():  # the gates stay fp32, as in training
        layer.lora_gate[adapter] = layer.lora_gate[adapter].float()
    picked = ranks[:: max(1, len(ranks) // sample)][:sample]
    low_scores = distributed_exact_scores(low, low_layers, adapter, scoring, picked)
    diffs = sorted(abs(low_scores[r] - exact[r]) for r in picked)
    return {"ranks": len(picked), "median_abs": diffs[len(diffs) // 2], "max_abs": diffs[-1]}


def real_costs(args) -> dict:
    """Full SmolLM2 (all linear layers): fast round vs training step, exact round from a sample of ablations."""
    args = argparse.Namespace(**{**vars(args), "r": 8, "length": 128, "batch": 8, "steps": 4})  # the set-up
    model, batches, scoring = smollm2_setup(args, target_modules="all-linear")
    layers = dict(model.base_model.gated_layers())
    ranks = [(n, s) for n in sorted(layers) for s in layers[n].active_slots("default")]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    order = itertools.cycle(batches)

    def train_step():
        model.train()
        model(**next(order)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step()  # warm-up; also moves B off zero
    started = time.perf_counter()
    fast_scores(model, layers, "default", scoring, ranks, n_prune=7, refine=0)  # + the once-per-run base pass
    first_call = time.perf_counter() - started
    # side by side: each repetition times a training step, then a round of every setting, so that the
    # ratios (round / step) compare times taken under the same load
    settings = sorted(set(args.refine) | {0})
    step_times, seconds, rescored = [], {k: [] for k in settings}, {k: [] for k in settings}
    for rep in range(args.repeats):
        step_times.append(timed(train_step, 1)[0][0])
        scores = {}
        for k in settings:
            times, scores[k] = timed(lambda: fast_scores(model, layers, "default", scoring, ranks, n_prune=7,
                                                         refine=k, grown=set()), 1)  # no round has run yet
            seconds[k].append(times[0])
            rescored[k].append(sum(scores[k][r] != scores[0][r] for r in ranks))
        print(f"rep {rep}: training step {step_times[-1]:.1f}s, " + ", ".join(
            f"scoring_refine={k} {seconds[k][-1]:.1f}s ({rescored[k][-1]} re-scored)" for k in settings), flush=True)
    in_steps = {k: statistics.median(t / s for t, s in zip(seconds[k], step_times)) for k in settings}
    step_seconds = statistics.median(step_times)
    refine = args.refine[0]  # the library's default unless told otherwise
    sample = ranks[:: max(1, len(ranks) // args.exact_sample)][: args.exact_sample]
    distributed_exact_scores(model, layers, "default", scoring, sample[:1])  # records the base model's blocks once
    blocks, _ = decoder_blocks(model, layers)
    record_seconds, _ = median_time(lambda: PrefixCache.record(model, blocks, scoring), 1)  # once per round
    around = [timed(train_step, 1)[0][0]]
    started = time.perf_counter()
    distributed_exact_scores(model, layers, "default", scoring, sample)
    per_rank = (time.perf_counter() - started - record_seconds) / len(sample)
    around.append(timed(train_step, 1)[0][0])
    exact_round = record_seconds + per_rank * len(ranks)
    exact_steps = exact_round / statistics.mean(around)
    print(f"exact: {per_rank:.1f}s per rank (2 ablations), round estimated {exact_round:.0f}s = {exact_steps:.0f} "
          f"training steps", flush=True)
    result = {"ranks": len(ranks), "train_step_seconds": step_seconds, "refine": refine,
              "fast_round_seconds": statistics.median(seconds[refine]), "fast_round_in_train_steps": in_steps[refine],
              "first_order_round_seconds": statistics.median(seconds[0]), "first_order_round_in_train_steps": in_steps[0],
              "round_in_train_steps": in_steps, "rescored": rescored, "fast_first_call_seconds": first_call,
              "fast_first_call_in_train_steps": first_call / step_seconds,
              "exact_sampled_ranks": len(sample), "exact_ablations_timed": 2 * len(sample),
              "exact_round_seconds_estimated": exact_round, "exact_round_in_train_steps": exact_steps,
              "speedup": exact_steps / in_steps[refine]}
    print(json.dumps(result), flush=True)
    return result


def real_rounds(args) -> dict:
    """Full SmolLM2 (all linear layers), the default fast scorer driving a real allocation run: per
    round, the scoring time in training steps (against the steps just before it, same load) and how
    many ranks the lazy refinement re-scored exactly."""
    import peft_alora.scoring.fast as fast

    args = argparse.Namespace(**{**vars(args), "r": 8, "length": 128, "batch": 8})  # the set-up
    model, batches, scoring = smollm2_setup(args, target_modules="all-linear")
    rescored, blocks = [], []  # per round: ranks re-scored exactly, and the decoder block of each
    block_of = decoder_blocks(model, dict(model.base_model.gated_layers()))[1]
    exact = fast.distributed_exact_scores

    def counted(model, layers, adapter, scoring, ranks, **kwargs):
        rescored[-1] += len(ranks)
        blocks[-1] += [block_of.get(name) for name, _ in ranks]
        return exact(model, layers, adapter, scoring, ranks, **kwargs)

    fast.distributed_exact_scores = counted
    try:
        torch.manual_seed(args.seed)
        allocator = RankAllocator(model, scoring, total_steps=args.steps, seed=args.seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        step_seconds, rounds = [], []
        for step in range(1, args.steps + 1):
            model.train()
            started = time.perf_counter()
            model(**batches[step - 1]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_seconds.append(time.perf_counter() - started)
            rescored.append(0)
            blocks.append([])
            started = time.perf_counter()
            record = allocator.step(step, optimizer)
            if record is None:
                continue
            recent = statistics.median(step_seconds[-3:])
            rounds.append({"round": record["round"], "step": step, "scoring_seconds": record["scoring_seconds"],
                           "round_seconds": time.perf_counter() - started, "train_step_seconds": recent,
                           "scoring_in_train_steps": record["scoring_seconds"] / recent,
                           "rescored": rescored[-1], "rescored_blocks": blocks[-1]})
            print(f"round {record['round']} (step {step}): scoring {record['scoring_seconds']:.1f}s = "
                  f"{rounds[-1]['scoring_in_train_steps']:.1f} training steps of {recent:.1f}s, "
                  f"{rescored[-1]} ranks re-scored exactly (blocks {blocks[-1]})", flush=True)
            if allocator.rounds_done == len(allocator.schedule):
                break
    finally:
        fast.distributed_exact_scores = exact
    later = rounds[1:]  # the first round also ran the once-per-run pass of the base model
    result = {"ranks": sum(len(slots) for slots in allocator.active_slots().values()),
              "rounds": rounds, "lr": args.lr, "steps": args.steps,
              "scoring_in_train_steps_median": statistics.median(r["scoring_in_train_steps"] for r in later),
              "rescored_mean": statistics.mean(r["rescored"] for r in rounds)}
    print(json.dumps(result), flush=True)
    return result


def format_row(row, refines) -> str:
    parts = [f"round {row['round']} (step {row['step']}, {row['ranks']} ranks): exact {row['exact_seconds']:.1f}s"]
    for refine in refines:
        r = row[f"refine{refine}"]
        parts.append(f"fast/refine={refine} {r['seconds']:.2f}s x{r['speedup']:.0f} rho={r['spearman']:.3f} "
                     f"pruned_same={r['pruned_same']} plan_same={r['plan_same']} regret={r['regret']:.2e}"
                     + (f" re-scored={r['rescored']}" if "rescored" in r else ""))
    return " | ".join(parts)


def summarise(result, refines) -> dict:
    rounds = result["rounds"]
    summary = {"rounds": len(rounds), "exact_seconds_median": statistics.median(r["exact_seconds"] for r in rounds),
               # the very first fast call also ran the once-per-run pass of the base model
               "fast_first_call_seconds": rounds[0][f"refine{refines[0]}"]["all_seconds"][0]}
    for refine in refines:
        rows = [r[f"refine{refine}"] for r in rounds]
        summary[f"refine{refine}"] = {
            "seconds_median": statistics.median(r["seconds"] for r in rows),
            "speedup": statistics.median(r["speedup"] for r in rows),
            "pass_equivalents": statistics.median(r["pass_equivalents"] for r in rows),
            "spearman_median": statistics.median(r["spearman"] for r in rows),
            "pruned_set_agreement": sum(r["pruned_same"] for r in rows) / len(rows),
            "plan_agreement": sum(r["plan_same"] for r in rows) / len(rows),
            "regret_max": max(r["regret"] for r in rows),
        }
        if all("rescored" in r for r in rows):
            summary[f"refine{refine}"]["rescored_mean"] = statistics.mean(r["rescored"] for r in rows)
    noise = rounds[-1].get("bf16_noise")
    if noise:
        summary["bf16_vs_fp32_score_noise"] = noise
    return summary


def scatter(result, refine, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for row in result["rounds"]:
        exact = row["exact_scores"]
        fast = row[f"refine{refine}"]["scores"]
        keys = sorted(exact)
        ax.scatter([exact[k] for k in keys], [fast[k] for k in keys], s=4, label=f"round {row['round']}")
    ax.set_xlabel("exact AB-LoRA score")
    ax.set_ylabel(f"fast score (refine={refine})")
    ax.set_title("fast vs exact scores, every round")
    ax.legend(fontsize=6, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 448-rank random-init Llama (the default)")
    parser.add_argument("--model", choices=["toy", "smollm2"], default="toy")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="smollm2: tokens per example")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rounds", type=int, default=8)
    step_or_fraction = lambda v: int(v) if v.isdigit() else float(v)  # noqa: E731
    parser.add_argument("--start", type=step_or_fraction, default=0.1)
    parser.add_argument("--end", type=step_or_fraction, default=0.4)
    parser.add_argument("--scoring-examples", type=int, default=32)
    parser.add_argument("--scoring-batch-size", type=int, default=32, help="toy: examples per scoring micro-batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--refine", type=int, nargs="+", default=None,
                        help="scoring_refine settings compared; the first one is reported in the last line "
                             "(default: the library's default, then first order alone)")
    parser.add_argument("--exact-sample", type=int, default=25, help="smollm2: ranks timed exactly (2 ablations each)")
    parser.add_argument("--subset-layers", type=int, nargs="+", default=[0, 15, 29],
                        help="smollm2 agreement run: adapt all 7 types in these layers only")
    parser.add_argument("--skip-costs", action="store_true", help="smollm2: only the agreement run")
    parser.add_argument("--skip-agreement", action="store_true", help="smollm2: only the cost measurements")
    parser.add_argument("--in-run", action="store_true",
                        help="smollm2: time the default scorer's rounds inside a real allocation run (--steps, "
                             "--rounds, --start, --end, --lr) instead of the other measurements")
    parser.add_argument("--noise-sample", type=int, default=24,
                        help="ranks whose exact score is also taken in bf16 in the last round (0: none)")
    parser.add_argument("--out", default=None, help="result file (default results/scoring_<mode>.json; the scatter PNG "
                                                    "goes beside it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.refine is None:
        args.refine = [default_refine(7), 0]  # the library's default for 7 module types (7 pruned per round)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU",
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    if args.model == "smollm2" and args.in_run:
        out["in_run"] = real_rounds(args)
        Path(args.out or RESULTS / "scoring_smollm2_in_run.json").write_text(json.dumps(out, indent=1))
        return
    if args.model == "smollm2":
        if not args.skip_costs:
            out["costs"] = real_costs(args)
        if args.skip_agreement:
            Path(args.out or RESULTS / "scoring_smollm2_costs.json").write_text(json.dumps(out, indent=1))
            print(json.dumps(out["costs"]))
            return
        setup = smollm2_setup(args, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"], layers_to_transform=args.subset_layers)
    else:
        setup = toy_setup(args)
    result = run(args, *setup)
    summary = summarise(result, args.refine)
    name = "quick" if args.model == "toy" else args.model
    path = Path(args.out or RESULTS / f"scoring_{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**out, "summary": summary, **result}, indent=1))
    scatter(result, args.refine[0], path.with_suffix(".png"))
    for refine in args.refine:
        s = summary[f"refine{refine}"]
        print(f"fast refine={refine}: speedup x{s['speedup']:.1f} (median), {s['pass_equivalents']:.1f} scoring-pass "
              f"equivalents, spearman {s['spearman_median']:.3f}, pruned-set agreement {s['pruned_set_agreement']:.2f}, "
              f"plan agreement {s['plan_agreement']:.2f}, worst regret {s['regret_max']:.2e}")
    if "bf16_vs_fp32_score_noise" in summary:
        noise = summary["bf16_vs_fp32_score_noise"]
        print(f"exact scores, bf16 vs fp32 weights ({noise['ranks']} ranks, last round): median |diff| "
              f"{noise['median_abs']:.2e}, max {noise['max_abs']:.2e}")
    # the first --refine setting (by default the library's default), then each other one
    default = summary[f"refine{args.refine[0]}"]
    line = {"speedup": default["speedup"], "pruned_set_agreement": default["pruned_set_agreement"],
            "plan_agreement": default["plan_agreement"], "regret_max": default["regret_max"],
            "refine": args.refine[0]}
    for refine in args.refine[1:]:
        other = summary[f"refine{refine}"]
        line.update({f"refine{refine}_speedup": other["speedup"],
                     f"refine{refine}_pruned_set_agreement": other["pruned_set_agreement"],
                     f"refine{refine}_regret_max": other["regret_max"]})
    if "bf16_vs_fp32_score_noise" in summary:
        line["bf16_score_noise_max"] = summary["bf16_vs_fp32_score_noise"]["max_abs"]
    if "costs" in out:
        line["real_fast_round_in_train_steps"] = out["costs"]["fast_round_in_train_steps"]
        line["real_speedup"] = out["costs"]["speedup"]
    print(json.dumps(line))


if __name__ == "__main__":
    main()

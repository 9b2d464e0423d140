"""Which ranks the fast scorer must re-score exactly: both AB-LoRA terms, exact and first order, per rank.

    python benchmarks/refinement.py --seeds 0 1      # the quick model of scoring.py, ~10 min per seed

The quick run of ``benchmarks/scoring.py`` (448 ranks, 8 rounds, driven by the exact scorer); at
every round it logs, for every active rank, CE(without rho) and CE(only rho) exactly and to first
order. From these it computes, for each number k of re-scored ranks (the k lowest first-order
scores get their exact "without" term, or both exact terms), in how many rounds the plan's pruned
set equals the exact scorer's, and the worst regret; and the same for the lazy refinement the
library uses (``refine_lazily``: stop once the pruned set is settled), with its bound scaled by
each rank's size or not, and told or not which ranks earlier rounds grew (the library's default is
told: it then settles ranks of the first allocation far from the threshold without re-scoring
them). Also a cheaper refinement, rejected: the exact "without" pass run on the
first k examples only (``SAMPLES``), its gap to first order on those examples added to the
first-order estimate of the whole set (or the sample's loss change taken as it is).
Writes benchmarks/results/refinement.json;
the last line is one JSON object {k: rounds agreeing} for the "without"-only refinement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from scoring import RESULTS, exact_driven_run, toy_setup  # noqa: E402

from peft_alora.scoring.common import ScoringSet  # noqa: E402
from peft_alora.scoring.exact import exact_scores  # noqa: E402
from peft_alora.scoring.fast import rank_sizes, refine_lazily, taylor_terms  # noqa: E402

N_PRUNE = 7  # one per module type
SAMPLES = (8, 16)  # examples of the 32 on which the sampled refinement runs its exact passes


def logged_run(seed: int) -> list[dict]:
    """Per round: the loss, the base loss and [exact without, exact only, first-order removal, first-order alone,
    size] per rank (size: ``rank_sizes``, the scale of the lazy refinement's bound)."""
    args = argparse.Namespace(layers=8, hidden=256, r=8, steps=120, batch=16, lr=2e-3, rounds=8, start=0.1, end=0.4,
                              scoring_examples=32, scoring_batch_size=32, seed=seed)
    model, batches, scoring = toy_setup(args)
    head = {k: ScoringSet([{key: v[:k] for key, v in scoring.batches[0].items()}]) for k in SAMPLES}
    rounds = []

    def score(allocator):
        layers, adapter = allocator.layers, allocator.adapter
        active = allocator.active_slots()
        ranks = [(n, s) for n in sorted(active) for s in active[n]]
        without = exact_scores(model, layers, adapter, scoring, ranks, parts=("without",))
        only = exact_scores(model, layers, adapter, scoring, ranks, parts=("only",))
        terms = taylor_terms(model, layers, adapter, scoring, ranks)
        sizes = rank_sizes(layers, adapter, ranks)
        rounds.append({"loss": terms.loss, "base_loss": terms.base_loss,
                       "grown": sorted(f"{m}:{s}" for m, s in allocator.grown_ranks()), "ranks": {
            f"{m}:{s}": [without[(m, s)], only[(m, s)], terms.removal[(m, s)], terms.alone[(m, s)], sizes[(m, s)]]
            for m, s in ranks}, "sampled": {}})
        for k, sample in head.items():  # the first k examples: loss, and per rank [exact without, first-order removal]
            part = taylor_terms(model, layers, adapter, sample, ranks)
            cut = exact_scores(model, layers, adapter, sample, ranks, parts=("without",))
            rounds[-1]["sampled"][str(k)] = {"loss": part.loss, "ranks": {f"{m}:{s}": [cut[(m, s)], part.removal[(m, s)]]
                                                                    for m, s in ranks}}
        print(f"seed {seed} round {len(rounds)} logged", flush=True)
        return {r: without[r] - only[r] for r in ranks}

    exact_driven_run(args, model, batches, scoring, score)
    return rounds


def _lowest(scores: dict, k: int = N_PRUNE) -> list:
    return sorted(scores, key=lambda r: (scores[r], r))[:k]


def _round_scores(row: dict) -> tuple[dict, dict, dict]:
    """A logged round's ``(exact scores, first-order scores, scores with the exact "without" term)``."""
    loss, base, terms = row["loss"], row["base_loss"], row["ranks"]
    exact = {r: t[0] - t[1] for r, t in terms.items()}
    first = {r: (loss + t[2]) - (base + t[3]) for r, t in terms.items()}
    refined = {r: t[0] - (base + t[3]) for r, t in terms.items()}
    return exact, first, refined


def agreement(rounds: list[dict], k: int, both: bool) -> tuple[int, float]:
    """``(rounds whose pruned set equals the exact one, worst regret)`` when the k lowest are re-scored."""
    agree, worst = 0, 0.0
    for row in rounds:
        exact, first, refined = _round_scores(row)
        scores = dict(first)
        for r in _lowest(first, k):
            scores[r] = exact[r] if both else refined[r]
        pruned, reference = _lowest(scores), _lowest(exact)
        agree += set(pruned) == set(reference)
        worst = max(worst, sum(exact[r] for r in pruned) - sum(exact[r] for r in reference))
    return agree, worst


def lazy_agreement(rounds: list[dict], limit: int, scaled: bool, grown: bool = False) -> tuple[int, list[int]]:
    """``(rounds whose pruned set equals the exact one, ranks re-scored per round)`` with the library's
    ``refine_lazily`` fed the logged exact "without" terms; ``scaled=False``: one bound for all ranks;
    ``grown``: it is told which ranks earlier rounds grew, so it may settle others without re-scoring them."""
    agree, counts = 0, []
    for row in rounds:
        exact, scores, refined = _round_scores(row)
        chosen = refine_lazily(scores, N_PRUNE, limit, lambda ranks: {r: refined[r] for r in ranks},
                               sizes={r: t[4] for r, t in row["ranks"].items()} if scaled else None,
                               grown=set(row["grown"]) if grown else None)
        scores.update(chosen)
        counts.append(len(chosen))
        agree += set(_lowest(scores)) == set(_lowest(exact))
    return agree, counts


def sampled_agreement(rounds: list[dict], k: int, corrected: bool) -> tuple[int, float, list[int]]:
    """Lazy refinement whose exact passes see only the first ``k`` examples: ``(rounds agreeing, worst
    regret, ranks re-scored per round)``. ``corrected``: CE(without rho) ~ loss + first-order removal +
    (the sample's exact removal - its first-order removal); else loss + the sample's exact removal."""
    agree, worst, counts = 0, 0.0, []
    for row in rounds:
        exact, scores, _ = _round_scores(row)
        loss, base, terms, sample = row["loss"], row["base_loss"], row["ranks"], row["sampled"][str(k)]

        def without(r):
            cut, removal = sample["ranks"][r]
            change = cut - sample["loss"]
            return loss + (terms[r][2] + change - removal if corrected else change)

        chosen = refine_lazily(scores, N_PRUNE, 2 * N_PRUNE,
                               lambda ranks: {r: without(r) - (base + terms[r][3]) for r in ranks},
                               sizes={r: t[4] for r, t in terms.items()})
        scores.update(chosen)
        counts.append(len(chosen))
        pruned, reference = _lowest(scores), _lowest(exact)
        agree += set(pruned) == set(reference)
        worst = max(worst, sum(exact[r] for r in pruned) - sum(exact[r] for r in reference))
    return agree, worst, counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--k", type=int, nargs="+", default=[0, 4, 7, 9, 12, 14, 16])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = [row for seed in args.seeds for row in logged_run(seed)]
    table = {}
    print(f"{len(rounds)} rounds; pruned set = exact's when the k lowest first-order scores are re-scored")
    print(f"{'k':>3} {'without only':>14} {'regret':>9} {'both terms':>12} {'regret':>9}")
    for k in args.k:
        (a, ra), (b, rb) = agreement(rounds, k, both=False), agreement(rounds, k, both=True)
        table[k] = {"without_only": a, "without_only_regret": ra, "both": b, "both_regret": rb}
        print(f"{k:>3} {a:>11}/{len(rounds)} {ra:9.1e} {b:>9}/{len(rounds)} {rb:9.1e}")
    lazy = {}
    variants = {"size-scaled, grown ranks known (default)": (True, True), "size-scaled": (True, False),
                "one bound": (False, False)}
    for name, (scaled, grown) in variants.items():
        agree, counts = lazy_agreement(rounds, 2 * N_PRUNE, scaled, grown)
        lazy[name] = {"agree": agree, "rescored": counts}
        print(f"lazy refinement (at most {2 * N_PRUNE}), {name}: "
              f"{agree}/{len(rounds)} rounds agree, {sum(counts) / len(counts):.1f} ranks re-scored on average "
              f"({min(counts)}-{max(counts)})")
    sampled = {}
    for k in SAMPLES:
        for corrected in (True, False):
            agree, worst, counts = sampled_agreement(rounds, k, corrected)
            name = f"{k} examples, {'gap to first order' if corrected else 'loss change as measured'}"
            sampled[name] = {"agree": agree, "regret_max": worst, "rescored": counts}
            print(f"lazy refinement, exact passes on the first {name}: {agree}/{len(rounds)} rounds agree, worst "
                  f"regret {worst:.1e}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "refinement.json").write_text(json.dumps({"seeds": args.seeds, "rounds": len(rounds),
                                                         "table": table, "lazy": lazy, "sampled": sampled,
                                                         "logged": rounds}))
    print(json.dumps({str(k): v["without_only"] for k, v in table.items()}))


if __name__ == "__main__":
    main()

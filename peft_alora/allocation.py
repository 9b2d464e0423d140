"""Rank allocation decisions for ALoRA (docs/algorithm.md §2, §4, §5).

Pure Python: no torch, no modules. A rank is named by ``(module_name, slot)``,
where ``slot`` is its index in the module's LoRA matrices. The caller scores the
active ranks, asks for a :class:`RoundPlan`, and applies it to the model.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Set, Tuple

Rank = Tuple[str, int]

__all__ = [
    "Rank",
    "RoundPlan",
    "ScheduleError",
    "select_pruned",
    "plan_regrowth",
    "mean_scores_by_module",
    "plan_round",
    "resolve_steps",
    "schedule_steps",
]


class ScheduleError(ValueError):
    """The rounds do not fit the run's optimizer steps (a setting to change, not a bug)."""


def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return int(n)


def _check_finite(value, label: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"importance score of {label} is not finite ({value})")
    return value


def select_pruned(scores: Mapping[Rank, float], n: int) -> List[Rank]:
    """Return the ``n`` lowest-scoring ranks, across all modules.

    Ranks are ordered by (score, module name, slot), so equal scores give the
    same answer on every run and every process. If ``n`` exceeds the number of
    ranks, all ranks are returned. Raises ValueError for ``n < 0`` or a
    non-finite score.
    """
    n = _check_count(n, "n (ranks to prune)")
    keyed = []
    for (module, slot), score in scores.items():
        keyed.append((_check_finite(score, f"rank ({module!r}, {slot})"), module, slot))
    keyed.sort()
    return [(module, slot) for _, module, slot in keyed[:n]]


def mean_scores_by_module(scores: Mapping[Rank, float]) -> Dict[str, float]:
    """Mean score per module over the ranks present in ``scores``.

    Modules with no scored rank do not appear in the result.
    """
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for (module, slot), score in scores.items():
        sums[module] = sums.get(module, 0.0) + _check_finite(score, f"rank ({module!r}, {slot})")
        counts[module] = counts.get(module, 0) + 1
    return {module: sums[module] / counts[module] for module in sums}


def plan_regrowth(
    active: Mapping[str, int],
    capacity: Mapping[str, int],
    pruned_modules: Set[str],
    mean_scores: Mapping[str, float],
    n: int,
) -> Dict[str, int]:
    """Decide how many freed ranks each module receives (docs/algorithm.md §5).

    ``active`` is the active-rank count per module after this round's pruning.
    Candidates are the modules of ``active`` that lost no rank this round
    (not in ``pruned_modules``) and have room (``active < capacity``).

    Candidates are ordered by the mean score of their active ranks, highest
    first, ties by module name. A candidate without an entry in
    ``mean_scores`` (a module at rank 0 has no score) comes after every scored
    candidate, in name order.

    Ranks are dealt one at a time, round-robin over that order, skipping a
    module once it is full. This spreads them evenly, gives the remainder to
    the best-scoring candidates, and passes a full module's share on to the
    next one. When no candidate has room, fewer than ``n`` ranks are handed out.

    Returns ``{module: count}`` for the modules that receive at least one rank.
    """
    n = _check_count(n, "n (ranks to regrow)")
    room: Dict[str, int] = {}
    for module, count in active.items():
        if module not in capacity:
            raise ValueError(f"no capacity given for module {module!r}")
        if module in pruned_modules:
            continue
        free = int(capacity[module]) - int(count)
        if free > 0:
            room[module] = free

    scored = []
    unscored = []
    for module in room:
        if module in mean_scores:
            mean = _check_finite(mean_scores[module], f"module {module!r} (mean)")
            scored.append((-mean, module))
        else:
            unscored.append(module)
    order = [module for _, module in sorted(scored)] + sorted(unscored)

    grown: Dict[str, int] = {}
    left = n
    while left > 0 and order:
        for module in order[:left]:
            grown[module] = grown.get(module, 0) + 1
            room[module] -= 1
        left -= min(left, len(order))
        order = [module for module in order if room[module] > 0]
    return grown


@dataclass(frozen=True)
class RoundPlan:
    """What one allocation round does.

    ``pruned``: ranks to switch off, lowest score first.
    ``grown``: number of fresh ranks to add per module.
    """

    pruned: List[Rank] = field(default_factory=list)
    grown: Dict[str, int] = field(default_factory=dict)

    @property
    def n_pruned(self) -> int:
        return len(self.pruned)

    @property
    def n_grown(self) -> int:
        return sum(self.grown.values())

    @property
    def pruned_modules(self) -> Set[str]:
        return {module for module, _ in self.pruned}


def plan_round(
    scores: Mapping[Rank, float],
    active_slots: Mapping[str, Sequence[int]],
    capacity: Mapping[str, int],
    n: int,
) -> RoundPlan:
    """Plan one round: prune the ``n`` lowest ranks globally, then regrow.

    ``scores`` must hold exactly one score per active rank listed in
    ``active_slots`` (module -> active slot indices). Mean scores used to order
    the regrowth candidates come from the ranks that stay active.
    """
    n = _check_count(n, "n (ranks per round)")
    active_ranks = {(module, int(slot)) for module, slots in active_slots.items() for slot in slots}
    scored_ranks = set(scores)
    missing = sorted(active_ranks - scored_ranks)
    extra = sorted(scored_ranks - active_ranks)
    if missing:
        raise ValueError(f"active ranks without a score: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"scores given for ranks that are not active: {extra[:5]}{' ...' if len(extra) > 5 else ''}")

    pruned = select_pruned(scores, n)
    pruned_set = set(pruned)
    pruned_modules = {module for module, _ in pruned}

    active_after = {
        module: sum(1 for slot in slots if (module, int(slot)) not in pruned_set)
        for module, slots in active_slots.items()
    }
    remaining_scores = {rank: score for rank, score in scores.items() if rank not in pruned_set}
    grown = plan_regrowth(
        active_after,
        capacity,
        pruned_modules,
        mean_scores_by_module(remaining_scores),
        len(pruned),
    )
    return RoundPlan(pruned=pruned, grown=grown)


def resolve_steps(value, total_steps: int, name: str) -> int:
    """Turn a schedule setting into a number of optimizer steps.

    ``value`` is either an int (a step count, >= 0) or a float in (0, 1] (a
    fraction of ``total_steps``, rounded half up, at least 1 step). bools and
    other types are rejected with a ValueError that names the setting.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be an int (optimizer steps) or a float in (0, 1] "
            f"(fraction of total steps), got {value!r}"
        )
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 optimizer steps, got {value}")
        return int(value)
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"{name}={value!r} is read as a fraction of total steps and must be in (0, 1]; "
            f"pass an int for a number of optimizer steps"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(
            f"{name} is given as a fraction ({value}) but the total number of training steps "
            f"is unknown or invalid ({total_steps!r}); pass {name} as an int number of steps"
        )
    return max(1, int(math.floor(value * int(total_steps) + 0.5)))


def schedule_steps(
    start: int,
    interval: int,
    rounds: int,
    total_steps: int,
    *,
    start_name: str = "start",
    interval_name: str = "interval",
    rounds_name: str = "rounds",
) -> List[int]:
    """Optimizer steps after which the allocation rounds run.

    Returns ``[start, start + interval, ..., start + (rounds - 1) * interval]``.
    The last round must leave training after it (be < ``total_steps``).
    The ``*_name`` arguments let the caller name its own config fields in
    error messages.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"{rounds_name} must be an int >= 1, got {rounds!r}")
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"{start_name} must be an int >= 0 optimizer steps, got {start!r}")
    if rounds > 1 and (isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1):
        raise ValueError(
            f"{interval_name} must be an int >= 1 when {rounds_name} > 1, got {interval!r}"
        )
    steps = [int(start) + i * int(interval) for i in range(int(rounds))] if rounds > 1 else [int(start)]
    if steps[-1] >= total_steps:
        raise ScheduleError(
            f"allocation round {len(steps)} would run after step {steps[-1]}, but training has only "
            f"{total_steps} steps, leaving none after it; lower {start_name} ({start}), "
            f"{interval_name} ({interval}) or {rounds_name} ({rounds}), or train for longer"
        )
    return steps

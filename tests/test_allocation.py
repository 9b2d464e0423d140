import math

import pytest

from peft_alora.allocation import (
    RoundPlan,
    mean_scores_by_module,
    plan_regrowth,
    plan_round,
    resolve_steps,
    schedule_steps,
    select_pruned,
)


# --- select_pruned -----------------------------------------------------------


def test_select_pruned_takes_lowest_across_modules():
    scores = {("a", 0): 0.5, ("a", 1): 0.1, ("b", 0): 0.3, ("b", 1): 0.9, ("c", 0): -0.2}
    assert select_pruned(scores, 3) == [("c", 0), ("a", 1), ("b", 0)]


def test_select_pruned_ties_are_deterministic():
    scores = {("b", 1): 1.0, ("a", 2): 1.0, ("c", 0): 0.5, ("a", 0): 1.0}
    expected = [("c", 0), ("a", 0), ("a", 2)]
    assert select_pruned(scores, 3) == expected
    assert select_pruned(dict(reversed(list(scores.items()))), 3) == expected


def test_select_pruned_edge_counts():
    scores = {("b", 0): 2.0, ("a", 0): 1.0}
    assert select_pruned(scores, 0) == []
    assert select_pruned(scores, 5) == [("a", 0), ("b", 0)]
    assert select_pruned({}, 3) == []
    with pytest.raises(ValueError):
        select_pruned(scores, -1)


def test_select_pruned_rejects_nan_and_names_rank():
    with pytest.raises(ValueError, match=r"\('b', 1\)"):
        select_pruned({("a", 0): 1.0, ("b", 1): math.nan}, 1)


def test_mean_scores_by_module():
    scores = {("a", 0): 1.0, ("a", 3): 2.0, ("b", 1): -1.0}
    assert mean_scores_by_module(scores) == {"a": 1.5, "b": -1.0}


# --- plan_regrowth -----------------------------------------------------------


def test_regrowth_even_spread_remainder_to_highest_mean_and_pruned_excluded():
    active = {"a": 4, "b": 4, "c": 4, "d": 4}
    capacity = dict.fromkeys(active, 16)
    means = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.9}
    # d has the best mean but lost a rank: not a candidate. Order b, c, a; 7 = 2*3 + 1.
    assert plan_regrowth(active, capacity, {"d"}, means, 7) == {"b": 3, "c": 2, "a": 2}


def test_regrowth_more_candidates_than_ranks():
    active = {"a": 4, "b": 4, "c": 4}
    capacity = dict.fromkeys(active, 16)
    means = {"a": 0.1, "b": 0.5, "c": 0.3}
    assert plan_regrowth(active, capacity, set(), means, 2) == {"b": 1, "c": 1}


def test_regrowth_capacity_overflow_passes_to_next():
    active = {"a": 7, "b": 5, "c": 6}
    capacity = dict.fromkeys(active, 8)
    means = {"a": 0.9, "b": 0.5, "c": 0.1}
    # room: a 1, b 3, c 2 -> a fills after one, the rest go to b and c.
    assert plan_regrowth(active, capacity, set(), means, 6) == {"a": 1, "b": 3, "c": 2}


def test_regrowth_no_room_returns_fewer():
    capacity = {"a": 8, "b": 8, "c": 8}
    means = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert plan_regrowth({"a": 8, "b": 8, "c": 3}, capacity, {"c"}, means, 2) == {}
    assert plan_regrowth({"a": 7, "b": 8, "c": 3}, capacity, {"c"}, means, 3) == {"a": 1}


def test_regrowth_rank0_module_comes_after_scored_ones():
    active = {"a": 0, "b": 4, "c": 4}
    capacity = dict.fromkeys(active, 8)
    means = {"b": -5.0, "c": 0.2}  # "a" has no active rank, hence no mean
    assert plan_regrowth(active, capacity, set(), means, 2) == {"c": 1, "b": 1}
    assert plan_regrowth(active, capacity, set(), means, 5) == {"c": 2, "b": 2, "a": 1}


def test_regrowth_bad_inputs():
    with pytest.raises(ValueError):
        plan_regrowth({"a": 1}, {"a": 2}, set(), {"a": 0.0}, -1)
    with pytest.raises(ValueError, match="capacity"):
        plan_regrowth({"a": 1}, {}, set(), {"a": 0.0}, 1)


# --- plan_round --------------------------------------------------------------


def _round_inputs():
    active_slots = {"m1": [0, 1], "m2": [0, 1, 2], "m3": [0, 1], "m4": [0]}
    scores = {
        ("m1", 0): 0.1, ("m1", 1): 0.9,
        ("m2", 0): 0.05, ("m2", 1): 0.07, ("m2", 2): 0.7,
        ("m3", 0): 0.5, ("m3", 1): 0.6,
        ("m4", 0): 0.8,
    }
    capacity = {"m1": 4, "m2": 4, "m3": 4, "m4": 2}
    return scores, active_slots, capacity


def test_plan_round_prunes_then_regrows():
    scores, active_slots, capacity = _round_inputs()
    plan = plan_round(scores, active_slots, capacity, 3)
    assert isinstance(plan, RoundPlan)
    assert plan.pruned == [("m2", 0), ("m2", 1), ("m1", 0)]
    # candidates m4 (mean 0.8, room 1) then m3 (mean 0.55, room 2)
    assert plan.grown == {"m4": 1, "m3": 2}
    assert (plan.n_pruned, plan.n_grown) == (3, 3)
    assert plan.pruned_modules == {"m1", "m2"}


def test_plan_round_total_ends_below_budget_when_no_room():
    scores, active_slots, capacity = _round_inputs()
    capacity = {"m1": 4, "m2": 4, "m3": 2, "m4": 1}  # m3, m4 already full
    plan = plan_round(scores, active_slots, capacity, 3)
    assert plan.grown == {}
    assert (plan.n_pruned, plan.n_grown) == (3, 0)


def test_plan_round_checks_scores_match_active_ranks():
    scores, active_slots, capacity = _round_inputs()
    missing = dict(scores)
    del missing[("m3", 1)]
    with pytest.raises(ValueError, match="without a score"):
        plan_round(missing, active_slots, capacity, 1)
    extra = dict(scores)
    extra[("m4", 1)] = 0.0
    with pytest.raises(ValueError, match="not active"):
        plan_round(extra, active_slots, capacity, 1)


# --- resolve_steps / schedule_steps -------------------------------------------


def test_resolve_steps_ints_and_fractions():
    assert resolve_steps(100, 1000, "k1") == 100
    assert resolve_steps(0, 1000, "k1") == 0
    assert resolve_steps(0.25, 1000, "k1") == 250
    assert resolve_steps(1.0, 1000, "k1") == 1000
    assert resolve_steps(0.0001, 1000, "k1") == 1  # at least one step
    assert resolve_steps(0.125, 20, "k1") == 3  # 2.5 rounds half up


@pytest.mark.parametrize("bad", [0.0, 1.5, -1, True, "x", None, math.nan])
def test_resolve_steps_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="alora_start"):
        resolve_steps(bad, 1000, "alora_start")


def test_schedule_steps_fits():
    assert schedule_steps(100, 50, 3, 1000) == [100, 150, 200]
    assert schedule_steps(900, 50, 2, 1000) == [900, 950]
    assert schedule_steps(10, 0, 1, 1000) == [10]


def test_schedule_steps_does_not_fit():
    with pytest.raises(ValueError, match="interval"):
        schedule_steps(900, 50, 3, 1000)  # last round at step 1000
    with pytest.raises(ValueError, match="my_start"):
        schedule_steps(1000, 10, 1, 1000, start_name="my_start")
    with pytest.raises(ValueError, match="rounds"):
        schedule_steps(100, 50, 0, 1000)
    with pytest.raises(ValueError, match="interval"):
        schedule_steps(100, 0, 2, 1000)

"""The fast (first-order) AB-LoRA scorer against the exact reference on small models."""

import pytest
import torch
from peft import get_peft_model

import peft_alora
from peft_alora.allocation import plan_round
from peft_alora.allocator import RankAllocator
from peft_alora.scoring import ScoringSet, exact_scores, fast_scores, scoring_loss
from peft_alora.scoring.exact import GateEditor
from peft_alora.scoring.fast import default_refine, refine_lazily, taylor_terms
from conftest import make_tiny_llama, random_batch
from test_scoring import _scoring_set

TARGETS = ["q_proj", "v_proj", "down_proj", "up_proj"]


def _model(b_scales, seed=1):
    """Ranks whose B columns have the given sizes (cycled), so their importance is spread out."""
    config = peft_alora.ALoRAConfig(r=3, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False,
                                    lora_dropout=0.0)
    model = get_peft_model(make_tiny_llama(seed=seed), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(sorted(model.base_model.gated_layers())):
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
            for slot in range(weight.shape[1]):
                weight[:, slot] *= b_scales[(i * weight.shape[1] + slot) % len(b_scales)]
    return model


def _ranks(model):
    layers = dict(model.base_model.gated_layers())
    return layers, [(n, s) for n in sorted(layers) for s in layers[n].active_slots("default")]


def test_taylor_terms_are_the_first_order_changes_of_both_ablations(torch_single_thread):
    model = _model([2e-3])  # small ranks: first order is nearly exact
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    terms = taylor_terms(model, layers, "default", scoring, ranks)
    editor = GateEditor(layers, "default")
    assert terms.loss == pytest.approx(scoring_loss(model, scoring), abs=1e-6)
    editor.only(None)
    assert terms.base_loss == pytest.approx(scoring_loss(model, scoring), abs=1e-6)
    editor.restore()
    for rank in ranks[::3]:
        editor.restore()
        editor.gate(rank[0])[rank[1]] = 0.0
        removal = scoring_loss(model, scoring) - terms.loss
        editor.only(rank)
        alone = scoring_loss(model, scoring) - terms.base_loss
        assert terms.removal[rank] == pytest.approx(removal, rel=0.05, abs=2e-6), rank
        assert terms.alone[rank] == pytest.approx(alone, rel=0.05, abs=2e-6), rank
    editor.restore()
    assert max(abs(v) for v in terms.alone.values()) > 1e-4  # the check above is not vacuous


def test_fast_plans_equal_exact_plans_when_scores_are_well_separated(torch_single_thread):
    model = _model([1e-3, 3e-3, 1e-2, 3e-2])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    exact = exact_scores(model, layers, "default", scoring, ranks)
    fast = fast_scores(model, layers, "default", scoring, ranks, refine=0)
    active = {name: layer.active_slots("default") for name, layer in layers.items()}
    capacity = {name: layer.capacity("default") for name, layer in layers.items()}
    error = max(abs(fast[r] - exact[r]) for r in ranks)
    ordered = sorted(exact.values())
    for n in (2, 4, 6):
        if ordered[n] - ordered[n - 1] <= 2 * error:
            continue  # a near-tie at this threshold: not a separated case
        assert plan_round(fast, active, capacity, n) == plan_round(exact, active, capacity, n), n
    assert error < 1e-3
    assert any(ordered[n] - ordered[n - 1] > 2 * error for n in (2, 4, 6))  # at least one case was checked


def test_refinement_rescores_ranks_exactly_and_prunes_as_if_all_were(torch_single_thread):
    model = _model([1e-3, 3e-2, 1e-1])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    terms = taylor_terms(model, layers, "default", scoring, ranks)
    first_order = terms.scores()
    without = exact_scores(model, layers, "default", scoring, ranks, parts=("without",))
    refined = fast_scores(model, layers, "default", scoring, ranks, n_prune=3, refine=6)
    changed = [r for r in ranks if refined[r] != first_order[r]]
    assert 3 <= len(changed) <= 6
    for rank in changed:  # bit for bit: the exact "without" term, the first-order "only" term
        assert refined[rank] == without[rank] - (terms.base_loss + terms.alone[rank])
    everywhere = {r: without[r] - (terms.base_loss + terms.alone[r]) for r in ranks}  # every rank re-scored
    lowest = lambda scores: set(sorted(scores, key=lambda r: (scores[r], r))[:3])  # noqa: E731
    assert lowest(refined) == lowest(everywhere)


def test_refinement_records_the_current_blocks_once_per_round_under_several_processes(torch_single_thread,
                                                                                      monkeypatch):
    """Under DDP the gradient pass sees a share of the scoring batches, so the block outputs the exact
    passes start from are recorded afterwards: once, however many chunks the lazy refinement takes."""
    import peft_alora.scoring.fast as fast
    from peft_alora.scoring.prefix import PrefixCache

    model = _model([1e-3, 3e-2, 1e-1])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    monkeypatch.setattr(fast, "BOUND_SLACK", 1e9)  # never settled early: every chunk up to the limit runs
    alone = fast_scores(model, layers, "default", scoring, ranks, n_prune=3, refine=9)
    records = []
    record = PrefixCache.record.__func__
    monkeypatch.setattr(PrefixCache, "record", classmethod(lambda cls, *a, **k: records.append(1) or record(cls, *a, **k)))
    monkeypatch.setattr(fast, "world", lambda: (2, 0))  # chunks of 2 ranks, no recording in the gradient pass
    calls = []
    exact = fast.distributed_exact_scores
    monkeypatch.setattr(fast, "distributed_exact_scores", lambda *a, **k: calls.append(1) or exact(*a, **k))
    shared = fast_scores(model, layers, "default", scoring, ranks, n_prune=3, refine=9)
    assert len(calls) == 5  # chunks of 2 ranks up to the limit: 2, 4, 6, 8, then 9
    assert len(records) == 1
    assert shared == alone  # the same bits as one process, whose gradient pass recorded the blocks


ESTIMATES = {("a", 0): 0.0, ("a", 1): 1.0, ("b", 0): 2.0, ("b", 1): 10.0, ("c", 0): 1.0}


def _rescorer(values, calls):
    def rescore(ranks):
        calls.append(list(ranks))
        return {rank: values[rank] for rank in ranks}
    return rescore


def test_lazy_refinement_stops_once_the_pruned_ranks_are_settled():
    # re-scored values above the estimates (first order a lower bound): stop as soon as the 2nd lowest
    # re-scored value is at or below the next estimate
    values = {rank: estimate + 0.1 for rank, estimate in ESTIMATES.items()}
    calls = []
    refined = refine_lazily(ESTIMATES, n_prune=2, limit=4, rescore=_rescorer(values, calls))
    # order a0 (0), a1 (1), c0 (1), b0 (2): after a0, a1 the 2nd lowest is 1.1 > c0's 1.0, after c0 it is 1.1 <= 2.0
    assert refined == {("a", 0): 0.1, ("a", 1): 1.1, ("c", 0): 1.1}
    assert calls == [[("a", 0), ("a", 1)], [("c", 0)]]


def test_lazy_refinement_keeps_going_where_first_order_overestimated():
    values = {rank: estimate + 0.1 for rank, estimate in ESTIMATES.items()}
    values[("a", 0)] = -0.5  # first order overestimated it by 0.5: a margin of 2 x 0.5 for the ranks not re-scored
    refined = refine_lazily(ESTIMATES, n_prune=2, limit=5, rescore=_rescorer(values, []))
    # after c0 the 2nd lowest is 1.1 > 2.0 - 1.0; after b0 it is 1.1 <= 10 - 1.0
    assert refined == {("a", 0): -0.5, ("a", 1): 1.1, ("c", 0): 1.1, ("b", 0): 2.1}
    assert len(refine_lazily(ESTIMATES, n_prune=2, limit=3, rescore=_rescorer(values, []))) == 3  # the limit holds


def test_lazy_refinement_bounds_a_larger_rank_more_widely():
    values = {rank: estimate + 0.1 for rank, estimate in ESTIMATES.items()}
    values[("a", 0)] = -0.5  # overestimated by 0.5 at size 1
    sizes = {rank: 1.0 for rank in ESTIMATES} | {("b", 1): 20.0}  # b1's bound: 2 x 0.5 x 20 = 20 below its 10
    refined = refine_lazily(ESTIMATES, n_prune=2, limit=5, rescore=_rescorer(values, []), sizes=sizes)
    assert set(refined) == set(ESTIMATES)  # without sizes it stops before b1 (the test above)


def test_lazy_refinement_does_not_depend_on_the_chunk_size():
    values = {rank: estimate + (0.1 if rank != ("a", 0) else -0.5) for rank, estimate in ESTIMATES.items()}
    one_calls = []
    one = refine_lazily(ESTIMATES, n_prune=2, limit=5, rescore=_rescorer(values, one_calls))
    for chunk in (2, 3, 5):  # several processes re-score a rank each; ranks one at a time would not pick are dropped
        calls = []
        assert refine_lazily(ESTIMATES, n_prune=2, limit=5, rescore=_rescorer(values, calls), chunk=chunk) == one
        assert all(len(call) <= chunk for call in calls) and len(calls) < len(one_calls)
    assert refine_lazily(ESTIMATES, n_prune=0, limit=5, rescore=_rescorer(values, [])) == {}
    assert refine_lazily(ESTIMATES, n_prune=2, limit=0, rescore=_rescorer(values, [])) == {}


LADDER = {("m", i): float(i) for i in range(8)}  # estimates one apart; 3 to prune


def test_lazy_refinement_settles_first_ranks_far_below_the_threshold_without_rescoring_them():
    values = {rank: estimate + 0.01 for rank, estimate in LADDER.items()}  # first order misses by 0.01
    calls = []
    refined = refine_lazily(LADDER, n_prune=3, limit=6, rescore=_rescorer(values, calls), grown=set())
    # m0 and m1 calibrate (misses 0.01, so m2 lies in [2, 2.02]): m2 is the 3rd lowest whatever its exact value
    assert refined == {("m", 0): 0.01, ("m", 1): 1.01}
    assert calls == [[("m", 0), ("m", 1)]]
    # not known which ranks were grown: every rank is re-scored before it is pruned, as before
    assert set(refine_lazily(LADDER, n_prune=3, limit=6, rescore=_rescorer(values, []))) == {("m", i) for i in range(3)}


def test_lazy_refinement_rescores_a_grown_rank_before_pruning_it():
    values = {rank: estimate + 0.01 for rank, estimate in LADDER.items()}
    values[("m", 2)] = 10.0  # grown, at the bottom of its valley: first order says 2, removing it costs 10
    refined = refine_lazily(LADDER, n_prune=3, limit=6, rescore=_rescorer(values, []), grown={("m", 2)})
    assert refined[("m", 2)] == 10.0
    scores = LADDER | refined
    assert sorted(scores, key=scores.get)[:3] == [("m", 0), ("m", 1), ("m", 3)]


def test_the_allocator_tells_the_scorer_which_ranks_rounds_grew(torch_single_thread):
    model = _model([1e-3, 3e-2, 1e-1])
    model.peft_config["default"].ranks_per_round = 2
    model.peft_config["default"].allocation_start = 1
    model.peft_config["default"].allocation_end = 2
    model.peft_config["default"].allocation_rounds = 2
    scoring, _, _ = _scoring_set()
    allocator = RankAllocator(model, scoring, total_steps=4)
    assert allocator.grown_ranks() == set()
    record = allocator.step(1, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
    assert record["grown_slots"] and allocator.grown_ranks() == {tuple(rank) for rank in record["grown_slots"]}
    allocator.restore_position(1)  # a resume without the allocator's state: its history is gone
    assert allocator.grown_ranks() is None


def test_default_refinement_is_at_most_twice_the_ranks_pruned(torch_single_thread):
    model = _model([1e-2, 3e-2])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    config = model.peft_config["default"]
    assert config.scoring_refine is None and default_refine(3) == 6
    first_order = taylor_terms(model, layers, "default", scoring, ranks).scores()
    for n_prune in (1, 3):
        scores = fast_scores(model, layers, "default", scoring, ranks, config=config, n_prune=n_prune)
        assert n_prune <= sum(scores[r] != first_order[r] for r in ranks) <= 2 * n_prune
    config.scoring_refine = 0
    assert fast_scores(model, layers, "default", scoring, ranks, config=config, n_prune=3) == first_order


@pytest.mark.parametrize("scorer", ["fast", "exact"])
def test_scores_are_fp32_whatever_the_autocast_around_them(torch_single_thread, scorer):
    model = _model([1e-2, 3e-2])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    score = fast_scores if scorer == "fast" else exact_scores
    plain = score(model, layers, "default", scoring, ranks[:6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = score(model, layers, "default", scoring, ranks[:6])
    assert under_bf16 == plain


def test_fast_scoring_leaves_the_model_as_it_was(torch_single_thread):
    model = _model([1e-2])
    model.train()
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gates = {n: layer.lora_gate["default"].clone() for n, layer in layers.items()}
    seen = []
    fast_scores(model, layers, "default", scoring, ranks, progress=lambda items: seen.append(len(items)) or items)
    assert seen == [2, 2]  # the progress bar sees both gradient passes over the 2 micro-batches
    assert model.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(p.grad is None for p in model.parameters())
    for name, layer in layers.items():
        gate = layer.lora_gate["default"]
        assert torch.equal(gate, gates[name]) and not gate.requires_grad and gate.grad is None


def test_allocator_uses_the_configured_scorer_and_prunes_like_exact(torch_single_thread):
    """A round driven by the fast scorer, with exact re-scoring near the threshold, decides like the exact one."""
    plans = {}
    for scorer in ("fast", "exact"):
        model = _model([1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
        model.peft_config["default"].scorer = scorer
        model.peft_config["default"].ranks_per_round = 2
        model.peft_config["default"].scoring_refine = 6
        model.peft_config["default"].allocation_start = 1
        model.peft_config["default"].allocation_end = None
        model.peft_config["default"].allocation_rounds = 1
        scoring, _, _ = _scoring_set()
        allocator = RankAllocator(model, scoring, total_steps=4)
        record = allocator.step(1)
        plans[scorer] = (record["pruned"], record["grown"])
    assert plans["fast"] == plans["exact"]


def test_fast_scores_on_a_4bit_model(tiny_llama_dir, torch_single_thread):
    from conftest import load_quantized

    model = get_peft_model(load_quantized(tiny_llama_dir, 4), peft_alora.ALoRAConfig(
        r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        for _, layer in model.base_model.gated_layers():
            layer.lora_B["default"].weight.mul_(0.3)  # moderate ranks, where first order is accurate
        model(input_ids=random_batch(n=1, length=4))  # eval-mode forward: made bitsandbytes drop the backward
    ids = random_batch(n=4, length=10, seed=2)
    scoring = ScoringSet([{"input_ids": ids, "labels": ids}])
    layers, ranks = _ranks(model)
    exact = exact_scores(model, layers, "default", scoring, ranks)
    fast = fast_scores(model, layers, "default", scoring, ranks)
    assert max(abs(fast[r] - exact[r]) for r in ranks) < 0.1 * (max(exact.values()) - min(exact.values()))
    assert all(fast[r] != fast[ranks[0]] for r in ranks[1:])  # every rank got its own gradient


def test_cached_base_gradients_give_the_same_terms_as_a_pass_at_all_gates_off(torch_single_thread, monkeypatch):
    from peft_alora.scoring import base_gradient, fast

    model = _model([1e-2, 3e-2])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    cached = taylor_terms(model, layers, "default", scoring, ranks)  # computes and keeps the base gradients
    assert len(scoring.cache) == 1
    again = taylor_terms(model, layers, "default", scoring, ranks)  # reuses them
    assert again.alone == cached.alone and again.base_loss == cached.base_loss
    monkeypatch.setattr(fast, "CACHE_LIMIT_BYTES", 0)  # too large to keep: a gate pass at all gates off
    fresh_set, _, _ = _scoring_set()
    uncached = taylor_terms(model, layers, "default", fresh_set, ranks)
    assert fresh_set.cache == {}
    assert uncached.base_loss == pytest.approx(cached.base_loss, abs=1e-6)
    for rank in ranks:
        assert uncached.alone[rank] == pytest.approx(cached.alone[rank], rel=1e-4, abs=1e-9), rank
    assert base_gradient.gradient_bytes(layers) > 0


def test_nothing_about_the_base_model_is_kept_when_more_than_lora_trains(torch_single_thread):
    """A trained embedding (or bias, modules_to_save) changes the base model between rounds: no cache then."""
    model = _model([1e-2, 3e-2])
    scoring, _, _ = _scoring_set()
    layers, ranks = _ranks(model)
    fast_scores(model, layers, "default", scoring, ranks, n_prune=2)
    exact_scores(model, layers, "default", scoring, ranks[:2])
    assert {key[0] for key in scoring.cache} == {"base_gradients", "base_prefix"}
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    fresh, _, _ = _scoring_set()
    first = fast_scores(model, layers, "default", fresh, ranks, n_prune=2)
    exact_scores(model, layers, "default", fresh, ranks[:2])
    assert fresh.cache == {}
    with torch.no_grad():  # as a training step would
        model.base_model.model.model.embed_tokens.weight.mul_(1.1)
    again = fast_scores(model, layers, "default", fresh, ranks, n_prune=2)
    brand_new, _, _ = _scoring_set()
    assert again == fast_scores(model, layers, "default", brand_new, ranks, n_prune=2) != first


def _bytes_kept_for_backward(fn) -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward, outside checkpointed blocks."""
    kept = {}

    def pack(tensor):
        kept[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(kept.values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_passes_checkpoint_blocks_as_training_does_and_score_the_same(torch_single_thread, reentrant):
    """Scoring runs in eval mode, where transformers would not checkpoint: the passes checkpoint anyway."""
    from peft_alora.scoring.fast import gate_gradients

    model = _model([1e-2, 3e-2])
    layers, ranks = _ranks(model)
    reference = taylor_terms(model, layers, "default", _scoring_set()[0], ranks)
    editor = GateEditor(layers, "default")
    scoring = _scoring_set()[0]
    plain = _bytes_kept_for_backward(lambda: gate_gradients(model, editor, scoring, range(len(scoring.batches))))

    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.base_model.model.enable_input_require_grads()  # as PEFT and TRL do for checkpointed training
    terms = taylor_terms(model, layers, "default", _scoring_set()[0], ranks)  # base gradients hooked through it
    assert terms.loss == pytest.approx(reference.loss, abs=1e-7)
    assert terms.base_loss == pytest.approx(reference.base_loss, abs=1e-7)
    for rank in ranks:
        assert terms.removal[rank] == pytest.approx(reference.removal[rank], rel=1e-5, abs=1e-10), rank
        assert terms.alone[rank] == pytest.approx(reference.alone[rank], rel=1e-5, abs=1e-10), rank
    blocks = model.base_model.model.model.layers
    assert all("forward" not in block.__dict__ for block in blocks)  # the blocks are as they were
    if not reentrant:  # a reentrant checkpoint keeps nothing from its first forward, whatever the hooks see
        checkpointed = _bytes_kept_for_backward(
            lambda: gate_gradients(model, editor, scoring, range(len(scoring.batches))))
        assert checkpointed < 0.5 * plain, (checkpointed, plain)

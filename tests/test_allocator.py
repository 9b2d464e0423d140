"""RankAllocator in a custom training loop: schedule, applied decisions, fresh slots, optimizer state."""

import warnings

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model

import peft_alora
from peft_alora.allocation import select_pruned
from peft_alora.allocator import RankAllocator, resolve_schedule
from peft_alora.scoring import ScoringSet
from conftest import make_tiny_llama, random_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj"]


def _setup(optimizer_cls=torch.optim.AdamW, **config):
    kwargs = dict(r=2, lora_alpha=4, target_modules=TARGETS, allocation_start=2, allocation_end=None,
                  allocation_interval=2, allocation_rounds=3)
    kwargs.update(config)
    model = get_peft_model(make_tiny_llama(seed=0), peft_alora.ALoRAConfig(**kwargs))
    ids = random_batch(n=8, length=12, seed=5)
    scoring = ScoringSet([{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}])
    allocator = RankAllocator(model, scoring, total_steps=8, seed=7)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, allocator, optimizer, ids


def _train_step(model, optimizer, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def test_custom_loop_runs_rounds_on_schedule_and_applies_the_plan():
    model, allocator, optimizer, ids = _setup()
    assert allocator.schedule == [2, 4, 6]
    assert allocator.ranks_per_round == len(TARGETS)  # default n_A: number of target module types
    budget = allocator.budget
    assert budget == 2 * 4 * 2  # r x modules (2 layers x 4 types)
    ran = []
    for step in range(1, 9):
        _train_step(model, optimizer, ids)
        before = allocator.active_slots()
        record = allocator.step(step, optimizer)
        if record is None:
            continue
        ran.append(step)
        scores = {(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])): v for k, v in record["scores"].items()}
        # pruned = the n lowest scores globally (docs/algorithm.md §4)
        assert [tuple(r) for r in record["pruned"]] == select_pruned(scores, allocator.ranks_per_round)
        after = allocator.active_slots()
        for module, slot in record["pruned"]:
            assert slot in before[module] and slot not in after[module]
        pruned_modules = {m for m, _ in record["pruned"]}
        assert not pruned_modules & set(record["grown"])  # regrowth only where nothing was pruned
        assert sum(record["grown"].values()) == len(record["pruned"])
        assert model.base_model.count_active_ranks() == record["active_total"] <= budget
    assert ran == [2, 4, 6]
    assert [r["round"] for r in allocator.history] == [0, 1, 2, 3]
    assert allocator.step(8, optimizer) is None  # no round after the schedule ends


def test_grown_slots_start_fresh_and_pruned_slots_are_not_reused_in_the_same_round():
    model, allocator, optimizer, ids = _setup()
    for step in range(1, 3):
        _train_step(model, optimizer, ids)
    record = allocator.step(2, optimizer)
    layers = dict(model.base_model.gated_layers())
    pruned = {tuple(r) for r in record["pruned"]}
    for module, slot in record["grown_slots"]:
        layer = layers[module]
        assert (module, slot) not in pruned
        assert layer.lora_gate["default"][slot] == 1
        weight_a, weight_b = layer.slot_weights("default")
        assert torch.count_nonzero(weight_b[:, slot]) == 0  # output unchanged
        assert torch.count_nonzero(weight_a[slot]) > 0


def test_training_without_an_allocator_warns_once_that_nothing_will_be_allocated():
    model = get_peft_model(make_tiny_llama(seed=0), peft_alora.ALoRAConfig(r=2, target_modules=TARGETS))
    ids = random_batch(n=2, length=8, seed=5)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # evaluation or generation: no warning
    model.train()
    with pytest.warns(UserWarning, match="no RankAllocator attached.*ALoRACallback"):
        model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)  # once

    for unload in ("merge_and_unload", "unload"):  # the plain model they return trains without the warning
        plain = getattr(get_peft_model(make_tiny_llama(seed=0), peft_alora.ALoRAConfig(r=2, target_modules=TARGETS)),
                        unload)()
        plain.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plain(input_ids=ids)

    model, allocator, optimizer, ids = _setup()  # with an allocator (as ALoRACallback builds at train begin)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(model, optimizer, ids)


def test_a_round_without_the_optimizer_warns_once_that_moments_were_not_reset():
    model, allocator, optimizer, ids = _setup()
    for step in range(1, 3):
        _train_step(model, optimizer, ids)
    with pytest.warns(UserWarning, match=r"got no optimizer.*allocator.step\(step, optimizer\)"):
        record = allocator.step(2)
    assert record["grown_slots"]
    for step in range(3, 5):
        _train_step(model, optimizer, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per allocator, not every round
        assert allocator.step(4)["grown_slots"]


@pytest.mark.parametrize("optimizer_cls", [
    torch.optim.AdamW,
    lambda params, lr: torch.optim.AdamW(params, lr=lr, fused=True),
    lambda params, lr: bnb.optim.AdamW8bit(params, lr=lr, min_8bit_size=16),  # 8-bit states even for tiny params
    lambda params, lr: bnb.optim.PagedAdamW8bit(params, lr=lr, min_8bit_size=16),
], ids=["adamw", "adamw-fused", "bnb-adamw8bit", "bnb-paged-adamw8bit"])
def test_reactivated_slots_start_with_zero_optimizer_moments(optimizer_cls):
    model, allocator, optimizer, ids = _setup(optimizer_cls=optimizer_cls)
    inner = getattr(optimizer, "optimizer", optimizer)
    for _, layer in model.base_model.gated_layers():  # two spare slots in use, the second free again (as after a
        r = layer.r_init["default"]                    # pruning), so that the slots a round grows hold moments
        layer.activate_slot("default", r)
        layer.activate_slot("default", r + 1)
        layer.deactivate_slot("default", r + 1)
    for step in range(1, 3):
        _train_step(model, optimizer, ids)
    # make every slot look used (as a slot pruned in an earlier round would be): nonzero moments
    for param, state in inner.state.items():
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.fill_(255 if value.dtype == torch.uint8 else 1.0)
    record = allocator.step(2, optimizer)
    assert record["grown_slots"]
    layers = dict(model.base_model.gated_layers())

    def moments(param):
        state = inner.state[param]
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                if value.dtype == torch.uint8:  # 8-bit: the code must decode to 0.0
                    qmap = state["qmap1" if key == "state1" else "qmap2"]
                    yield key, qmap[value.long()]
                else:
                    yield key, value

    checked = 0
    for module, slot in record["grown_slots"]:
        a, b, index = layers[module].slot_parameters("default", slot)
        for key, value in moments(a):
            assert torch.count_nonzero(value[index]) == 0, key
            checked += 1
        for key, value in moments(b):
            assert torch.count_nonzero(value[:, index]) == 0, key
        # the module's other active slots, not touched, keep their moments
        others = [layers[module].slot_parameters("default", other) for other in layers[module].active_slots("default")
                  if other != slot]
        assert others and all(any(torch.count_nonzero(v[i]) > 0 for _, v in moments(a2)) for a2, _, i in others)
    assert checked >= 2 * len(record["grown_slots"])


OPTIMIZERS = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
    "adamw-fused": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True),
    "sgd-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.01),
    "bnb-adamw32bit": lambda params, lr: bnb.optim.AdamW(params, lr=lr, weight_decay=0.01, optim_bits=32),
    "bnb-adamw8bit": lambda params, lr: bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.01, min_8bit_size=16),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_spare_slots_left_out_until_grown_train_as_if_always_in(name, monkeypatch):
    """One process leaves a spare slot out of the forward (no gradient, no moments) until a round grows a rank
    there; several processes keep every slot in. Both must train the same: rounds, losses and every weight."""
    runs = []
    for always_in in (True, False):
        # what every process does under torch.distributed
        monkeypatch.setattr(peft_alora.layers, "_several_processes", lambda: always_in)
        model, allocator, optimizer, ids = _setup(optimizer_cls=OPTIMIZERS[name])
        layers = dict(model.base_model.gated_layers())
        losses, history = [], []
        for step in range(1, 9):
            losses.append(_train_step(model, optimizer, ids))
            record = allocator.step(step, optimizer)
            if record is not None:
                history.append((record["pruned"], record["grown_slots"]))
        spare_state = sum(bool(optimizer.state.get(slot)) for layer in layers.values()
                          for slot in layer.lora_A_spare["default"].slots())
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        spare_slots = sum(len(layer.lora_A_spare["default"]) for layer in layers.values())
        runs.append((losses, history, weights, spare_state, spare_slots))
    (losses_in, history_in, weights_in, state_in, slots), (losses, history, weights, state, _) = runs
    grown_spare = {(m, slot) for _, grown in history for m, slot in grown if slot >= 2}
    assert grown_spare and len(grown_spare) < slots  # some spare slots joined, some never did
    assert state_in == slots and state == len(grown_spare)  # moments kept only for the slots grown
    assert history == history_in
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_in), rtol=0, atol=1e-6)
    for key, value in weights_in.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6, msg=key)


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(dict(allocation_start=0.3, allocation_end=0.9, allocation_interval=None,
                                  allocation_rounds=8))
        self.__dict__.update(kw)


def test_schedule_from_steps_and_fractions():
    assert resolve_schedule(_Cfg(), 100) == [30, 39, 47, 56, 64, 73, 81, 90]
    assert resolve_schedule(_Cfg(allocation_start=10, allocation_end=None, allocation_interval=5,
                                 allocation_rounds=3), 100) == [10, 15, 20]
    assert resolve_schedule(_Cfg(allocation_start=0.5, allocation_end=None, allocation_interval=0.1,
                                 allocation_rounds=2), 40) == [20, 24]
    assert resolve_schedule(_Cfg(allocation_rounds=1), 10) == [3]


@pytest.mark.parametrize("cfg,total,match", [
    (_Cfg(), 5, "allocation_rounds"),  # 8 rounds cannot fit in 5 steps
    (_Cfg(allocation_start=50, allocation_end=None, allocation_interval=10, allocation_rounds=3), 60,
     "allocation_start"),
    (_Cfg(allocation_start=0, allocation_end=None, allocation_interval=1, allocation_rounds=1), 10,
     "at least 1 optimizer step"),
    (_Cfg(allocation_end=1.0, allocation_rounds=2), 10, "allocation_end"),
])
def test_schedule_that_does_not_fit_the_run_is_a_clear_error(cfg, total, match):
    with pytest.raises(ValueError, match=match):
        resolve_schedule(cfg, total)


def test_plain_scoring_batches_are_taken_and_checked_when_the_allocator_is_built():
    """A custom loop may pass its collated batches (a list, a DataLoader, one dict) instead of a ScoringSet;
    batches the scorer cannot use are refused at once, not at the first round."""
    model, reference, *_ = _setup()
    batches = reference.scoring.batches
    loader = torch.utils.data.DataLoader([{"input_ids": b["input_ids"][i], "labels": b["labels"][i]}
                                          for b in batches for i in range(len(b["input_ids"]))], batch_size=4)
    for given, wanted in ((batches, batches), (loader, batches), (batches[0], batches[:1])):  # loader: same rows, order
        allocator = RankAllocator(model, given, total_steps=8, seed=7)
        assert len(allocator.scoring.batches) == len(wanted)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(allocator.scoring.batches, wanted))
    ids = batches[0]["input_ids"]
    with pytest.raises(ValueError, match="no scoring data"):
        RankAllocator(model, [], total_steps=8)
    with pytest.raises(ValueError, match="no scoring data"):
        RankAllocator(model, None, total_steps=8)
    with pytest.raises(ValueError, match="has no 'labels'"):
        RankAllocator(model, [{"input_ids": ids}], total_steps=8)


def test_a_model_without_alora_adapter_is_a_clear_error():
    from peft import LoraConfig

    model = get_peft_model(make_tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    ids = random_batch()
    with pytest.raises(TypeError, match="ALoRAConfig.*LoraModel"):
        RankAllocator(model, ScoringSet([{"input_ids": ids, "labels": ids}]), total_steps=10)

"""Issue 10: nothing silently wrong. Each test reproduces one finding of the audit and asserts the fix or
the refusal (with a message that says what to do). See docs/reliability.md."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    alora_config, logits_of, make_ranks_unequal, make_tiny_gpt2, make_tiny_llama, random_batch, randomize_lora_b,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_alora
from peft_alora.allocator import RankAllocator
from peft_alora.callback import ALoRACallback
from peft_alora.scoring import ScoringSet

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj"]


def _scoring(seed=5):
    ids = random_batch(n=8, length=12, seed=seed)
    return ScoringSet([{"input_ids": ids[:4], "labels": ids[:4]}, {"input_ids": ids[4:], "labels": ids[4:]}])


def _allocator(model=None, scoring=None, seed=7, **config):
    kwargs = dict(r=2, lora_alpha=4, target_modules=TARGETS, allocation_start=2, allocation_end=None,
                  allocation_interval=2, allocation_rounds=3)
    kwargs.update(config)
    model = model if model is not None else get_peft_model(make_tiny_llama(seed=0), peft_alora.ALoRAConfig(**kwargs))
    return RankAllocator(model, scoring or _scoring(), total_steps=8, seed=seed)


# ---- 1. the rank budget ---------------------------------------------------------------------------------

def test_default_ranks_per_round_that_prunes_every_rank_is_refused():
    """r=1 on a one-layer Llama: 7 ranks, and the default ranks_per_round (7 module types) would prune them all."""
    model = get_peft_model(make_tiny_llama(seed=0, num_hidden_layers=1), alora_config(r=1, lora_alpha=2))
    with pytest.raises(ValueError, match=r"ranks_per_round=7 \(the default.*all 7 ranks.*below 7"):
        RankAllocator(model, _scoring(), total_steps=100)


def test_explicit_ranks_per_round_of_the_whole_budget_is_refused():
    with pytest.raises(ValueError, match=r"ranks_per_round=16 would prune all 16 ranks"):
        _allocator(ranks_per_round=16)


def test_short_regrowth_warns_and_reports_the_real_budget(tmp_path):
    """max_r=3 leaves one free slot per module: 12 of 16 ranks pruned cannot all come back."""
    allocator = _allocator(max_r=3, ranks_per_round=12)
    assert allocator.budget == allocator.budget_initial == 16
    with pytest.warns(UserWarning, match=r"budget drops from 16 to \d+\. Raise max_r"):
        record = allocator.run_round(2)
    lost = len(record["pruned"]) - sum(record["grown"].values())
    assert lost > 0
    assert record["budget"] == allocator.budget == 16 - lost == record["active_total"]
    assert record["budget_initial"] == 16
    summary = json.loads(peft_alora.report.write_report(allocator.history, tmp_path)["json"].read_text())["summary"]
    assert summary["budget"] == 16 - lost and summary["budget_initial"] == 16


# ---- 2. exports reproduce the model -----------------------------------------------------------------------

def _fresh_logits_of_export(model, base, out, x):
    peft_alora.export_lora(model, out)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    return logits_of(loaded, x)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_export_keeps_the_trained_bias_of_a_module_left_at_rank_0(bias, tmp_path):
    x = random_batch(n=2, length=10)
    model = get_peft_model(make_tiny_gpt2(seed=0), alora_config(bias=bias)).eval()
    randomize_lora_b(model)
    ranks = make_ranks_unequal(model)
    zero = [name for name, rank in ranks.items() if rank == 0][0]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and param.requires_grad:
                param.add_(0.2)
    assert model.get_submodule(f"base_model.model.{zero}").base_layer.bias.requires_grad
    expected = logits_of(model, x)
    got = _fresh_logits_of_export(model, make_tiny_gpt2(seed=0).eval(), tmp_path / "lora", x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    exported = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert exported["rank_pattern"][zero] == 1 and exported["bias"] == bias  # kept, with a rank that adds zero


def test_export_carries_trainable_token_indices(tmp_path):
    x = random_batch(n=2, length=10)
    model = get_peft_model(make_tiny_llama(seed=0), alora_config(trainable_token_indices=[3, 5, 7])).eval()
    randomize_lora_b(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    x[0, :3] = torch.tensor([3, 5, 7])
    expected = logits_of(model, x)
    got = _fresh_logits_of_export(model, make_tiny_llama(seed=0), tmp_path / "lora", x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


# ---- 3. operations that would ignore the gates ------------------------------------------------------------

@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_is_refused(combination):
    model = get_peft_model(make_tiny_llama(seed=0), alora_config())
    with pytest.raises(TypeError, match="export_lora"):
        model.add_weighted_adapter(["default"], [1.0], "combined", combination_type=combination)


def test_scoring_an_adapter_that_is_not_active_is_refused():
    model = get_peft_model(make_tiny_llama(seed=0), alora_config(target_modules=TARGETS))
    model.add_adapter("second", alora_config(target_modules=TARGETS))
    allocator = RankAllocator(model, _scoring(), total_steps=100, adapter_name="second")
    gates = allocator.active_slots()
    with pytest.raises(ValueError, match=r"set_adapter\('second'\)"):
        allocator.run_round(10)
    assert allocator.active_slots() == gates


def test_a_round_on_a_merged_model_is_refused_and_unmerge_stays_exact():
    model = get_peft_model(make_tiny_llama(seed=0), alora_config(target_modules=TARGETS)).eval()
    x = random_batch()
    with model.disable_adapter():
        base = logits_of(model, x)
    randomize_lora_b(model)
    allocator = RankAllocator(model, _scoring(), total_steps=100)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        allocator.run_round(10)
    layer = next(iter(allocator.layers.values()))
    with pytest.raises(ValueError, match="unmerge_adapter"):
        layer.deactivate_slot("default", 0)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, x), base, atol=1e-6, rtol=0)


# ---- 4. adapter files are validated on load ---------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(make_tiny_llama(seed=0), alora_config(max_r=8))
    randomize_lora_b(model)
    make_ranks_unequal(model)
    model.save_pretrained(tmp_path)
    (tmp_path / "rank_state.json").write_text(json.dumps(model.base_model.rank_state()))
    return tmp_path


def _edit_weights(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _load(folder):
    return PeftModel.from_pretrained(make_tiny_llama(seed=0), str(folder))


def test_saved_adapter_loads_back(saved):
    """The checks accept what save_pretrained wrote: the unequal allocation comes back."""
    assert _load(saved).base_model.rank_state() == json.loads((saved / "rank_state.json").read_text())


@pytest.mark.parametrize("layout", ["one bank", "two banks"])
def test_adapter_saved_in_an_earlier_layout_loads(saved, layout):
    """Files written by earlier versions hold all max_r slots in lora_A / lora_B (one bank), or the spare slots in
    one lora_A_spare / lora_B_spare weight each (two banks): they load to the same model, regrown spare slots
    included."""
    x = random_batch()
    expected, ranks = logits_of(_load(saved), x), json.loads((saved / "rank_state.json").read_text())

    def join_slots(tensors):
        spare_keys = sorted((k for k in tensors if re.search(r"lora_[AB]_spare\.\d+$", k)),
                            key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])))
        assert spare_keys
        for key in spare_keys:
            bank = key.rsplit(".", 1)[0]
            into = bank.replace("_spare", "") + ".weight" if layout == "one bank" else bank + ".weight"
            if into in tensors:
                tensors[into] = torch.cat([tensors[into], tensors.pop(key)], dim=0 if "lora_A" in key else 1)
            else:
                tensors[into] = tensors.pop(key)

    _edit_weights(saved, join_slots)
    loaded = _load(saved)
    assert loaded.base_model.rank_state() == ranks and any(s >= 4 for slots in ranks.values() for s in slots)
    torch.testing.assert_close(logits_of(loaded, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("value", [0.5, 3.0, -1.0, math.nan])
def test_gates_other_than_0_and_1_are_refused(saved, value):
    def edit(tensors):
        key = next(k for k in tensors if k.endswith("lora_gate"))
        tensors[key][0] = value

    _edit_weights(saved, edit)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        _load(saved)


def test_missing_gates_are_refused(saved):
    _edit_weights(saved, lambda tensors: [tensors.pop(k) for k in [k for k in tensors if k.endswith("lora_gate")]])
    with pytest.raises(ValueError, match="no lora_gate"):
        _load(saved)


@pytest.mark.parametrize("edit, match", [({"r": 2}, "scale"), ({"lora_alpha": 16}, "scale"),
                                         ({"max_r": 6}, "max_r")])
def test_edited_adapter_config_is_refused(saved, edit, match):
    path = saved / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(edit)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        _load(saved)


# ---- 5. resume compares every decision setting -------------------------------------------------------------

@pytest.mark.parametrize("change, fields", [
    (dict(lora_alpha=8), ["lora_alpha"]),
    (dict(r=3, max_r=4), ["r"]),
    (dict(ranks_per_round=3), ["ranks_per_round"]),
    (dict(scoring_examples=16, scoring_batch_size=4), ["scoring_batch_size", "scoring_examples"]),
    (dict(seed=8), ["seed"]),
    (dict(scoring=_scoring(seed=6)), ["scoring_set"]),
])
def test_resume_with_changed_settings_is_refused(change, fields):
    state = json.loads(json.dumps(_allocator().state_dict()))
    scoring, seed = change.pop("scoring", None), change.pop("seed", 7)
    other = _allocator(scoring=scoring, seed=seed, **change)
    with pytest.raises(ValueError, match="differ from the checkpoint's") as info:
        other.load_state_dict(state)
    named = [part.split(" (")[0] for part in str(info.value).split(": ", 1)[1].split(". Resume")[0].split("; ")]
    assert named == fields


def test_resume_with_the_same_settings_is_accepted():
    state = json.loads(json.dumps(_allocator().state_dict()))
    _allocator().load_state_dict(state)


# ---- 6. a report that cannot be written does not end the run ------------------------------------------------

def test_unwritable_report_is_logged_not_raised(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the report folder should be")
    callback = ALoRACallback(trainer=SimpleNamespace(), report_dir=str(blocker))  # the report needs no trainer
    callback.allocator = _allocator()
    state = SimpleNamespace(is_world_process_zero=True, log_history=[])
    with pytest.warns(UserWarning, match="could not write the allocation report"):
        callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert callback.report_paths == {}


# ---- 7. numbers and crashes ------------------------------------------------------------------------------

def test_trainable_parameter_count_of_the_tuner_counts_active_ranks():
    alora = get_peft_model(make_tiny_llama(seed=0), alora_config())
    lora = get_peft_model(make_tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert alora.base_model.get_nb_trainable_parameters()[0] == lora.get_nb_trainable_parameters()[0]
    assert alora.get_nb_trainable_parameters()[0] == 2 * lora.get_nb_trainable_parameters()[0]  # PEFT: all slots
    make_ranks_unequal(alora)
    assert alora.base_model.get_nb_trainable_parameters()[0] == alora.base_model.count_active_parameters()


@pytest.mark.parametrize("wrap", ["none", "lora"])
def test_callback_without_an_alora_adapter_says_what_to_do(wrap):
    model = make_tiny_llama(seed=0)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    callback = ALoRACallback(trainer=SimpleNamespace(model=model))
    with pytest.raises(TypeError, match="ALoRAConfig"):
        callback.on_train_begin(SimpleNamespace(seed=0), SimpleNamespace(), None, model=model)


def test_alora_and_plain_lora_cannot_share_modules():
    model = make_tiny_llama(seed=0)
    model.add_adapter(alora_config(), adapter_name="alora")
    with pytest.raises(TypeError, match="cannot share modules"):
        model.add_adapter(LoraConfig(r=4, target_modules="all-linear"), adapter_name="lora")
    model = make_tiny_llama(seed=0)
    model.add_adapter(LoraConfig(r=4, target_modules="all-linear"), adapter_name="lora")
    with pytest.raises(TypeError, match="cannot share modules"):
        model.add_adapter(alora_config(), adapter_name="alora")


def test_adafactor_factored_moments_that_cannot_be_reset_are_warned_about():
    allocator = _allocator()
    model = allocator.model
    for _, layer in model.base_model.gated_layers():  # a free slot in every main bank, where a round regrows a rank
        layer.deactivate_slot("default", 0)
    optimizer = torch.optim.Adafactor([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_batch(n=4, length=12)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with pytest.warns(UserWarning, match="shared across rank slots and was not reset"):
        allocator.run_round(2, optimizer)


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory):
    from trl import SFTConfig, SFTTrainer

    from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer

    tokenizer = toy_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp("sft")), max_length=64, use_cpu=True, report_to=[],
                     bf16=False, assistant_only_loss=True, disable_tqdm=True)
    trainer = SFTTrainer(model=toy_llama(len(tokenizer)), args=args, train_dataset=toy_dataset(8, seed=0),
                         processing_class=tokenizer, peft_config=alora_config(r=2, lora_alpha=4))
    return trainer, toy_dataset


def test_scoring_dataset_empty_or_truncated_to_nothing_is_named(sft_trainer):
    from datasets import Dataset

    from peft_alora.callback import build_scoring_set

    trainer, toy_dataset = sft_trainer
    with pytest.raises(ValueError, match="scoring_dataset is empty") as info:
        build_scoring_set(trainer, toy_dataset(4, seed=1).select([]), 8, 4, seed=0)
    assert "eval_dataset" not in str(info.value)
    long_prompts = Dataset.from_dict({"messages": [[{"role": "user", "content": "seven " * 100},
                                                    {"role": "assistant", "content": "ok"}]] * 3})
    with pytest.raises(ValueError, match="scoring_dataset has no example left.*raise max_length") as info:
        build_scoring_set(trainer, long_prompts, 8, 4, seed=0)
    assert "eval_dataset" not in str(info.value)


def test_scoring_set_smaller_than_asked_is_warned_about(sft_trainer):
    from peft_alora.callback import build_scoring_set

    trainer, toy_dataset = sft_trainer
    with pytest.warns(UserWarning, match=r"scores on 3 example\(s\) with trained tokens instead of scoring_examples=8"):
        scoring = build_scoring_set(trainer, toy_dataset(3, seed=1), 8, 4, seed=0)
    assert sum(len(batch["input_ids"]) for batch in scoring.batches) == 3


def test_state_of_the_previous_version_loads_with_a_warning():
    old = {key: value for key, value in _allocator().state_dict().items() if key in ("schedule", "history")}
    allocator = _allocator()
    with pytest.warns(UserWarning, match="state version 1"):
        allocator.load_state_dict(json.loads(json.dumps({"version": 1, **old})))
    assert allocator.rounds_done == 0 and allocator.budget == 16

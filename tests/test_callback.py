"""ALoRACallback inside TRL's SFTTrainer and transformers' Trainer (tiny offline models and data)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import peft_alora
from peft_alora.callback import ALoRACallback
from peft_alora.scoring import IGNORE_INDEX
from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer

TOKENIZER = toy_tokenizer()
ROUNDS_AT = [2, 4, 6]


def alora_config(**overrides):
    kwargs = dict(r=2, lora_alpha=4, target_modules="all-linear", allocation_start=2, allocation_end=None,
                  allocation_interval=2, allocation_rounds=3, scoring_examples=8, scoring_batch_size=4)
    kwargs.update(overrides)
    return peft_alora.ALoRAConfig(**kwargs)


def sft_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                  logging_steps=2, report_to=[], save_strategy="no", max_length=64, seed=11, use_cpu=True,
                  disable_tqdm=True, bf16=False)  # TRL defaults to bf16, slow on most CPUs
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def run_sft(tmp_path, style="conversational", model=None, eval_n=16, alora=None, **overrides):
    model = model if model is not None else toy_llama(len(TOKENIZER))
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, **overrides),
                         train_dataset=toy_dataset(48, seed=0, style=style),
                         eval_dataset=toy_dataset(eval_n, seed=1, style=style) if eval_n else None,
                         processing_class=TOKENIZER, peft_config=alora or alora_config())
    callback = ALoRACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def assert_rounds_ran(trainer, callback):
    history = callback.allocator.history
    assert [r["step"] for r in history[1:]] == ROUNDS_AT
    logged = [entry for entry in trainer.state.log_history if "alora/round" in entry]
    assert [entry["alora/round"] for entry in logged] == [1, 2, 3]
    for entry in logged:
        assert entry["alora/pruned"] == entry["alora/added"] > 0
        assert entry["alora/active_ranks"] <= callback.allocator.budget
        assert entry["alora/scoring_seconds"] > 0 and entry["alora/trainable_params"] > 0
    with open(os.path.join(trainer.args.output_dir, "alora_allocation.json")) as handle:
        report = json.load(handle)
    assert len(report["history"]) == 4
    assert [step for step, _ in report["loss_curve"]] == [2, 4, 6, 8]  # logging_steps=2
    assert os.path.getsize(os.path.join(trainer.args.output_dir, "alora_allocation.png")) > 1000
    assert trainer.model.base_model.count_active_ranks() <= callback.allocator.budget


def prompt_tokens_are_masked(scoring):
    """True when some attended tokens carry no loss, i.e. completion/assistant-only masking reached scoring."""
    for batch in scoring.batches:
        attended = batch.get("attention_mask", torch.ones_like(batch["input_ids"])) == 1
        if ((batch["labels"] == IGNORE_INDEX) & attended).any():
            return True
    return False


@pytest.mark.parametrize("case", ["assistant_only", "completion_only", "accumulation+checkpointing", "bf16",
                                  "packing"])
def test_sft_trainer_runs_the_schedule(tmp_path, case):
    style, overrides = "conversational", {}
    if case == "assistant_only":
        overrides = dict(assistant_only_loss=True)
    elif case == "completion_only":
        style, overrides = "prompt_completion", dict(completion_only_loss=True)
    elif case == "accumulation+checkpointing":
        overrides = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True)
    elif case == "bf16":
        overrides = dict(bf16=True)
    elif case == "packing":
        style, overrides = "language_modeling", dict(packing=True, max_length=48)
    trainer, callback = run_sft(tmp_path, style=style, **overrides)
    assert_rounds_ran(trainer, callback)
    scoring = callback.allocator.scoring
    if case == "packing":  # padding-free packed batches: boundaries carried by position_ids
        assert all("position_ids" in batch and batch["input_ids"].shape[0] == 1 for batch in scoring.batches)
    else:
        assert prompt_tokens_are_masked(scoring) == (case in ("assistant_only", "completion_only"))
    if case == "bf16":
        layer = next(iter(callback.allocator.layers.values()))
        assert layer.lora_gate["default"].dtype == torch.float32


def test_plain_transformers_trainer(tmp_path):
    def tokenize(row):
        return TOKENIZER(row["text"], truncation=True, max_length=48)

    train = toy_dataset(48, seed=0, style="language_modeling").map(tokenize, remove_columns=["text"])
    dev = toy_dataset(16, seed=1, style="language_modeling").map(tokenize, remove_columns=["text"])
    model = get_peft_model(toy_llama(len(TOKENIZER)), alora_config())
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no", seed=3,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorForLanguageModeling(TOKENIZER, mlm=False))
    callback = ALoRACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert_rounds_ran(trainer, callback)


@pytest.mark.parametrize("streaming", [False, True])
def test_explicit_raw_scoring_dataset_is_prepared_like_training(tmp_path, streaming):
    model = toy_llama(len(TOKENIZER))
    trainer = SFTTrainer(model=model, args=sft_args(tmp_path, assistant_only_loss=True, max_steps=3),
                         train_dataset=toy_dataset(16, seed=0), processing_class=TOKENIZER,
                         peft_config=alora_config(allocation_start=2, allocation_rounds=1, allocation_interval=None))
    raw = toy_dataset(6, seed=5)  # raw conversations
    callback = ALoRACallback(trainer, scoring_dataset=raw.to_iterable_dataset() if streaming else raw)
    trainer.add_callback(callback)
    trainer.train()
    assert sum(len(b["input_ids"]) for b in callback.allocator.scoring.batches) == 6
    assert prompt_tokens_are_masked(callback.allocator.scoring)
    assert len(callback.allocator.history) == 2


def test_no_scoring_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no scoring data"):
        run_sft(tmp_path, eval_n=0)


@pytest.mark.parametrize("callback", [ALoRACallback, "instance"])
def test_the_callback_in_the_trainers_constructor_says_how_to_add_it(tmp_path, callback):
    """Trainer(callbacks=[ALoRACallback]) instantiates the class with no argument; ALoRACallback() is the same."""
    with pytest.raises(TypeError, match=r"then trainer.add_callback\(ALoRACallback\(trainer\)\)"):
        SFTTrainer(model=toy_llama(len(TOKENIZER)), args=sft_args(tmp_path), train_dataset=toy_dataset(8, seed=0),
                   processing_class=TOKENIZER, peft_config=alora_config(),
                   callbacks=[callback if callback is ALoRACallback else ALoRACallback()])


def test_the_callback_added_twice_is_refused_before_training(tmp_path):
    trainer = SFTTrainer(model=toy_llama(len(TOKENIZER)), args=sft_args(tmp_path),
                         train_dataset=toy_dataset(48, seed=0), eval_dataset=toy_dataset(16, seed=1),
                         processing_class=TOKENIZER, peft_config=alora_config())
    trainer.add_callback(ALoRACallback(trainer))
    trainer.add_callback(ALoRACallback(trainer))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="added 2 times"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_schedule_that_does_not_fit_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="allocation_rounds"):
        run_sft(tmp_path, alora=alora_config(allocation_rounds=8))  # rounds at 2..16 in an 8-step run

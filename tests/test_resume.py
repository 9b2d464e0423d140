"""Resume from a checkpoint ends exactly where the uninterrupted run ends (allocation and weights).

The allocator's JSON state travels in ``trainer_state.json`` (``stateful_callbacks["ALoRAAllocator"]``)
and the gates in the adapter weights; ``ALoRACallback.on_train_begin`` restores the state when the
trainer resumes. Run A trains 16 steps straight (rounds after steps 4, 8, 12); run B trains the
same with a checkpoint every 2 steps; fresh trainers then resume from B's checkpoints.
"""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "train_toy_sft.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_toy_sft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy = _load_script()


class StepCounter(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _finish(trainer, callback, resume_from=None):
    trainer.train(resume_from_checkpoint=resume_from)
    return toy.collect(trainer, callback), toy.adapter_tensors(trainer.model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A (no checkpoints) and run B (checkpoint every 2 steps), both trained to the end."""
    root = tmp_path_factory.mktemp("resume")
    tokenizer = toy.toy_tokenizer()
    a = _finish(*toy.build_trainer(str(root / "A"), tokenizer=tokenizer))
    b = _finish(*toy.build_trainer(str(root / "B"), save_steps=2, tokenizer=tokenizer))
    return {"root": root, "tokenizer": tokenizer, "A": a, "B": b}


def assert_same_run(result, weights, reference, ref_weights):
    assert result["global_step"] == reference["global_step"] == 16
    assert result["history"] == reference["history"]  # every round: step, pruned, grown, slots, active
    assert result["rank_state"] == reference["rank_state"]
    assert weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        if "lora_gate" in name:
            assert torch.equal(weights[name], tensor), name
        else:
            torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_reference_run_moves_ranks(runs):
    """The scenario is not vacuous: three rounds ran and each moved ranks between modules."""
    result, _ = runs["A"]
    history = result["history"]
    assert [h["step"] for h in history] == [0, 4, 8, 12]
    for record in history[1:]:
        assert len(record["pruned"]) == 7 and sum(record["grown"].values()) > 0
    assert result["rank_state"] != {name: [0, 1] for name in result["rank_state"]}


def test_checkpointing_does_not_change_the_run(runs):
    assert_same_run(*runs["B"], *runs["A"])


def test_checkpoints_hold_the_allocator_state_and_gates(runs):
    checkpoint = runs["root"] / "B" / "checkpoint-4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["ALoRAAllocator"]
    assert state["schedule"] == [4, 8, 12]
    assert [h["step"] for h in state["history"]] == [0, 4]  # the round of step 4 ran before the save
    assert toy.decisions(state["history"]) == runs["A"][0]["history"][:2]
    gates = {k: v for k, v in load_file(checkpoint / "adapter_model.safetensors").items() if "lora_gate" in k}
    assert len(gates) == 14
    active = {k.split("base_model.model.")[1].rsplit(".lora_gate", 1)[0]: torch.nonzero(v).flatten().tolist()
              for k, v in gates.items()}
    assert {m: len(s) for m, s in active.items()} == state["history"][-1]["active"]


@pytest.mark.parametrize("step", [4, 6])
def test_resume_ends_like_the_uninterrupted_run(runs, step):
    """Resume right after round 1 (step 4) and between rounds (step 6), with a fresh trainer and model."""
    trainer, callback = toy.build_trainer(str(runs["root"] / "B"), save_steps=2, tokenizer=runs["tokenizer"])
    counter = StepCounter()
    trainer.add_callback(counter)
    result, weights = _finish(trainer, callback, resume_from=str(runs["root"] / "B" / f"checkpoint-{step}"))
    assert counter.steps == list(range(step + 1, 17))  # it really resumed after `step`
    assert_same_run(result, weights, *runs["A"])


def test_restore_callback_states_from_checkpoint_ignores_the_allocator_key(runs, caplog):
    """transformers re-instantiates ExportableState callbacks named in stateful_callbacks; our key is no
    class name, so it is skipped with a warning, and the allocator still restores its own state."""
    trainer, callback = toy.build_trainer(str(runs["root"] / "B"), save_steps=2, tokenizer=runs["tokenizer"],
                                          restore_callback_states_from_checkpoint=True)
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            result, weights = _finish(trainer, callback, resume_from=str(runs["root"] / "B" / "checkpoint-8"))
    finally:
        transformers.logging.disable_propagation()
    assert any("ALoRAAllocator" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert callback in trainer.callback_handler.callbacks
    assert_same_run(result, weights, *runs["A"])


def test_resume_with_another_schedule_is_refused(runs):
    """The checkpoint's rounds (after steps 4, 8, 12) are not this run's (4, 7, 10): the error names the field."""
    trainer, callback = toy.build_trainer(str(runs["root"] / "C"), tokenizer=runs["tokenizer"],
                                          alora={"allocation_end": 10})
    with pytest.raises(ValueError, match=r"allocation_end \(checkpoint 12, now 10\)"):
        trainer.train(resume_from_checkpoint=str(runs["root"] / "B" / "checkpoint-4"))


def test_resume_from_a_checkpoint_without_allocator_state_keeps_the_round_index(runs, tmp_path, caplog):
    """trainer_state.json lost the ALoRA entry: the rounds up to the checkpoint count as done (so the later
    rounds draw with their own seeds), the warning says so, and the run still ends like the uninterrupted one."""
    import shutil

    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(runs["root"] / "B" / "checkpoint-6", checkpoint)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["ALoRAAllocator"]
    state_file.write_text(json.dumps(state))
    trainer, callback = toy.build_trainer(str(tmp_path / "out"), tokenizer=runs["tokenizer"])
    with caplog.at_level(logging.WARNING, logger="peft_alora.callback"):
        result, weights = _finish(trainer, callback, resume_from=str(checkpoint))
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "peft_alora.callback")
    assert "1 round(s) scheduled up to that step count as done" in message and "skipped" not in message
    assert [h["round"] for h in callback.allocator.history] == [1, 2, 3]
    assert result["rank_state"] == runs["A"][0]["rank_state"]
    for name, tensor in runs["A"][1].items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-5, rtol=0, msg=name)

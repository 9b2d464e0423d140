"""ALoRAConfig: defaults, validation with errors that name the field, save/load (issue #2, point 3)."""

import dataclasses
import json
import re

import pytest
from peft import LoraConfig, PeftConfig
from peft.tuners.lora.config import BdLoraConfig
from peft.utils.peft_types import PeftType

from peft_alora import ALoRAConfig


def test_defaults():
    config = ALoRAConfig(r=8, target_modules=["q_proj"])
    assert config.peft_type is PeftType.ALLOCATING_LORA and config.peft_type.value == "ALLOCATING_LORA"
    assert config.max_r is None and config.capacity == 16  # None: 2 * r, following r
    assert ALoRAConfig(r=3).capacity == 6
    assert ALoRAConfig(r=3, max_r=4).capacity == 4
    assert (config.allocation_start, config.allocation_end, config.allocation_interval) == (0.1, 0.4, None)
    assert config.allocation_rounds == 8
    assert config.ranks_per_round is None
    assert (config.scoring_examples, config.scoring_batch_size) == (32, 8)
    assert (config.scorer, config.scoring_refine) == ("fast", None)
    assert config.init_lora_weights is True and config.use_dora is False
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_valid_schedule_variants():
    steps = ALoRAConfig(allocation_start=100, allocation_end=None, allocation_interval=50)
    assert (steps.allocation_start, steps.allocation_end, steps.allocation_interval) == (100, None, 50)
    single = ALoRAConfig(allocation_rounds=1, allocation_end=None)
    assert single.allocation_rounds == 1
    assert ALoRAConfig(allocation_start=1, allocation_end=1.0).allocation_end == 1.0


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        (dict(r=4, max_r=2), "max_r"),
        (dict(r=4, max_r=4), "max_r"),
        (dict(allocation_start=0), "allocation_start"),
        (dict(allocation_end=None, allocation_interval=0), "allocation_interval"),
        (dict(allocation_start=10, allocation_end=5), "allocation_end"),
        (dict(allocation_start=0.5, allocation_end=0.2, allocation_rounds=1), "allocation_end"),
        (dict(r=0), "r"),
        (dict(r=-1), "r"),
        (dict(max_r=0), "max_r"),
        (dict(allocation_start=0.0), "allocation_start"),
        (dict(allocation_start=1.5), "allocation_start"),
        (dict(allocation_start=-3), "allocation_start"),
        (dict(allocation_end=1.5), "allocation_end"),
        (dict(allocation_end=None, allocation_interval=0.0), "allocation_interval"),
        (dict(allocation_end=0.9, allocation_interval=10), "allocation_interval"),
        (dict(allocation_end=None, allocation_interval=None), "allocation_end"),
        (dict(scorer="taylor-magic"), "scorer"),
        (dict(allocation_rounds=True), "allocation_rounds"),
        (dict(allocation_rounds=0), "allocation_rounds"),
        (dict(ranks_per_round=True), "ranks_per_round"),
        (dict(scoring_examples=True), "scoring_examples"),
        (dict(scoring_batch_size=0), "scoring_batch_size"),
        (dict(max_r=True), "max_r"),
        (dict(r=True), "r"),
        (dict(allocation_start=True), "allocation_start"),
        (dict(allocation_rounds=2.0), "allocation_rounds"),
        (dict(lora_dropout=1.0), "lora_dropout"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError) as info:
        ALoRAConfig(**kwargs)
    assert re.search(rf"\b{field_name}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        (dict(use_dora=True), "use_dora"),
        (dict(alora_invocation_tokens=[1]), "alora_invocation_tokens"),
        (dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"], nblocks=2)), "use_bdlora"),
        (dict(use_bdlora={"nblocks": 2}), "use_bdlora"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
        (dict(init_lora_weights="olora"), "init_lora_weights"),
        (dict(init_lora_weights="loftq"), "init_lora_weights"),
        (dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"),
        (dict(use_qalora=True), "use_qalora"),
        (dict(lora_bias=True), "lora_bias"),
    ],
)
def test_unsupported_lora_options_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError) as info:
        ALoRAConfig(r=4, target_modules=["q_proj"], **kwargs)
    assert field_name in str(info.value), str(info.value)


def test_own_fields_do_not_use_the_activated_lora_prefix():
    own = {f.name for f in dataclasses.fields(ALoRAConfig)} - {f.name for f in dataclasses.fields(LoraConfig)}
    assert own == {"max_r", "allocation_start", "allocation_end", "allocation_interval", "allocation_rounds",
                   "ranks_per_round", "scoring_examples", "scoring_batch_size", "scorer", "scoring_refine", "regrow_init"}
    assert not [name for name in own if name.startswith("alora")]


def test_round_trip_through_save_pretrained(tmp_path):
    config = ALoRAConfig(r=6, max_r=9, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                         allocation_start=20, allocation_end=None, allocation_interval=15, allocation_rounds=3,
                         ranks_per_round=2, scoring_examples=16, scoring_batch_size=4, init_lora_weights="gaussian")
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ALLOCATING_LORA" and raw["max_r"] == 9 and raw["allocation_interval"] == 15

    for loader in (ALoRAConfig.from_pretrained, PeftConfig.from_pretrained):
        loaded = loader(str(tmp_path))
        assert type(loaded) is ALoRAConfig
        assert loaded.peft_type is PeftType.ALLOCATING_LORA
        assert loaded.to_dict() == config.to_dict()
        assert loaded.target_modules == {"q_proj", "v_proj"}


def test_replace_moves_the_default_capacity_with_r():
    """max_r left at its default follows r through dataclasses.replace (it used to be frozen at 2 * the old r)."""
    assert dataclasses.replace(ALoRAConfig(r=4), r=16).capacity == 32
    with pytest.raises(ValueError, match="max_r"):
        dataclasses.replace(ALoRAConfig(r=4, max_r=8), r=16)

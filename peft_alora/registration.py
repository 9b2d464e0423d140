"""The only module that touches PEFT's registries.

PEFT's ``register_peft_method`` accepts only names that already exist in its closed ``PeftType``
enum, so one member is added to that enum first. Both steps are idempotent: importing
``peft_alora`` twice, or reloading it, changes nothing.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "ALLOCATING_LORA"
METHOD_NAME = PEFT_TYPE_NAME.lower()  # "allocating_lora"
PREFIX = "lora_"


def add_peft_type_member() -> PeftType:
    """Add ``PeftType.ALLOCATING_LORA`` (a ``str`` enum member) if it is not there yet."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)  # EnumType.__setattr__ forbids this
    return member


def register() -> PeftType:
    """Make ``ALoRAConfig`` / ``ALoRAModel`` known to PEFT (safe to call any number of times)."""
    from .config import ALoRAConfig
    from .model import ALoRAModel

    peft_type = add_peft_type_member()
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=METHOD_NAME, config_cls=ALoRAConfig, model_cls=ALoRAModel, prefix=PREFIX)
    elif registered is not ALoRAConfig:
        # a reload of this package: point PEFT at the fresh classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = ALoRAConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = ALoRAModel
    return peft_type

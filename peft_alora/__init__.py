"""ALoRA (Allocating Low-Rank Adaptation) as a PEFT method.

``import peft_alora`` registers the method with PEFT, so that ``get_peft_model`` and every
adapter loading path of PEFT and transformers know ``"peft_type": "ALLOCATING_LORA"``.
"""

from .allocator import RankAllocator
from .callback import ALoRACallback
from .config import ALoRAConfig
from .export import export_lora
from .layers import GatedLinear, GatedLoraMixin
from .model import ALoRAModel
from .registration import register as _register

PEFT_TYPE = _register()

__all__ = ["ALoRACallback", "RankAllocator", "ALoRAConfig", "ALoRAModel", "GatedLinear", "GatedLoraMixin", "export_lora", "PEFT_TYPE"]
__version__ = "0.1.0"

"""``ALoRAModel``: PEFT's ``LoraModel`` with gated layers, plus a model-wide view of the rank state."""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from .layers import GatedLinear, GatedLinear4bit, GatedLinear8bitLt, GatedLoraMixin


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes (0.50) from repacking CPU 4-bit weights for inference.

    It repacks on the first eval-mode forward without gradients (an evaluation, an exact scoring
    pass), and the repacked kernel has no backward: every later gradient through that layer's input
    is silently lost (seen: all q_proj gate gradients 0, training included). Targeted or not, every
    4-bit layer of the model keeps its trainable layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


class ALoRAModel(LoraModel):
    """Injects :class:`GatedLinear` (and its 4-bit / 8-bit twins) instead of LoRA's layers."""

    prefix: str = "lora_"

    _allocator_watch = None  # forward pre-hook handle until a RankAllocator attaches (or a warning was given)
    _allocator_seen = False  # once stopped, later adapters do not start watching again

    def inject_adapter(self, model, *args, **kwargs):
        super().inject_adapter(model, *args, **kwargs)
        keep_4bit_layers_differentiable(model)
        if self._allocator_watch is None and not self._allocator_seen:
            # on the base model: PeftModel.forward calls it directly, PeftModelForCausalLM through this tuner
            self._allocator_watch = model.register_forward_pre_hook(self._warn_if_training_unallocated)

    def stop_watching_for_allocator(self) -> None:
        """Remove the forward pre-hook: a RankAllocator attached, the warning was given, or the model is unloaded."""
        self._allocator_seen = True
        if self._allocator_watch is not None:
            self._allocator_watch.remove()
            self._allocator_watch = None

    def _unload_and_optionally_merge(self, *args, **kwargs):
        """``merge_and_unload`` / ``unload``: the plain model they return no longer watches for an allocator."""
        base = super()._unload_and_optionally_merge(*args, **kwargs)
        self.stop_watching_for_allocator()
        return base

    def _warn_if_training_unallocated(self, module, args):
        if module.training:
            self.stop_watching_for_allocator()  # once: a forgotten callback, not a per-step complaint
            warnings.warn(
                "ALoRA: this adapter is training with no RankAllocator attached, so no rank will be scored, pruned "
                "or regrown: it trains as a plain LoRA with r ranks per module. Add "
                "trainer.add_callback(ALoRACallback(trainer)), or build a RankAllocator and call allocator.step(step, "
                "optimizer) in your loop.", stacklevel=2)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kwargs.pop("tied_adapter", None)
        # bitsandbytes layers subclass nn.Linear: check them first
        if kwargs.get("loaded_in_4bit") and GatedLinear4bit is not None:
            import bitsandbytes as bnb

            if isinstance(base, bnb.nn.Linear4bit):
                return GatedLinear4bit(target, adapter_name, config=lora_config, **kwargs)
        if kwargs.get("loaded_in_8bit") and GatedLinear8bitLt is not None:
            import bitsandbytes as bnb

            if isinstance(base, bnb.nn.Linear8bitLt):
                eightbit = {"has_fp16_weights": base.state.has_fp16_weights, "threshold": base.state.threshold,
                            "index": base.index}
                return GatedLinear8bitLt(target, adapter_name, config=lora_config, **kwargs, **eightbit)
        if isinstance(base, torch.nn.Linear):
            if lora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True does not apply to torch.nn.Linear; using False.")
                lora_config.fan_in_fan_out = False
            return GatedLinear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, Conv1D):
            if not lora_config.fan_in_fan_out:
                warnings.warn("Target is transformers' Conv1D: setting fan_in_fan_out=True.")
                lora_config.fan_in_fan_out = True
            return GatedLinear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs)
        raise ValueError(
            f"ALoRA cannot adapt {type(base).__name__} ({target}): supported are torch.nn.Linear, "
            "transformers' Conv1D and bitsandbytes Linear4bit / Linear8bitLt. Remove it from target_modules."
        )

    def _create_and_replace(self, lora_config, adapter_name, target, *args, **kwargs):
        if isinstance(target, LoraLayer) and not isinstance(target, GatedLoraMixin):
            raise TypeError(
                f"cannot add ALoRA adapter {adapter_name!r} to {type(target).__name__}, which already holds a plain "
                "LoRA adapter: ALoRA and other LoRA adapters cannot share modules (the ALoRA adapter would silently "
                "lose its gates). Load the ALoRA adapter into a fresh copy of the base model."
            )
        return super()._create_and_replace(lora_config, adapter_name, target, *args, **kwargs)

    def add_weighted_adapter(self, *args, **kwargs):
        """Refused: PEFT's combinations read lora_A / lora_B without the gates of a reallocated adapter."""
        raise TypeError(
            "add_weighted_adapter does not support ALoRA adapters: it would combine every rank slot, gates ignored. "
            "Export each adapter with peft_alora.export_lora, load the exports as LoRA adapters "
            "(PeftModel.from_pretrained / load_adapter) and combine those."
        )

    # ---- rank-state API ---------------------------------------------------------------------

    def _adapter(self, adapter_name: str | None) -> str:
        return adapter_name or self.active_adapters[0]

    def gated_layers(self, adapter_name: str | None = None) -> Iterator[tuple[str, GatedLoraMixin]]:
        """``(module name, layer)`` for every gated layer holding ``adapter_name`` (default: active)."""
        adapter = self._adapter(adapter_name)
        for name, module in self.model.named_modules():
            if isinstance(module, GatedLoraMixin) and adapter in module.lora_gate:
                yield name, module

    def rank_state(self, adapter_name: str | None = None) -> dict[str, list[int]]:
        """Active slot indices of every gated module."""
        adapter = self._adapter(adapter_name)
        return {name: layer.active_slots(adapter) for name, layer in self.gated_layers(adapter)}

    def count_active_ranks(self, adapter_name: str | None = None) -> int:
        adapter = self._adapter(adapter_name)
        return sum(layer.num_active(adapter) for _, layer in self.gated_layers(adapter))

    def count_active_parameters(self, adapter_name: str | None = None) -> int:
        """Trainable LoRA parameters in active slots (what a compacted adapter holds, biases aside)."""
        adapter = self._adapter(adapter_name)
        return sum(layer.active_parameter_count(adapter) for _, layer in self.gated_layers(adapter))

    def get_gated_layer(self, module_name: str) -> GatedLoraMixin:
        layer = self.model.get_submodule(module_name)
        if not isinstance(layer, GatedLoraMixin):
            raise KeyError(f"{module_name!r} is not a gated ALoRA layer")
        return layer

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters in active rank slots, all parameters)``.

        PeftModel's own ``print_trainable_parameters()`` counts every allocated slot (``max_r`` per
        module, what the optimizer holds); this counts only what the adapter uses and exports.
        """
        trainable, total = PeftModel.get_nb_trainable_parameters(self)  # PEFT's count, 4-bit handling included
        for layer in self.model.modules():
            for adapter, gate in getattr(layer, "lora_gate", {}).items():
                if layer.lora_A[adapter].weight.requires_grad:
                    trainable -= (gate.numel() - layer.num_active(adapter)) * (layer.in_features + layer.out_features)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params (active ALoRA ranks): {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

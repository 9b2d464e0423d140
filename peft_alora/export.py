"""Export a trained ALoRA adapter as a stock PEFT LoRA adapter (no ``peft_alora`` needed to load it).

Per module only the active slots are kept; the gate and the fixed scale ``s`` are folded into B:

    s * B diag(g) A  ==  (s * B[:, active]) A[active, :]

The written config says ``lora_alpha == r == largest rank`` and, per module, ``rank_pattern[m] ==
alpha_pattern[m] == rank(m)``, so every module's LoRA scale is exactly 1 — in PEFT (which reads
the patterns) and in vLLM (which ignores them). Modules left with rank 0 are not targeted.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .config import alora_config_of
from .distributed import adapter_state_dict, is_sharded, world
from .layers import GatedLoraMixin

GATE_SUFFIX = ".lora_gate"
SCALE_SUFFIX = ".lora_scale"  # ALoRA's own check value; folded into B like the gate
PEFT_MODEL_PREFIX = "base_model.model."
# LoraConfig fields set by PEFT itself or describing how the adapter was matched / initialised, not what it computes
_NOT_CARRIED = {"peft_type", "peft_version", "exclude_modules", "layers_to_transform", "layers_pattern"}


def compact_lora_state_dict(model, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The stock-LoRA state dict (checkpoint keys, no adapter name) and the rank of every module.

    Entries that are not A/B/gate (``modules_to_save``, trained biases) are passed through. Keys always
    carry the ``base_model.model.`` prefix that ``PeftModel.from_pretrained`` expects, also when ``model``
    is a transformers model with the adapter loaded (its own keys lack the prefix).
    """
    # sharded parameters (FSDP2, ZeRO-3) are gathered: every process must make this call
    gathered = adapter_state_dict(model) if is_sharded(model) else None
    state = get_peft_model_state_dict(model, state_dict=gathered, adapter_name=adapter_name)
    is_peft_model = isinstance(model, PeftModel)
    if not is_peft_model:  # transformers' load_adapter / add_adapter: keys lack the prefix
        state = {PEFT_MODEL_PREFIX + k: v for k, v in state.items()}
    gate_keys = [k for k in state if k.endswith(GATE_SUFFIX)]
    if not gate_keys:
        raise ValueError(f"adapter {adapter_name!r} has no ALoRA gates: is this an ALoRA model?")
    out = {k: v for k, v in state.items() if not k.endswith((GATE_SUFFIX, SCALE_SUFFIX))}
    ranks: dict[str, int] = {}
    for gate_key in gate_keys:
        module_key = gate_key[: -len(GATE_SUFFIX)]
        layer = model.get_submodule(module_key if is_peft_model else module_key.removeprefix(PEFT_MODEL_PREFIX))
        if not isinstance(layer, GatedLoraMixin):
            raise TypeError(f"{module_key} carries a lora_gate but is not a gated ALoRA layer")
        active = torch.nonzero(state[gate_key] > 0).flatten()
        a_key, b_key = f"{module_key}.lora_A.weight", f"{module_key}.lora_B.weight"
        weight_a, weight_b = out.pop(a_key), out.pop(b_key)
        spare = range(layer.capacity(adapter_name) - layer.r_init[adapter_name])
        spare_a = [out.pop(f"{module_key}.lora_A_spare.{index}") for index in spare]  # slot numbers run over both
        spare_b = [out.pop(f"{module_key}.lora_B_spare.{index}") for index in spare]  # banks (layers.py)
        weight_a, weight_b = torch.cat([weight_a, *spare_a]), torch.cat([weight_b, *spare_b], dim=1)
        name = module_key.removeprefix(PEFT_MODEL_PREFIX)
        ranks[name] = int(active.numel())
        if active.numel() == 0:
            if any(k.startswith(module_key + ".") for k in out):  # e.g. its trained bias (bias="lora_only"/"all")
                # stay targeted, so the stock loader finds those entries, with one rank that adds exactly zero
                ranks[name] = 1
                out[a_key] = torch.zeros_like(weight_a[:1])
                out[b_key] = torch.zeros_like(weight_b[:, :1])
            continue
        scale = layer.scaling[adapter_name]
        out[a_key] = weight_a[active].contiguous()
        out[b_key] = (weight_b[:, active].float() * scale).to(weight_b.dtype).contiguous()
    return out, ranks


def export_lora(model, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` of a stock LoRA adapter to ``path``.

    ``model`` is a ``PeftModel`` (or a transformers model with the adapter loaded) holding an
    ALoRA adapter. Returns the folder. Under several processes every process calls it (sharded
    weights are gathered) and process 0 writes.
    """
    config = alora_config_of(model, adapter_name, "export_lora", "a plain PEFT adapter needs no export: save it "
                             "with model.save_pretrained(path).")
    state, ranks = compact_lora_state_dict(model, adapter_name)
    kept = {name: rank for name, rank in ranks.items() if rank > 0}
    if not kept:
        raise ValueError(f"adapter {adapter_name!r} has no active rank left in any module: nothing to export.")
    largest = max(kept.values())
    # every LoRA setting carries over (bias, modules_to_save, trainable_token_indices, ...); only the ranks and
    # scales are rewritten, so that nothing the model computes with is left out of the export
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig)
                if f.init and f.name not in _NOT_CARRIED}
    settings.update(r=largest, lora_alpha=largest, rank_pattern=dict(kept), alpha_pattern=dict(kept),
                    target_modules=sorted(kept), use_rslora=False, init_lora_weights=True, inference_mode=True)
    lora_config = LoraConfig(**settings)
    out_dir = Path(path)
    if world()[1] != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir

"""Gated LoRA layers: PEFT's LoRA layers with ``max_r`` rank slots and a 0/1 gate per slot.

    h = W0 x + s * B diag(g) A x,        s = lora_alpha / r_init (fixed)

The slots sit in two banks: slots ``0 .. r_init-1`` in PEFT's own ``lora_A`` / ``lora_B``, the
spare slots ``r_init .. max_r-1`` in ``lora_A_spare`` / ``lora_B_spare``, one parameter per slot
(``SpareSlots``: an A row, a B column). Rounds grow into the lowest free slot, so the spare slots
ever grown are the first ``spare_slots_used`` of them. In one process the forward leaves the others
out: a spare slot gets no gradient and AdamW keeps no moments for it until a round grows it
(docs/benchmarks.md, "Spare slots, one parameter each"); until then the module is a plain rank-r
LoRA. Under ``torch.distributed`` every spare slot takes part and adds exact zeros while unused,
since DDP's default, FSDP and ZeRO-3 expect every parameter in every step. The slots in the forward
run as one matmul per side (``GatedLora``), as the one-bank layout did. Spare slots hold zeros until
grown, so both ways train the same (``optim_state.start_bank_state`` gives a joining slot the
optimizer state it would have had). Slot numbers run over both banks; ``slot_weights`` and
``slot_parameters`` map them.

The gate lives in ``lora_gate[adapter]`` (fp32 buffer, saved with the adapter). Everything else
(forward plumbing, dtype casts, merge/unmerge of plain, 4-bit and 8-bit weights, disable,
multi-adapter) is PEFT's own code: the gate enters through PEFT's ``LoraVariant`` hook, which
LoRA's layers call for forward, merge and unmerge.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose

from .config import ALoRAConfig
from .distributed import assign, full

SPARE_NAMES = ("lora_A_spare", "lora_B_spare")


class GatedVariant(LoraVariant):
    """Forward and merge of a gated adapter; PEFT calls these from its LoRA layers."""

    def supports_lora_conversion(self) -> bool:
        return False  # use peft_alora.export_lora instead

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:
        pass  # the gate is created in GatedLoraMixin.update_layer, after PEFT's own set-up

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        if not torch.is_autocast_enabled(x.device.type):
            # under autocast the adapter's matmuls take their inputs in the autocast dtype anyway; a copy of
            # x in fp32 here (PEFT's own 4-bit and 8-bit paths skip it under CUDA autocast) made every
            # QLoRA module write and read its input twice more
            x = module._cast_input_dtype(x, lora_A.weight.dtype)
        x = dropout(x)
        scaling = module.scaling[active_adapter]
        gate = module.lora_gate[active_adapter]
        used = module.spare_slots_used(active_adapter)
        zero3 = hasattr(lora_A.weight, "ds_id")  # ZeRO-3 gathers a weight only for its own module's forward/backward
        if used and not zero3:  # the main bank and the spare slots in use, as one LoRA
            spare_a, spare_b = module.lora_A_spare[active_adapter], module.lora_B_spare[active_adapter]
            out = GatedLora.apply(x, gate[: module.r_init[active_adapter] + used], used + 1, lora_A.weight,
                                  *spare_a.slots(used), lora_B.weight, *spare_b.slots(used))
        else:
            hidden = lora_A(x)
            out = lora_B(hidden * gate[: hidden.shape[-1]].to(hidden.dtype))
        if active_adapter in module.lora_A_spare and _several_processes():
            # DDP, FSDP and ZeRO-3 expect every parameter in every step: the spare slots not yet in the forward take
            # part too, apart, adding exact zeros (so that the slots in use compute as in one process)
            spare_a, spare_b = module.lora_A_spare[active_adapter], module.lora_B_spare[active_adapter]
            if zero3:  # every spare slot, through its module
                out = out + spare_b(spare_a(x) * gate[module.r_init[active_adapter]:].to(out.dtype))
            elif used < len(spare_a):
                rest = len(spare_a) - used
                out = out + GatedLora.apply(x, gate[gate.numel() - rest:], rest, *spare_a.slots()[used:],
                                            *spare_b.slots()[used:])
        return result + out * scaling


class GatedLora(torch.autograd.Function):
    """``F.linear(F.linear(x, cat(a_parts)) * gate, cat(b_parts, dim=1))``: the gated LoRA path over the main bank
    and spare slots, one matmul per side, in one autograd node that keeps the parts for the backward, not their
    joined copies.

    One matmul per side costs what the one-bank layout's did (several smaller ones cost more on a CPU), and
    rounds the same under autocast. The backward computes as autograd does for those three operations, in the
    dtype the forward's matmuls ran in (autocast's), and returns each part's share of the weight gradient, and
    the gate's gradient when the gates are leaves (the fast scorer's gradient pass).
    """

    @staticmethod
    def forward(ctx, x, gate, n_a, *parts):
        hidden = torch.nn.functional.linear(x, torch.cat(parts[:n_a]))
        out = torch.nn.functional.linear(hidden * gate.to(hidden.dtype), torch.cat(parts[n_a:], dim=1))
        ctx.save_for_backward(x, hidden, gate, *parts)
        ctx.n_a = n_a
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, gate, *parts = ctx.saved_tensors
        a_parts, b_parts = parts[: ctx.n_a], parts[ctx.n_a:]
        gate_cast = gate.to(hidden.dtype)
        dtype = grad_out.dtype
        grad_2d, gated = grad_out.reshape(-1, grad_out.shape[-1]), hidden * gate_cast
        grad_b = (grad_2d.t() @ gated.reshape(-1, gated.shape[-1]).to(dtype)).split([b.shape[1] for b in b_parts], 1)
        grad_gated = (grad_out @ torch.cat(b_parts, dim=1).to(dtype)).to(gated.dtype)
        grad_gate = (grad_gated * hidden).sum_to_size(gate_cast.shape).to(gate.dtype) \
            if ctx.needs_input_grad[1] else None
        grad_hidden = grad_gated * gate_cast
        hidden_2d, dtype = grad_hidden.reshape(-1, grad_hidden.shape[-1]), grad_hidden.dtype
        grad_a = (hidden_2d.t() @ x.reshape(-1, x.shape[-1]).to(dtype)).split([a.shape[0] for a in a_parts])
        grad_x = (grad_hidden @ torch.cat(a_parts).to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grads = [g.to(p.dtype) for g, p in zip(grad_a + grad_b, parts)]
        return grad_x, grad_gate, None, *grads


class SpareSlots(torch.nn.Module):
    """The spare slots of one bank, one parameter each: A rows (1 x in, ``dim=0``) or B columns (out x 1,
    ``dim=1``), saved as ``<bank>.<adapter>.<slot>``. One parameter per slot, so that a slot a round never grew
    has no gradient and no optimizer state. Called as a module (ZeRO-3 gathers its parameters around that),
    it applies all its slots joined."""

    def __init__(self, count: int, shape: tuple[int, int], dim: int, like: torch.nn.Parameter):
        super().__init__()
        self.dim = dim
        device = "meta" if like.device.type == "meta" else like.device  # low_cpu_mem_usage: PEFT builds on meta
        for index in range(count):
            slot = torch.zeros(shape, dtype=like.dtype, device=device)
            self.register_parameter(str(index), torch.nn.Parameter(slot, requires_grad=like.requires_grad))

    def __len__(self) -> int:
        return len(self._parameters)

    def __getitem__(self, index: int) -> torch.nn.Parameter:
        return self._parameters[str(index)]

    def slots(self, count: Optional[int] = None) -> list[torch.nn.Parameter]:
        return [self[index] for index in range(len(self) if count is None else count)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, torch.cat(self.slots(), dim=self.dim))

    def extra_repr(self) -> str:
        return f"{len(self)} slots of {tuple(self[0].shape)}" if len(self) else "no slots"


def _several_processes() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _version_of(tensor: torch.Tensor) -> Optional[int]:
    """How often ``tensor`` was written in place (None for an inference-mode tensor, which keeps no count)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _slots_used(spare_gates: torch.Tensor, spare_rows) -> int:
    """How many spare slots, counted from the first, reach the last one ever grown: a slot that is on, or whose A
    row is not zero (see GatedLoraMixin.spare_slots_used). ``spare_rows``: the A row of each slot, or None."""
    for index in reversed(range(len(spare_rows))):
        row = spare_rows[index]
        if bool(spare_gates[index] != 0) or (row is not None and bool((row != 0).any())):
            return index + 1
    return 0


def fresh_a_row(in_features: int, init_lora_weights, r_init: int, generator=None, device=None, dtype=None):
    """One new row of A, drawn as PEFT draws a fresh LoRA A (kaiming-uniform, or gaussian std 1/r)."""
    row = torch.empty(1, in_features, device="cpu", dtype=torch.float32)
    if init_lora_weights == "gaussian":
        row.normal_(0.0, 1.0 / r_init, generator=generator)
    else:
        torch.nn.init.kaiming_uniform_(row, a=math.sqrt(5), generator=generator)
    return row.to(device=device, dtype=dtype)


class GatedLoraMixin:
    """Adds rank slots, the gate and the rank-state API to a PEFT LoRA layer class."""

    # the spare bank is listed with PEFT's A and B, so that PEFT moves, casts, freezes and deletes it with them
    adapter_layer_names = LoraLayer.adapter_layer_names + SPARE_NAMES
    # per-adapter state besides LoRA's own; listed so that PEFT's delete_adapter removes it too
    other_param_names = LoraLayer.other_param_names + ("lora_gate", "lora_scale", "r_init", "init_lora_weights",
                                                       "spare_in_use", "_spare_seen")

    def resolve_lora_variant(self, *, config, **kwargs) -> Optional[LoraVariant]:
        return GatedVariant()

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        if not isinstance(config, ALoRAConfig):
            raise TypeError(
                f"adapter {adapter_name!r} ({type(config).__name__}) cannot be added to a module that holds an ALoRA "
                "adapter: ALoRA and other LoRA adapters cannot share modules. Use ALoRAConfig for every adapter of "
                "this model, or load the other adapter into a fresh copy of the base model."
            )
        if not hasattr(self, "lora_gate"):
            self.lora_gate = BufferDict(persistent=True)
            self.lora_scale = BufferDict(persistent=True)
            self.lora_A_spare = torch.nn.ModuleDict()
            self.lora_B_spare = torch.nn.ModuleDict()
            self.r_init = {}
            self.init_lora_weights = {}
            self.spare_in_use = {}
            self._spare_seen = {}  # adapter -> the tensors spare_in_use was derived from, and their versions
        r_init = r
        capacity = config.capacity
        random_state = torch.random.get_rng_state()
        # PEFT builds the main bank: r_init slots, scaled as a rank-r_init LoRA
        super().update_layer(adapter_name, r_init, lora_alpha=lora_alpha, config=config, **kwargs)
        self.r_init[adapter_name] = r_init
        self.init_lora_weights[adapter_name] = config.init_lora_weights
        self._draw_as_one_bank(adapter_name, capacity, random_state)
        self._add_spare_bank(adapter_name, capacity - r_init)
        # on the base layer's device, never on "meta" (low_cpu_mem_usage builds A and B there, and PEFT then
        # moves every lora_* submodule without meta parameters: a meta buffer cannot be moved)
        device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        gate = torch.zeros(capacity, dtype=torch.float32, device=device)
        gate[:r_init] = 1.0
        self.lora_gate[adapter_name] = gate
        # saved with the weights, so that a load can tell when r / lora_alpha in adapter_config.json were changed
        self.lora_scale[adapter_name] = torch.tensor([self.scaling[adapter_name]], dtype=torch.float32, device=device)

    @torch.no_grad()
    def _draw_as_one_bank(self, adapter: str, capacity: int, random_state: torch.Tensor) -> None:
        """Redraw the main bank from ``random_state`` (taken before PEFT drew it) as the first r_init of
        ``capacity`` slots, drawn the way PEFT 0.21 draws a LoRA of that rank (``nn.Linear``'s own init of A
        and B, then ``reset_lora_parameters``). peft_alora kept all slots in one bank before, so a seed gives
        the same adapter and the same run as it did then, and the random stream goes on as it did."""
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if weight_a.device.type == "meta":
            return  # low_cpu_mem_usage: nothing was drawn, the weights come from a file
        r_init, init = self.r_init[adapter], self.init_lora_weights[adapter]
        torch.random.set_rng_state(random_state)
        draw_a, draw_b = torch.empty(capacity, self.in_features), torch.empty(self.out_features, capacity)
        torch.nn.init.kaiming_uniform_(draw_a, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(draw_b, a=math.sqrt(5))
        if init == "gaussian":  # PEFT drew std 1 / capacity, then the old layer redrew with 1 / r (a rank-r LoRA's)
            draw_a.normal_(0.0, 1.0 / capacity)
            draw_a.normal_(0.0, 1.0 / r_init)
        elif init is not False:
            torch.nn.init.kaiming_uniform_(draw_a, a=math.sqrt(5))
        weight_a.copy_(draw_a[:r_init])
        if init is False:  # PEFT's "no init": B keeps nn.Linear's draw
            weight_b.copy_(draw_b[:, :r_init])

    def _add_spare_bank(self, adapter: str, slots: int) -> None:
        """The spare slots, on the main bank's device, dtype and trainability, all zero: a slot gets its A row when
        it is grown, and a zero slot stays zero under weight decay, trained in the forward or not."""
        self.spare_in_use[adapter] = 0
        if slots <= 0:
            return
        self.lora_A_spare[adapter] = SpareSlots(slots, (1, self.in_features), 0, self.lora_A[adapter].weight)
        self.lora_B_spare[adapter] = SpareSlots(slots, (self.out_features, 1), 1, self.lora_B[adapter].weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for adapter in self.lora_gate:
            if f"{prefix}lora_A.{adapter}.weight" in state_dict:  # this load carries weights of `adapter`
                self._split_older_layouts(state_dict, prefix, adapter)
                self._check_loaded_adapter(state_dict, prefix, adapter)
                gate = state_dict[f"{prefix}lora_gate.{adapter}"][self.r_init[adapter]:]
                rows = [state_dict.get(f"{prefix}lora_A_spare.{adapter}.{index}") for index in range(gate.numel())]
                self.spare_in_use[adapter] = _slots_used(gate, rows)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _split_older_layouts(self, state_dict, prefix, adapter: str) -> None:
        """Adapters saved by earlier versions: all ``max_r`` slots in ``lora_A`` / ``lora_B`` (one bank), or the
        spare slots in one ``lora_A_spare`` / ``lora_B_spare`` weight each (two banks). Their spare rows (A) and
        columns (B) become the entries of one parameter per slot."""
        if adapter not in self.lora_A_spare or f"{prefix}lora_A_spare.{adapter}.0" in state_dict:
            return  # no spare slots, or the current layout (the shape checks report any mix)
        main = self.r_init[adapter]
        keys = {bank: f"{prefix}{bank}.{adapter}.weight" for bank in ("lora_A", "lora_B", *SPARE_NAMES)}
        for bank in SPARE_NAMES:  # PEFT's loader names only the keys the model has: here without the adapter
            if f"{prefix}{bank}.weight" in state_dict and keys[bank] not in state_dict:
                keys[bank] = f"{prefix}{bank}.weight"
        if keys["lora_A_spare"] in state_dict and keys["lora_B_spare"] in state_dict:
            spare_a, spare_b = state_dict.pop(keys["lora_A_spare"]), state_dict.pop(keys["lora_B_spare"])
        elif state_dict[keys["lora_A"]].shape[0] == self.capacity(adapter) and keys["lora_B"] in state_dict:
            weight_a, weight_b = state_dict[keys["lora_A"]], state_dict[keys["lora_B"]]
            state_dict[keys["lora_A"]], spare_a = weight_a[:main].contiguous(), weight_a[main:]
            state_dict[keys["lora_B"]], spare_b = weight_b[:, :main].contiguous(), weight_b[:, main:]
        else:
            return
        for index in range(spare_a.shape[0]):
            state_dict[f"{prefix}lora_A_spare.{adapter}.{index}"] = spare_a[index:index + 1].clone()
            state_dict[f"{prefix}lora_B_spare.{adapter}.{index}"] = spare_b[:, index:index + 1].clone()

    def _check_loaded_adapter(self, state_dict, prefix, adapter: str) -> None:
        """Refuse adapter files whose gates are missing or not 0/1, or whose scale disagrees with the config."""
        where = prefix.removeprefix("base_model.model.").rstrip(".")
        gate = state_dict.get(f"{prefix}lora_gate.{adapter}")
        if gate is None:
            raise ValueError(
                f"the adapter weights of {where} have no lora_gate: an ALoRA adapter file carries its gates (the "
                "allocation); without them it would silently restart from the first r slots. Load a file written "
                "by save_pretrained of an ALoRA model (a stock LoRA export loads with peft.LoraConfig instead)."
            )
        capacity = self.lora_gate[adapter].numel()
        if gate.shape != (capacity,):
            raise ValueError(
                f"lora_gate of {where} has shape {tuple(gate.shape)}, but the config gives {capacity} slots (max_r): "
                "adapter_config.json does not match these weights; restore its r / max_r."
            )
        gate = gate.float()
        if not bool(torch.isfinite(gate).all()) or not bool(((gate == 0) | (gate == 1)).all()):
            bad = sorted({float(v) for v in gate[(gate != 0) & (gate != 1)].tolist()})
            raise ValueError(f"lora_gate of {where} holds values other than 0 and 1 ({bad}): the adapter file is "
                             "damaged or was edited; gates are on/off switches.")
        scale = state_dict.get(f"{prefix}lora_scale.{adapter}")
        if scale is None:
            warnings.warn(f"ALoRA: the adapter weights of {where} carry no lora_scale (saved by an older "
                          "peft_alora): r and lora_alpha of adapter_config.json cannot be checked against them.")
        elif not math.isclose(float(scale.reshape(-1)[0]), self.scaling[adapter], rel_tol=1e-6):
            raise ValueError(
                f"the weights of {where} were trained with the scale {float(scale.reshape(-1)[0]):g} "
                f"(lora_alpha / r), but adapter_config.json gives {self.scaling[adapter]:g}: restore the original "
                "r, lora_alpha and use_rslora in adapter_config.json."
            )

    def _move_adapter_to_device_of_base_layer(self, adapter_name, device=None):
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        for buffers in (getattr(self, "lora_gate", None), getattr(self, "lora_scale", None)):
            if buffers is not None and adapter_name in buffers and buffers[adapter_name].dtype != torch.float32:
                buffers[adapter_name] = buffers[adapter_name].float()  # gates and scales stay fp32 whatever the base

    def get_delta_weight(self, adapter) -> torch.Tensor:
        weight_A, weight_B = self.slot_weights(adapter, gather=False)
        dtype = weight_B.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        gate = self.lora_gate[adapter].to(weight_A.device, compute)
        delta = (weight_B.to(compute) * gate) @ weight_A.to(compute)
        delta = transpose(delta, getattr(self, "fan_in_fan_out", False)) * self.scaling[adapter]
        return delta.to(dtype)

    # ---- rank-state API (used by the allocator) -------------------------------------------

    def capacity(self, adapter: str) -> int:
        return self.lora_gate[adapter].numel()

    def spare_slots_used(self, adapter: str) -> int:
        """How many spare slots the forward takes in one process: the first ones up to the last that was ever
        grown (rounds grow the lowest free slot, so these are the slots grown so far, pruned ones included).

        A slot that was ever grown has a nonzero A row (drawn fresh, it only decays afterwards), so the
        weights themselves record it, in checkpoints too. The count is raised by ``activate_slot`` and set
        by loads through PEFT; in one process, gates or weights written any other way (transformers'
        ``load_adapter`` sets them directly) are looked at once per change, and the count never drops.
        """
        if adapter not in self.lora_A_spare:
            return 0
        used, bank = self.spare_in_use[adapter], self.lora_A_spare[adapter]
        if used == len(bank) or _several_processes():
            return used  # several processes: the count comes from rounds and loads alone, the same in every process
        # only the slots not yet counted can raise the count; they get no gradient in one process, so their
        # versions change only when a round or a load writes them
        watched = (self.lora_gate[adapter], *bank.slots()[used:])
        versions = tuple(_version_of(t) for t in watched)
        seen = self._spare_seen.get(adapter)
        if seen is None or len(seen[0]) != len(watched) or any(a is not b for a, b in zip(seen[0], watched)) \
                or seen[1] != versions:
            more = _slots_used(watched[0][self.r_init[adapter] + used:], watched[1:])
            self.spare_in_use[adapter] = used + more
            self._spare_seen[adapter] = (watched, versions)
        return self.spare_in_use[adapter]

    def slot_weights(self, adapter: str, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """A (max_r x in) and B (out x max_r) of every slot, both banks joined (a copy when there are spare
        slots); ``gather``: sharded parameters are gathered first (a collective under FSDP / ZeRO-3)."""
        take = full if gather else (lambda tensor: tensor)
        weight_a, weight_b = take(self.lora_A[adapter].weight), take(self.lora_B[adapter].weight)
        if adapter in self.lora_A_spare:
            rows = [take(row).to(weight_a.device) for row in self.lora_A_spare[adapter].slots()]
            columns = [take(column).to(weight_b.device) for column in self.lora_B_spare[adapter].slots()]
            weight_a, weight_b = torch.cat([weight_a, *rows]), torch.cat([weight_b, *columns], dim=1)
        return weight_a, weight_b

    def slot_parameters(self, adapter: str, slot: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter, int]:
        """The A and B parameters that hold ``slot``, and the slot's index in them (0 for a spare slot)."""
        main = self.r_init[adapter]  # not the weight's shape: a ZeRO-3 parameter is empty between forwards
        if slot < main:
            return self.lora_A[adapter].weight, self.lora_B[adapter].weight, slot
        return self.lora_A_spare[adapter][slot - main], self.lora_B_spare[adapter][slot - main], 0

    def active_slots(self, adapter: str) -> list[int]:
        return torch.nonzero(self.lora_gate[adapter] > 0).flatten().tolist()

    def num_active(self, adapter: str) -> int:
        return int((self.lora_gate[adapter] > 0).sum().item())

    def active_parameter_count(self, adapter: str) -> int:
        return self.num_active(adapter) * (self.in_features + self.out_features)

    def _check_unmerged(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged into the base weights: changing its gates now would "
                             "make unmerge_adapter() subtract the wrong delta. Call unmerge_adapter() first.")

    def deactivate_slot(self, adapter: str, slot: int) -> None:
        self._check_unmerged(adapter)
        gate = self.lora_gate[adapter]
        if gate[slot] == 0:
            raise ValueError(f"slot {slot} of adapter {adapter!r} is already inactive")
        gate[slot] = 0.0

    @torch.no_grad()
    def activate_slot(self, adapter: str, slot: int, generator: Optional[torch.Generator] = None,
                      direction: Optional[torch.Tensor] = None) -> None:
        """Switch a slot on as a fresh rank: new A row, zero B column, gate 1 (output unchanged).

        ``direction`` (a unit vector of length ``in_features``), when given, is where the new A row
        points; it keeps the norm of the random row it replaces (see ``peft_alora.regrowth``)."""
        self._check_unmerged(adapter)
        gate = self.lora_gate[adapter]
        if gate[slot] != 0:
            raise ValueError(f"slot {slot} of adapter {adapter!r} is already active")
        weight_A, weight_B, index = self.slot_parameters(adapter, slot)
        row = fresh_a_row(self.in_features, self.init_lora_weights.get(adapter, True), self.r_init[adapter],
                          generator=generator)[0]
        if direction is not None:
            row = direction.to(row) * row.norm()
        assign(weight_A, index, row.to(device=weight_A.device, dtype=weight_A.dtype))
        assign(weight_B, (slice(None), index), 0.0)
        gate[slot] = 1.0
        if slot >= self.r_init[adapter]:
            self.spare_in_use[adapter] = max(self.spare_in_use[adapter], slot - self.r_init[adapter] + 1)


class GatedLinear(GatedLoraMixin, lora_layer.Linear):
    """Gated LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (``fan_in_fan_out=True``)."""


def _bnb_classes():
    """Gated 4-bit / 8-bit layers, or ``(None, None)`` when bitsandbytes is not importable."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    gated_8bit = gated_4bit = None
    if is_bnb_available():
        from peft.tuners.lora.bnb import Linear8bitLt

        class GatedLinear8bitLt(GatedLoraMixin, Linear8bitLt):
            """Gated LoRA on a bitsandbytes 8-bit linear layer."""

        gated_8bit = GatedLinear8bitLt
    if is_bnb_4bit_available():
        from peft.tuners.lora.bnb import Linear4bit

        class GatedLinear4bit(GatedLoraMixin, Linear4bit):
            """Gated LoRA on a bitsandbytes 4-bit (QLoRA) linear layer."""

        gated_4bit = GatedLinear4bit
    return gated_8bit, gated_4bit


GatedLinear8bitLt, GatedLinear4bit = _bnb_classes()

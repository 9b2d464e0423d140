"""Gated layers, the rank-state API and generic PEFT-method behaviour (issue #2, points 4, 5 and 8).

Parametrised over the four layer kinds ALoRA adapts: ``nn.Linear`` (tiny Llama), transformers'
``Conv1D`` (tiny GPT-2), bitsandbytes 4-bit and 8-bit linear layers (tiny Llama loaded quantized).
"""

import math

import bitsandbytes as bnb
import pytest
import torch
from conftest import (
    BASE_KINDS,
    alora_config,
    load_base,
    logits_of,
    make_ranks_unequal,
    make_tiny_gpt2,
    make_tiny_llama,
    random_batch,
    randomize_lora_b,
    train_steps,
)
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

import peft_alora
from peft_alora.layers import GatedLinear, GatedLinear4bit, GatedLinear8bitLt, GatedLora


pytestmark = pytest.mark.usefixtures("torch_single_thread")

GATED_CLASS = {"linear": GatedLinear, "conv1d": GatedLinear, "4bit": GatedLinear4bit, "8bit": GatedLinear8bitLt}
BASE_CLASS = {"linear": torch.nn.Linear, "conv1d": Conv1D, "4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
# |merged - unmerged| on the logits. Quantized merges requantize W + dW, so they carry the quantization
# error of the merged weight; the bounds are what stock peft LoRA gives on the same models (see
# test_quantized_merge_error_is_that_of_stock_lora), with a margin: measured 4-bit 0.070, 8-bit 0.009.
MERGE_ATOL = {"linear": 1e-5, "conv1d": 1e-5, "4bit": 0.15, "8bit": 0.03}


@pytest.fixture
def build(tiny_llama_dir, tiny_gpt2_dir):
    """``build(kind, **config)``: a PeftModel with an ALoRA adapter (r=4, max_r=8, alpha=8) on a base of that kind."""

    def _build(kind, seed=0, **config):
        torch.manual_seed(seed)
        return get_peft_model(load_base(kind, tiny_llama_dir, tiny_gpt2_dir), alora_config(**config))

    return _build


def _weights(layer, adapter="default"):
    """A and B of every slot (a copy joining both banks) and the gate."""
    return (*layer.slot_weights(adapter), layer.lora_gate[adapter])


def _banks(layer, adapter="default"):
    """(A, B) parameters of the main bank, then of each spare slot."""
    main = [(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)]
    if adapter not in layer.lora_A_spare:
        return main
    return main + list(zip(layer.lora_A_spare[adapter].slots(), layer.lora_B_spare[adapter].slots()))


def _joined_grads(layer, adapter="default"):
    """Gradients of A and B of every slot; a slot without a gradient (left out of the forward) reads as zeros."""
    grads = [[w.grad if w.grad is not None else torch.zeros_like(w) for w in bank] for bank in _banks(layer, adapter)]
    return torch.cat([a for a, _ in grads]), torch.cat([b for _, b in grads], dim=1)


# ---- the gated forward ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BASE_KINDS)
def test_layers_are_gated_with_max_r_slots(build, kind):
    model = build(kind)
    layers = dict(model.base_model.gated_layers())
    assert len(layers) == (14 if kind != "conv1d" else 8)
    for name, layer in layers.items():
        assert type(layer) is GATED_CLASS[kind]
        assert isinstance(layer.get_base_layer(), BASE_CLASS[kind])
        weight_a, weight_b, gate = _weights(layer)
        assert weight_a.shape == (8, layer.in_features) and weight_b.shape == (layer.out_features, 8)
        assert gate.dtype == torch.float32 and gate.tolist() == [1.0] * 4 + [0.0] * 4
        assert layer.capacity("default") == 8 and layer.active_slots("default") == [0, 1, 2, 3]
        assert layer.scaling["default"] == 2.0 and layer.r["default"] == 4
        assert torch.count_nonzero(weight_b) == 0  # LoRA init: B = 0
    assert model.base_model.count_active_ranks() == 4 * len(layers)


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_forward_is_base_plus_scaled_gated_lora(build, kind):
    model = build(kind, r=4, lora_alpha=6)
    randomize_lora_b(model, std=0.05)
    make_ranks_unequal(model)
    scale = 6 / 4  # lora_alpha / r, whatever the number of active ranks
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in model.base_model.gated_layers():
            x = torch.randn(2, 3, layer.in_features, generator=generator)
            weight_a, weight_b, gate = _weights(layer)
            expected = layer.get_base_layer()(x) + scale * ((x @ weight_a.T) * gate) @ weight_b.T
            got = layer(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=name)
            if gate.sum() > 0:
                assert (got - layer.get_base_layer()(x)).abs().max() > 1e-3, name


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_inactive_slots_get_exactly_zero_gradient(build, kind):
    model = build(kind)
    randomize_lora_b(model, std=0.05)
    make_ranks_unequal(model)
    model.train()
    x = random_batch()
    model(input_ids=x, labels=x).loss.backward()
    for name, layer in model.base_model.gated_layers():
        _, _, gate = _weights(layer)
        grad_a, grad_b = _joined_grads(layer)
        off, on = gate == 0, gate > 0
        assert torch.count_nonzero(grad_a[off]) == 0, name
        assert torch.count_nonzero(grad_b[:, off]) == 0, name
        assert gate.grad is None and not gate.requires_grad
        if on.any():
            assert grad_a[on].abs().sum() > 0 and grad_b[:, on].abs().sum() > 0, name
        # one process: a spare slot never grown stays out of the forward, so it has no gradient at all; rounds grow
        # the lowest free slot, so the slots in the forward are the first ones up to the last active one
        spare_on = torch.nonzero(on[layer.r_init["default"]:]).flatten().tolist()
        assert layer.spare_slots_used("default") == (spare_on[-1] + 1 if spare_on else 0), name
        for index, (a, b) in enumerate(_banks(layer)[1:]):
            assert (a.grad is None and b.grad is None) == (index >= layer.spare_slots_used("default")), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["linear", "conv1d"])
def test_half_precision_forward_is_finite_and_close(make, dtype):
    x = random_batch()
    full = get_peft_model(make(), alora_config())
    randomize_lora_b(full, std=0.05)
    make_ranks_unequal(full)
    half = get_peft_model(make().to(dtype), alora_config())
    half.load_state_dict(full.state_dict(), strict=False)  # same adapter weights and gates
    for _, layer in half.base_model.gated_layers():
        assert layer.lora_gate["default"].dtype == torch.float32
    for name, layer in full.base_model.gated_layers():
        torch.testing.assert_close(half.base_model.get_gated_layer(name).lora_gate["default"],
                                   layer.lora_gate["default"], rtol=0, atol=0)
    with torch.no_grad():
        out = half(input_ids=x).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), logits_of(full, x), rtol=0, atol=0.05)


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_under_autocast_the_adapter_input_is_not_copied_to_fp32(build, kind):
    """The fp32 adapter's matmuls run in bf16 under autocast anyway: an fp32 copy of x (what PEFT's own 4-bit
    path skips under CUDA autocast) only costs memory traffic. The output is the same bits either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from peft_alora.layers import GatedVariant

    class FloatCopies(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.seen = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == self.shape:
                self.seen += 1
            return out

    model = build(kind)
    randomize_lora_b(model, std=0.05)
    make_ranks_unequal(model)
    layer = next(layer for _, layer in sorted(model.base_model.gated_layers())
                 if layer.lora_B["default"].weight.abs().sum() > 0 and layer.lora_gate["default"].sum() > 0)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    result = torch.zeros(2, 5, layer.out_features, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with FloatCopies(tuple(x.shape)) as copies:
            out = GatedVariant.forward(layer, "default", x, result)
        from_fp32 = GatedVariant.forward(layer, "default", x.float(), result)
    assert copies.seen == 0
    assert out.dtype == torch.bfloat16 and out.abs().sum() > 0
    assert torch.equal(out, from_fp32)


# ---- merge / unmerge / unload / disable --------------------------------------------------------

def _adapted(build, kind, seed=0):
    model = build(kind, seed=seed)
    randomize_lora_b(model, std=0.05, seed=seed)
    make_ranks_unequal(model, seed=seed)
    return model


@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("kind", BASE_KINDS)
def test_merge_and_unmerge_agree_with_unmerged_forward(build, kind, safe_merge):
    x = random_batch()
    model = _adapted(build, kind)
    # reference: the unmerged forward of an identically built model (a 4-bit model must see no forward
    # before its merge: bitsandbytes repacks 4-bit weights on the CPU after the first one)
    twin = _adapted(build, kind)
    expected = logits_of(twin, x)
    with twin.disable_adapter():
        base = logits_of(twin, x)
    assert (expected - base).abs().max() > 0.1

    model.merge_adapter(safe_merge=safe_merge)
    assert all(layer.merged for _, layer in model.base_model.gated_layers())
    merged = logits_of(model, x)
    torch.testing.assert_close(merged, expected, rtol=0, atol=MERGE_ATOL[kind])
    if kind == "4bit":
        return  # unmerge after a CPU forward dequantizes repacked weights (docs/design.md, decision 10)
    model.unmerge_adapter()
    assert not any(layer.merged for _, layer in model.base_model.gated_layers())
    torch.testing.assert_close(logits_of(model, x), expected, rtol=0, atol=MERGE_ATOL[kind])


def test_four_bit_merge_requantizes_exactly_the_gated_delta(build):
    model = _adapted(build, "4bit")
    expected = {}
    for name, layer in model.base_model.gated_layers():
        weight_a, weight_b, gate = _weights(layer)
        weight = layer.get_base_layer().weight
        w0 = dequantize_4bit(weight.data, weight.quant_state)
        delta = 2.0 * (weight_b * gate) @ weight_a  # s = lora_alpha / r = 8 / 4
        packed, state = quantize_4bit(w0 + delta, blocksize=weight.quant_state.blocksize,
                                      quant_type=weight.quant_state.quant_type)
        expected[name] = dequantize_4bit(packed, state)
    model.merge_adapter()
    for name, layer in model.base_model.gated_layers():
        weight = layer.get_base_layer().weight
        merged = dequantize_4bit(weight.data, weight.quant_state)
        torch.testing.assert_close(merged, expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_merge_error_is_that_of_stock_lora(build, kind, tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    """The same effective adapter as stock LoRA (the export) merges to the same logits, with the same error."""
    x = random_batch()
    model = _adapted(build, kind)
    peft_alora.export_lora(model, tmp_path / "lora")
    stock = PeftModel.from_pretrained(load_base(kind, tiny_llama_dir, tiny_gpt2_dir), tmp_path / "lora")
    expected = logits_of(_adapted(build, kind), x)  # unmerged, identically built

    model.merge_adapter()
    stock.merge_adapter()
    alora_merged, lora_merged = logits_of(model, x), logits_of(stock, x)
    alora_error = (alora_merged - expected).abs().max().item()
    lora_error = (lora_merged - expected).abs().max().item()
    print(f"{kind} merge max|logit diff|: ALoRA {alora_error:.4f}  stock LoRA {lora_error:.4f}")
    assert alora_error <= MERGE_ATOL[kind] and lora_error <= MERGE_ATOL[kind]
    assert alora_error <= 1.1 * lora_error + 1e-4
    torch.testing.assert_close(alora_merged, lora_merged, rtol=0, atol=0.02)


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_merge_and_unload_gives_plain_model(build, kind):
    x = random_batch()
    model = _adapted(build, kind)
    expected = logits_of(_adapted(build, kind), x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not any("lora_" in n for n, _ in merged.named_buffers())
    assert isinstance(merged.get_submodule("lm_head"), torch.nn.Linear)
    torch.testing.assert_close(logits_of(merged, x), expected, rtol=0, atol=MERGE_ATOL[kind])


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_disable_adapter_and_unload_give_the_base_model(build, kind, tiny_llama_dir, tiny_gpt2_dir):
    x = random_batch()
    base = logits_of(load_base(kind, tiny_llama_dir, tiny_gpt2_dir), x)
    model = _adapted(build, kind)
    adapted = logits_of(model, x)
    assert (adapted - base).abs().max() > 0.1
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, x), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(model, x), adapted, rtol=0, atol=1e-6)
    plain = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    torch.testing.assert_close(logits_of(plain, x), base, rtol=0, atol=1e-6)


# ---- several adapters --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BASE_KINDS)
def test_two_adapters_switch_and_delete(build, kind):
    x = random_batch()
    model = _adapted(build, kind)
    first = logits_of(model, x)
    model.add_adapter("second", alora_config(r=2, lora_alpha=4, max_r=3, target_modules=["q_proj", "c_attn"]
                                             if kind == "conv1d" else ["q_proj", "v_proj"]))
    randomize_lora_b(model, std=0.1, seed=7, adapter="second")
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits_of(model, x), first, rtol=0, atol=1e-6)

    model.set_adapter("second")
    second_layers = dict(model.base_model.gated_layers("second"))
    assert len(second_layers) == (2 if kind == "conv1d" else 4)
    assert model.base_model.count_active_ranks() == 2 * len(second_layers)
    for layer in second_layers.values():
        assert layer.capacity("second") == 3 and layer.scaling["second"] == 2.0
    second = logits_of(model, x)
    assert (second - first).abs().max() > 1e-2
    # the second adapter alone, computed on the plain base model + its own layers
    with model.disable_adapter():
        base = logits_of(model, x)
    assert (second - base).abs().max() > 1e-2

    model.set_adapter("default")
    torch.testing.assert_close(logits_of(model, x), first, rtol=0, atol=1e-6)
    # trainable parameters follow the active adapter
    model.set_adapter("second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)

    # mixed-adapter batch (inference): each row gets its own adapter, "__base__" none
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=["default", "second", "__base__", "default"]).logits
    for row, reference in enumerate([first, second, base, first]):
        torch.testing.assert_close(mixed[row], reference[row], rtol=0, atol=1e-5)

    model.delete_adapter("default")
    assert list(model.peft_config) == ["second"]
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not [n for n in names if ".default" in n]
    for _, layer in model.base_model.gated_layers("second"):
        assert "default" not in layer.lora_gate and "default" not in layer.r_init
        assert "default" not in layer.init_lora_weights
        # nothing of the deleted adapter is kept alive (the spare-bank bookkeeping holds its tensors)
        assert "default" not in layer.spare_in_use and "default" not in layer._spare_seen
    torch.testing.assert_close(logits_of(model, x), second, rtol=0, atol=1e-6)


# ---- rank-state API ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BASE_KINDS)
def test_deactivate_and_activate_slots(build, kind):
    x = random_batch()
    model = build(kind)
    randomize_lora_b(model, std=0.05)
    name, layer = next(iter(model.base_model.gated_layers()))
    weight_a, weight_b, gate = _weights(layer)

    before = logits_of(model, x)
    layer.deactivate_slot("default", 2)
    assert layer.num_active("default") == 3 and layer.active_slots("default") == [0, 1, 3]
    assert model.base_model.rank_state()[name] == [0, 1, 3]
    after_prune = logits_of(model, x)
    assert (after_prune - before).abs().max() > 1e-3  # the pruned rank had a nonzero B column
    with pytest.raises(ValueError, match="already inactive"):
        layer.deactivate_slot("default", 2)

    old_row = weight_a[5].detach().clone()
    layer.activate_slot("default", 5, generator=torch.Generator().manual_seed(3))
    weight_a, weight_b, gate = _weights(layer)
    assert layer.active_slots("default") == [0, 1, 3, 5] and gate[5] == 1.0
    assert torch.count_nonzero(weight_b[:, 5]) == 0
    assert not torch.equal(weight_a[5], old_row)
    bound = 1 / math.sqrt(layer.in_features)  # kaiming-uniform(a=sqrt(5)) bound, PEFT's A init
    assert weight_a[5].abs().max() <= bound and weight_a[5].abs().max() > 0.5 * bound
    torch.testing.assert_close(logits_of(model, x), after_prune, rtol=0, atol=1e-6)  # output unchanged
    with pytest.raises(ValueError, match="already active"):
        layer.activate_slot("default", 5)

    # a slot pruned earlier can be reused as a fresh rank; the same generator seed draws the same row
    layer.activate_slot("default", 2, generator=torch.Generator().manual_seed(3))
    weight_a, weight_b, gate = _weights(layer)
    torch.testing.assert_close(weight_a[2], weight_a[5], rtol=0, atol=0)
    assert torch.count_nonzero(weight_b[:, 2]) == 0 and layer.num_active("default") == 5


@pytest.mark.parametrize("init", [True, False])
def test_a_seed_gives_the_adapter_that_one_bank_of_max_r_slots_gave(init):
    """The main bank holds what PEFT draws for the first r of max_r slots (peft_alora's layout before the spare bank),
    and the random stream goes on as after that draw; the spare bank starts at zero."""
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(5)
    alora = get_peft_model(make_tiny_llama(seed=1), alora_config(r=4, max_r=8, target_modules=targets,
                                                                  init_lora_weights=init))
    after_alora = torch.rand(3)
    torch.manual_seed(5)
    lora = get_peft_model(make_tiny_llama(seed=1), LoraConfig(r=8, lora_alpha=8, target_modules=targets,
                                                              init_lora_weights=init))
    assert torch.equal(torch.rand(3), after_alora)
    peft_layers = dict(lora.base_model.model.named_modules())
    for name, layer in alora.base_model.gated_layers():
        reference = peft_layers[name]
        assert torch.equal(layer.lora_A["default"].weight, reference.lora_A["default"].weight[:4]), name
        assert torch.equal(layer.lora_B["default"].weight, reference.lora_B["default"].weight[:, :4]), name
        assert not any(slot.any() for bank in _banks(layer)[1:] for slot in bank)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gated_lora_is_the_lora_over_the_joined_banks(autocast):
    """Same values and gradients as linear -> gate -> linear over the concatenated weights: exactly in fp32 and under
    CPU bf16 autocast (as the one-bank layout computed), and by gradcheck in float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, generator=generator)
    a_parts = [torch.randn(*shape, generator=generator) for shape in [(3, 5), (1, 5), (1, 5)]]  # main A, 2 rows
    b_parts = [torch.randn(*shape, generator=generator) for shape in [(6, 3), (6, 1), (6, 1)]]  # main B, 2 columns
    gate = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])

    def reference(x, gate, *parts):
        hidden = torch.nn.functional.linear(x, torch.cat(parts[:3]))
        return torch.nn.functional.linear(hidden * gate.to(hidden.dtype), torch.cat(parts[3:], dim=1))

    def gated(x, gate, *parts):
        return GatedLora.apply(x, gate, 3, *parts)

    # the gate too: the fast scorer's gradient pass makes the gates leaves
    assert torch.autograd.gradcheck(gated, tuple(t.double().requires_grad_() for t in [x, gate, *a_parts, *b_parts]))
    results = []
    for function in (gated, reference):
        inputs = [t.clone().requires_grad_() for t in [x, gate, *a_parts, *b_parts]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = function(*inputs)
        out.float().pow(2).sum().backward()
        results.append([out, *(t.grad for t in inputs)])
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_gaussian_init_of_fresh_ranks(build):
    model = build("linear", init_lora_weights="gaussian")
    layer = model.base_model.get_gated_layer("model.layers.0.mlp.down_proj")  # in_features 128
    layer.activate_slot("default", 6, generator=torch.Generator().manual_seed(0))
    row = layer.slot_weights("default")[0][6]
    assert abs(row.std().item() - 1 / 4) < 0.05  # std 1 / r, as PEFT draws a "gaussian" A
    initial = layer.lora_A["default"].weight[:4]
    assert abs(initial.std().item() - 1 / 4) < 0.05  # the initial ranks were drawn the same way


def test_model_level_rank_state(build):
    model = build("linear")
    base_model = model.base_model
    layers = dict(base_model.gated_layers())
    assert len(layers) == 14
    ranks = make_ranks_unequal(model)
    assert base_model.count_active_ranks() == sum(ranks.values()) == 14 * 4 - 4 - 1 + 2
    expected_params = sum(ranks[n] * (layer.in_features + layer.out_features) for n, layer in layers.items())
    assert base_model.count_active_parameters() == expected_params
    for name, layer in layers.items():
        assert layer.active_parameter_count("default") == ranks[name] * (layer.in_features + layer.out_features)
    assert {n: len(s) for n, s in base_model.rank_state().items()} == ranks
    name = sorted(layers)[0]
    assert base_model.get_gated_layer(name) is layers[name]
    assert base_model.rank_state()[name] == []
    with pytest.raises(KeyError, match="not a gated"):
        base_model.get_gated_layer("model.layers.0.self_attn")
    with pytest.raises(AttributeError):
        base_model.get_gated_layer("model.layers.0.no_such_module")


# ---- generic behaviour of a PEFT method --------------------------------------------------------

@pytest.mark.parametrize("kind", BASE_KINDS)
def test_training_changes_only_adapter_parameters(build, kind):
    model = _adapted(build, kind)
    x = random_batch(n=4, length=16, seed=1)
    with torch.no_grad():
        model(input_ids=x)  # the 4-bit CPU kernels repack their weights in the first forward
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    gates = {n: layer.lora_gate["default"].clone() for n, layer in model.base_model.gated_layers()}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(n.split(".")[-3] in ("lora_A", "lora_B", "lora_A_spare", "lora_B_spare") for n in adapter)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = train_steps(model, x, optimizer, 4)
    assert losses[-1] < losses[0]

    state = model.state_dict()
    for name, value in frozen.items():
        assert torch.equal(state[name], value), name
    for name, layer in model.base_model.gated_layers():
        assert layer.lora_gate["default"].dtype == torch.float32
        assert torch.equal(layer.lora_gate["default"], gates[name])
    changed = {n for n, p in model.named_parameters() if n in adapter and not torch.equal(p, adapter[n])}
    layers = {f"base_model.model.{name}": layer for name, layer in model.base_model.gated_layers()}

    def is_live(name):  # a main bank with an active slot, or an active spare slot
        layer = layers[name.split(".lora_")[0]]
        slots = [int(name.rsplit(".", 1)[1]) + layer.r_init["default"]] if "_spare." in name \
            else range(layer.r_init["default"])
        return any(slot in layer.active_slots("default") for slot in slots)

    live = {n for n in adapter if is_live(n)}
    assert changed == live  # every bank or slot with active ranks trained; the others (rank 0, spare) did not move
    # one process: a spare slot never grown never had a gradient, so AdamW holds no moments for it
    params = dict(model.named_parameters())
    spare = {n for n in adapter if "_spare." in n}
    assert {n for n in spare if optimizer.state.get(params[n])} == spare & live
    assert spare & live and spare - live
    # inactive slots did not move (zero gradient and no weight decay)
    for name, layer in layers.items():
        off = layer.lora_gate["default"] == 0
        spare_slots = range(layer.capacity("default") - layer.r_init["default"])
        before_a = torch.cat([adapter[f"{name}.lora_A.default.weight"],
                              *(adapter[f"{name}.lora_A_spare.default.{i}"] for i in spare_slots)])
        before_b = torch.cat([adapter[f"{name}.lora_B.default.weight"],
                              *(adapter[f"{name}.lora_B_spare.default.{i}"] for i in spare_slots)], dim=1)
        weight_a, weight_b = layer.slot_weights("default")
        assert torch.equal(weight_a[off], before_a[off])
        assert torch.equal(weight_b[:, off], before_b[:, off])


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_unsupported_target_type_is_a_clear_error(build, kind):
    target = "wte" if kind == "conv1d" else "embed_tokens"
    with pytest.raises(ValueError) as info:
        build(kind, target_modules=[target])
    message = str(info.value)
    assert "Embedding" in message and "torch.nn.Linear" in message and "Conv1D" in message, message


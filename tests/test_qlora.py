"""QLoRA on the CPU (issue #2, point 7): 4-bit nf4 / 8-bit base + prepare_model_for_kbit_training + ALoRA."""

import pytest
import torch
from conftest import alora_config, make_ranks_unequal, random_batch, train_steps
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_alora.layers import GatedLinear4bit, GatedLinear8bitLt

pytestmark = pytest.mark.usefixtures("torch_single_thread")

QUANT = {
    "nf4-fp32": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32), GatedLinear4bit),
    "nf4-bf16": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16), GatedLinear4bit),
    "int8": (BitsAndBytesConfig(load_in_8bit=True), GatedLinear8bitLt),
}


@pytest.mark.parametrize("quant", list(QUANT))
def test_qlora_trains_only_the_adapter(quant, tiny_llama_dir):
    quantization_config, gated_class = QUANT[quant]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quantization_config,
                                                dtype=torch.float32)
    # gradient checkpointing on, non-quantized weights in fp32
    base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(base, alora_config(r=4, lora_alpha=8))
    make_ranks_unequal(model)
    layers = dict(model.base_model.gated_layers())
    assert len(layers) == 14 and all(type(layer) is gated_class for layer in layers.values())
    for layer in layers.values():
        assert layer.lora_gate["default"].dtype == torch.float32
        assert layer.lora_A["default"].weight.dtype == torch.float32

    x = random_batch(n=4, length=16, seed=1)
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # bitsandbytes' CPU 4-bit kernels repack the weights in the first forward
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-3] in ("lora_A", "lora_B", "lora_A_spare", "lora_B_spare")
                             for n in trainable)
    gates = {n: layer.lora_gate["default"].clone() for n, layer in layers.items()}

    # no weight decay: it would shrink the unused weights of the rank-0 module, which the check below counts
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=2e-2, weight_decay=0.0)
    losses = train_steps(model, x, optimizer, 6)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses

    state = model.state_dict()
    for name, value in frozen.items():
        assert torch.equal(state[name], value), name
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    # every main-bank A and B except those of the module left at rank 0, and the A and B of the two active spare slots
    assert len(changed) == 2 * 13 + 4 and sum("_spare." in n for n in changed) == 4
    for name, layer in layers.items():
        assert layer.lora_gate["default"].dtype == torch.float32
        assert torch.equal(layer.lora_gate["default"], gates[name])

"""Smallest end-to-end run, offline on a CPU: tiny Llama -> ALoRA adapter -> a few training steps
-> native save -> stock-LoRA export -> reload the export with plain PEFT and compare logits."""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_alora


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config)


def main(out_dir: str) -> int:
    model = get_peft_model(tiny_llama(), peft_alora.ALoRAConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.print_trainable_parameters()
    data = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(10):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step:2d}  loss {loss.item():.4f}")

    # move a few ranks by hand (the ALoRA callback does this from importance scores during training)
    layers = dict(model.base_model.gated_layers())
    names = sorted(layers)
    layers[names[0]].deactivate_slot("default", 0)
    layers[names[0]].deactivate_slot("default", 1)
    layers[names[1]].activate_slot("default", 4)
    print("active ranks:", model.base_model.count_active_ranks(), "of budget", 4 * len(names))

    native, stock = os.path.join(out_dir, "native"), os.path.join(out_dir, "lora")
    model.save_pretrained(native)
    peft_alora.export_lora(model, stock)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=data).logits
        reloaded = PeftModel.from_pretrained(tiny_llama(), stock).eval()
        diff = (reloaded(input_ids=data).logits - expected).abs().max().item()
    print(f"native adapter: {native}\nstock LoRA export: {stock}\nmax |logit diff| export vs trained: {diff:.2e}")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="alora-quickstart-")
    sys.exit(main(target))

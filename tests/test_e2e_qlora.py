"""End to end: 4-bit tiny Llama + SFTTrainer + ALoRACallback over several rounds, then export."""

import json
import os

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_alora
from peft_alora.callback import ALoRACallback
from peft_alora.model import keep_4bit_layers_differentiable
from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer
from test_callback import alora_config, sft_args

TOKENIZER = toy_tokenizer()


def load_4bit(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    keep_4bit_layers_differentiable(model)  # the kernel ALoRA-wrapped models use (no bf16 CPU repacking)
    return model


def test_qlora_sft_with_allocation_rounds_then_stock_lora_export(tmp_path):
    base_dir = str(tmp_path / "base")
    toy_llama(len(TOKENIZER), seed=4).save_pretrained(base_dir)
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=load_4bit(base_dir),
        args=sft_args(tmp_path, max_steps=10, assistant_only_loss=True),
        train_dataset=toy_dataset(48, seed=0), eval_dataset=toy_dataset(16, seed=1),
        processing_class=TOKENIZER,
        peft_config=alora_config(allocation_start=2, allocation_interval=2, allocation_rounds=4, lora_alpha=4, r=2),
    )
    callback = ALoRACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    model = trainer.model
    allocator = callback.allocator

    # SFTTrainer cast the adapter weights of the quantized model to bf16; the gates stay fp32
    layers = allocator.layers
    assert all(layer.lora_A["default"].weight.dtype == torch.bfloat16 for layer in layers.values())
    assert all(layer.lora_gate["default"].dtype == torch.float32 for layer in layers.values())

    active = {name: layer.num_active("default") for name, layer in layers.items()}
    assert sum(active.values()) <= allocator.budget
    assert len(set(active.values())) > 1  # ranks moved: modules now hold different ranks
    with open(os.path.join(trainer.args.output_dir, "alora_allocation.json")) as handle:
        report = json.load(handle)
    assert [r["round"] for r in report["history"]] == [0, 1, 2, 3, 4]
    assert report["history"][-1]["active"] == active

    export_dir = tmp_path / "export"
    peft_alora.export_lora(model, export_dir)
    config = json.loads((export_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["rank_pattern"] == {n: r for n, r in active.items() if r > 0}

    # Compare on fresh 4-bit loads, both with bitsandbytes' CPU inference repacking off (a plain LoRA model
    # would repack on its first eval forward, and the repacked kernel computes in bf16: 8e-3 here).
    native_dir = tmp_path / "native"
    model.save_pretrained(native_dir)
    ids = TOKENIZER("Q: What is 2 plus 3?\nA: 5", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        native = PeftModel.from_pretrained(load_4bit(base_dir), str(native_dir)).eval()
        expected = native(input_ids=ids).logits
        stock = PeftModel.from_pretrained(load_4bit(base_dir), str(export_dir)).eval()
        got = stock(input_ids=ids).logits
    assert type(stock.base_model).__name__ == "LoraModel"
    assert (got - expected).abs().max().item() <= 1e-5

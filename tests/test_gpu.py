"""GPU checks, skipped without CUDA (CI has none): 4-bit merge numerics where bitsandbytes' CUDA
kernels run, and a bf16 QLoRA SFT run with allocation rounds."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_alora
from peft_alora.callback import ALoRACallback
from conftest import alora_config, logits_of, random_batch, randomize_lora_b

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def load_4bit_cuda(path, compute_dtype=torch.float32):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=compute_dtype,
                                                device_map={"": 0}).eval()


def test_4bit_merge_error_equals_stock_lora_on_cuda(tiny_llama_dir, tmp_path):
    ids = random_batch().cuda()
    model = get_peft_model(load_4bit_cuda(tiny_llama_dir), alora_config())
    randomize_lora_b(model)
    layers = dict(model.base_model.gated_layers())
    for name in sorted(layers)[:3]:  # unequal ranks: switch a few slots off
        layers[name].deactivate_slot("default", 0)
    peft_alora.export_lora(model, tmp_path / "lora")
    stock = PeftModel.from_pretrained(load_4bit_cuda(tiny_llama_dir), str(tmp_path / "lora"))

    unmerged, stock_unmerged = logits_of(model, ids), logits_of(stock, ids)
    assert (unmerged - stock_unmerged).abs().max().item() <= 1e-4
    alora_error = (logits_of(model.merge_and_unload(), ids) - unmerged).abs().max().item()
    lora_error = (logits_of(stock.merge_and_unload(), ids) - stock_unmerged).abs().max().item()
    assert alora_error <= 1.01 * lora_error + 1e-4, (alora_error, lora_error)


def test_qlora_sft_bf16_rounds_on_cuda(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer

    tokenizer = toy_tokenizer()
    base_dir = str(tmp_path / "base")
    toy_llama(len(tokenizer), hidden_size=128, seed=0).save_pretrained(base_dir)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                     learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no", bf16=True,
                     assistant_only_loss=True, max_length=64, seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=load_4bit_cuda(base_dir, torch.bfloat16), args=args, processing_class=tokenizer,
                         train_dataset=toy_dataset(96, seed=0), eval_dataset=toy_dataset(16, seed=1),
                         peft_config=alora_config(r=2, lora_alpha=4, allocation_start=3, allocation_end=None,
                                                  allocation_interval=3, allocation_rounds=3, scoring_examples=16))
    callback = ALoRACallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    layers = callback.allocator.layers
    assert all(layer.lora_gate["default"].dtype == torch.float32 for layer in layers.values())
    assert len(callback.allocator.history) == 4
    assert trainer.model.base_model.count_active_ranks() <= callback.allocator.budget
    report = json.loads((tmp_path / "out" / "alora_allocation.json").read_text())
    assert [r["round"] for r in report["history"]] == [0, 1, 2, 3]

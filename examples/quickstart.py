"""The whole ALoRA job on the small offline default, on a CPU in about a minute:

tiny Llama + toy instruction data -> TRL SFTTrainer with an ALoRA adapter and ALoRACallback
(ranks scored, pruned and regrown during training) -> native adapter -> stock-LoRA export ->
reload of the export with plain PEFT, logits compared. Nothing is downloaded.

    python examples/quickstart.py [OUTPUT_DIR]
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

import peft_alora
from peft_alora import ALoRACallback
from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer


def main(out_dir: str) -> int:
    tokenizer = toy_tokenizer()
    base_dir = os.path.join(out_dir, "base-model")
    toy_llama(len(tokenizer), hidden_size=128, layers=2, seed=0).save_pretrained(base_dir)

    args = SFTConfig(
        output_dir=out_dir, max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], seed=0,
        assistant_only_loss=True, max_length=64, use_cpu=True, bf16=False,
    )
    alora = peft_alora.ALoRAConfig(
        r=4, lora_alpha=8, target_modules="all-linear",
        allocation_start=0.25, allocation_end=0.75, allocation_rounds=4,   # rounds after steps 15, 25, 35, 45
        scoring_examples=32,
    )
    trainer = SFTTrainer(
        model=base_dir, args=args, processing_class=tokenizer, peft_config=alora,
        train_dataset=toy_dataset(960, seed=0), eval_dataset=toy_dataset(64, seed=1),
    )
    trainer.add_callback(ALoRACallback(trainer))
    trainer.train()

    model = trainer.model
    native, stock = os.path.join(out_dir, "adapter"), os.path.join(out_dir, "adapter-lora")
    model.save_pretrained(native)
    peft_alora.export_lora(model, stock)

    ids = tokenizer("<|user|>What is 12 plus 30?\n<|assistant|>", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(trainer.model.get_base_model().__class__.from_pretrained(base_dir),
                                             stock).eval()
        diff = (reloaded(input_ids=ids).logits - expected).abs().max().item()
    tuner = model.base_model
    print(f"\nactive ranks {tuner.count_active_ranks()} (budget {4 * len(dict(tuner.gated_layers()))}), "
          f"adapter parameters {tuner.count_active_parameters():,}")
    print(f"native adapter      {native}\nstock LoRA export   {stock}")
    print(f"allocation report   {os.path.join(out_dir, 'alora_allocation.png')} (+ .json)")
    print(f"max |logit diff| stock export vs trained model: {diff:.2e}")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))

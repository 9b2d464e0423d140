"""LoRA vs ALoRA side by side, same run, same budget, on the offline toy world (CPU).

For each method: SFTTrainer on the toy instructions (tiny Llama, all-linear r=4), then eval loss on
held-out toy examples and wall time. ALoRA's extra time is the exact AB-LoRA scoring. Prints a
table and writes benchmarks/results/alora_vs_lora.json. Figures are ratios; absolute seconds are
from this machine's CPU and only comparable within one run.

    python benchmarks/alora_vs_lora.py [--steps 120] [--hidden 128] [--layers 2] [--seeds 0 1]
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from peft_alora import ALoRACallback, ALoRAConfig
from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer


def run(method: str, seed: int, args, tokenizer) -> dict:
    peft_config = dict(r=4, lora_alpha=8, target_modules="all-linear")
    if method == "alora":
        peft_config = ALoRAConfig(**peft_config, allocation_start=0.25, allocation_end=0.75, allocation_rounds=4,
                                  scoring_examples=32)
    else:
        peft_config = LoraConfig(**peft_config)
    sft = SFTConfig(output_dir=f"/tmp/alora-bench/{method}-{seed}", max_steps=args.steps,
                    per_device_train_batch_size=16, learning_rate=3e-3, lr_scheduler_type="constant",
                    logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[], seed=seed,
                    assistant_only_loss=True, max_length=64, use_cpu=True, bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=toy_llama(len(tokenizer), hidden_size=args.hidden, layers=args.layers, seed=seed),
                         args=sft, processing_class=tokenizer, peft_config=peft_config,
                         train_dataset=toy_dataset(args.steps * 16, seed=seed),
                         eval_dataset=toy_dataset(64, seed=1000 + seed))
    callback = None
    if method == "alora":
        callback = ALoRACallback(trainer)
        trainer.add_callback(callback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    held_out = trainer.evaluate(toy_dataset(128, seed=2000 + seed))["eval_loss"]
    scoring = sum(r["scoring_seconds"] for r in callback.allocator.history) if callback else 0.0
    return {"method": method, "seed": seed, "train_seconds": seconds, "scoring_seconds": scoring,
            "eval_loss": held_out, "final_train_loss": trainer.state.log_history[-2].get("loss")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="benchmarks/results/alora_vs_lora.json")
    args = parser.parse_args()
    tokenizer = toy_tokenizer()
    rows = [run(method, seed, args, tokenizer) for seed in args.seeds for method in ("lora", "alora")]
    print(f"\n{'method':6} {'seed':>4} {'train s':>8} {'scoring s':>9} {'eval loss':>9}")
    for row in rows:
        print(f"{row['method']:6} {row['seed']:>4} {row['train_seconds']:8.1f} {row['scoring_seconds']:9.1f} "
              f"{row['eval_loss']:9.4f}")
    ratios = []
    for seed in args.seeds:
        lora, alora = (next(r for r in rows if r["method"] == m and r["seed"] == seed) for m in ("lora", "alora"))
        ratios.append({"seed": seed, "time_ratio": alora["train_seconds"] / lora["train_seconds"],
                       "eval_loss_ratio": alora["eval_loss"] / lora["eval_loss"]})
        print(f"seed {seed}: ALoRA/LoRA wall time x{ratios[-1]['time_ratio']:.2f}, "
              f"eval loss ratio {ratios[-1]['eval_loss_ratio']:.4f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"settings": vars(args), "runs": rows, "ratios": ratios}, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

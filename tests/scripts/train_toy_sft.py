"""Train the offline toy world with TRL's SFTTrainer + ALoRACallback and dump what the run decided.

Used by tests/test_distributed.py (run under torchrun and plainly) and by tests/test_resume.py
(imported: ``build_trainer`` / ``collect`` / ``adapter_tensors``).

    python tests/scripts/train_toy_sft.py OUT_DIR [--per-device-batch 8] [--grad-accum 1] [--max-steps 16]
        [--save-steps N] [--resume-from CKPT] [--logging-steps 4] [--bf16] [--scorer exact|fast]
        [--engine ddp|fsdp2|zero3] [--qlora]
    torchrun --nproc_per_node 2 tests/scripts/train_toy_sft.py OUT_DIR --per-device-batch 4

Every process writes ``OUT_DIR/result_rank{RANK}.json`` (world size, backend, rank_state, the
allocation history without timings, the scores, the scoring batches, how many ranks it scored
itself) and ``OUT_DIR/adapter_rank{RANK}.safetensors`` (the adapter's LoRA weights and gates, as
that process holds them at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# run as a script from anywhere: make the repository importable
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402

import peft_alora  # noqa: E402
from peft_alora.callback import ALoRACallback  # noqa: E402
from peft_alora.distributed import full, leave_process_group  # noqa: E402
from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer  # noqa: E402

SEED = 3
# history fields that must agree between runs (timings and fp-noisy values left out)
DECISION_KEYS = ("round", "step", "pruned", "grown", "grown_slots", "active", "active_total")


def alora_config(**overrides) -> "peft_alora.ALoRAConfig":
    kwargs = dict(r=2, lora_alpha=4, target_modules="all-linear", allocation_start=4, allocation_end=12,
                  allocation_rounds=3, scoring_examples=16, scoring_batch_size=8, lora_dropout=0.0)
    kwargs.update(overrides)
    return peft_alora.ALoRAConfig(**kwargs)


# TrainingArguments of each engine besides DDP (GPUs only: accelerate applies FSDP and DeepSpeed there)
ENGINES = {
    "ddp": {},
    "fsdp2": dict(use_cpu=False, fsdp="full_shard",
                  fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}),
    "zero3": dict(use_cpu=False, deepspeed={"zero_optimization": {"stage": 3}, "train_batch_size": "auto",
                                            "train_micro_batch_size_per_gpu": "auto",
                                            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}),
}


def quantized_toy_llama(vocab_size: int, folder: str, dtype):
    """The toy Llama saved and loaded back in 4 bits (NF4), stored in ``dtype`` as FSDP-QLoRA needs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    toy_llama(vocab_size, seed=0).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                               bnb_4bit_quant_storage=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype)


def build_trainer(output_dir: str, per_device_batch: int = 8, grad_accum: int = 1, max_steps: int = 16,
                  save_steps: int | None = None, tokenizer=None, alora: dict | None = None, qlora: bool = False,
                  **sft_overrides):
    """A deterministic toy SFT run (fixed seeds, no dropout) with the ALoRA callback added.

    fp32 unless ``bf16=True`` is passed: TRL's ``SFTConfig`` defaults to bf16 autocast, whose
    rounding depends on the micro-batch shapes (batch 8 vs 2 x 4 then train measurably apart).
    ``alora`` overrides fields of the ALoRAConfig; ``qlora`` loads the base in 4 bits (stored in the
    training dtype). Returns ``(trainer, callback)``.
    """
    from trl import SFTConfig, SFTTrainer

    tokenizer = tokenizer if tokenizer is not None else toy_tokenizer()
    if qlora:
        dtype = torch.bfloat16 if sft_overrides.get("bf16") else torch.float32
        model = quantized_toy_llama(len(tokenizer), os.path.join(output_dir, f"base{os.environ.get('RANK', '0')}"),
                                    dtype)
    else:
        model = toy_llama(len(tokenizer), seed=0)
    train = toy_dataset(160, seed=0)
    dev = toy_dataset(32, seed=99)
    sft = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum, learning_rate=5e-3, lr_scheduler_type="linear",
        logging_steps=4, report_to=[], disable_tqdm=True, assistant_only_loss=True, max_length=64,
        seed=SEED, use_cpu=True, bf16=False, dataloader_num_workers=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    sft.update(sft_overrides)
    trainer = SFTTrainer(model=model, args=SFTConfig(**sft), train_dataset=train, eval_dataset=dev,
                         processing_class=tokenizer, peft_config=alora_config(**(alora or {})))
    callback = ALoRACallback(trainer)
    trainer.add_callback(callback)
    return trainer, callback


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's trainable LoRA weights and gates (CPU copies, gathered under FSDP2 / ZeRO-3)."""
    tensors = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name:
            tensors[name] = full(tensor).detach().float().cpu().clone().contiguous()
    return tensors


def decisions(history: list[dict]) -> list[dict]:
    """The decision part of an allocation history, JSON-normalised (sorted keys, lists)."""
    return json.loads(json.dumps([{k: record[k] for k in DECISION_KEYS} for record in history], sort_keys=True))


def _kind(param) -> str:
    return type(param).__name__ + (" (ZeRO-3)" if hasattr(param, "ds_id") else "")


def collect(trainer, callback) -> dict:
    model = trainer.model
    return {
        "world_size": trainer.args.world_size,
        "num_processes": trainer.accelerator.num_processes,
        "process_index": trainer.args.process_index,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "ddp_wrapped": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "lora_param_type": _kind(next(p for n, p in model.named_parameters() if "lora_A" in n)),
        "base_weight_type": _kind(next(p for n, p in model.named_parameters() if "base_layer" in n)),
        "global_step": trainer.state.global_step,
        "rank_state": model.base_model.rank_state(),
        "history": decisions(callback.allocator.history),
        "scores": [record.get("scores") for record in callback.allocator.history],
        "scoring_batches": [b["input_ids"].tolist() for b in callback.allocator.scoring.batches],
        "log_history": trainer.state.log_history,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=16)
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--logging-steps", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (SFTConfig's default)")
    parser.add_argument("--scorer", default="exact", help="ALoRAConfig.scorer")
    parser.add_argument("--engine", default="ddp", choices=sorted(ENGINES), help="fsdp2 / zero3: GPUs only")
    parser.add_argument("--qlora", action="store_true", help="4-bit base, stored in the training dtype")
    args = parser.parse_args(argv)

    # count the ranks this process scores itself (distributed scoring splits them over the processes)
    import peft_alora.scoring.exact as scoring_module

    scored_here = {}  # round index -> ranks this process scored in it (the fast scorer's refinement calls in chunks)
    exact_scores = scoring_module.exact_scores
    running = {}

    def counting_exact_scores(model, layers, adapter, scoring, ranks, *rest, **kwargs):
        ranks = list(ranks)
        round_index = running["callback"].allocator.rounds_done
        scored_here[round_index] = scored_here.get(round_index, 0) + len(ranks)
        return exact_scores(model, layers, adapter, scoring, ranks, *rest, **kwargs)

    scoring_module.exact_scores = counting_exact_scores

    # count the full scoring passes that record block outputs (prefix.py): at most one per round is needed
    from peft_alora.scoring.prefix import PrefixCache

    prefix_records = []
    record = PrefixCache.record.__func__

    def counting_record(cls, *rest, **kwargs):
        prefix_records.append(1)
        return record(cls, *rest, **kwargs)

    PrefixCache.record = classmethod(counting_record)

    trainer, callback = build_trainer(args.output_dir, args.per_device_batch, args.grad_accum, args.max_steps,
                                      args.save_steps, logging_steps=args.logging_steps,
                                      bf16=args.bf16, alora={"scorer": args.scorer}, qlora=args.qlora,
                                      **ENGINES[args.engine])
    running["callback"] = callback
    trainer.train(resume_from_checkpoint=args.resume_from)
    rank = trainer.args.process_index
    result = collect(trainer, callback)
    result["ranks_scored_here"] = [scored_here[k] for k in sorted(scored_here)]
    result["prefix_records_here"] = len(prefix_records)
    from safetensors.torch import save_file

    save_file(adapter_tensors(trainer.model), os.path.join(args.output_dir, f"adapter_rank{rank}.safetensors"))
    with open(os.path.join(args.output_dir, f"result_rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    leave_process_group()


if __name__ == "__main__":
    main()

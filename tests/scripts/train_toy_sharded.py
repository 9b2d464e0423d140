"""A custom training loop with ALoRA rounds, under FSDP2 (``fully_shard`` per decoder layer), DeepSpeed ZeRO-3 /
ZeRO-2 (CPU accelerator), or on 1 process.

Used by tests/test_sharded.py:

    torchrun --nproc_per_node 2 tests/scripts/train_toy_sharded.py OUT_DIR [--scorer fast|exact] [--engine fsdp2|zero3|zero2]
    python tests/scripts/train_toy_sharded.py OUT_DIR [--scorer fast|exact]                         # reference

The global batch is the same in both (8 rows; each of 2 processes takes 4), so both runs should take
the same decisions. 27 gated ranks (3 modules x 3 decoder layers x r=3) and 3 scoring micro-batches:
neither divides by 2. Every process writes ``OUT_DIR/result_rank{RANK}.json`` (sharding seen, decisions,
scores, checks of the regrown slots) and ``OUT_DIR/adapter_rank{RANK}.safetensors`` (the full adapter,
gathered); process 0 also writes ``OUT_DIR/native`` (save_pretrained) and ``OUT_DIR/export`` (export_lora).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peft_alora  # noqa: E402
from peft_alora.distributed import adapter_state_dict, full, world  # noqa: E402
from peft_alora.scoring import ScoringSet  # noqa: E402
from peft_alora.toy import toy_llama, toy_pairs, toy_tokenizer  # noqa: E402

GLOBAL_BATCH = 8
LENGTH = 32


def encode(tokenizer, pairs) -> dict:
    texts = [f"Q: {q}\nA: {a}</s>" for q, a in pairs]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


def moment(optimizer, param, key):
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # DeepSpeed: in its flat fp32 partitions
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key)
    return full(optimizer.state[param][key])


def master(param):
    """The optimizer's fp32 master copy under DeepSpeed, else the parameter itself."""
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return full(param).detach()


def slot_checks(allocator, optimizer, record) -> list[dict]:
    """For each regrown slot: is its B column zero (also in a master copy), are its moments (A row, B column) zero?"""
    checks = []
    for module, slot in record["grown_slots"]:
        layer = allocator.layers[module]
        weight_a, weight_b, index = layer.slot_parameters(allocator.adapter, slot)  # the bank holding the slot
        moments = [moment(optimizer, p, key) for p in (weight_a, weight_b) for key in ("exp_avg", "exp_avg_sq")]
        checks.append({
            "slot": [module, slot],
            "b_column_zero": bool((full(weight_b)[:, index] == 0).all())
            and bool((master(weight_b)[:, index] == 0).all()),
            "a_row_is_master": bool(torch.equal(full(weight_a).detach()[index].float(), master(weight_a)[index])),
            "a_row_norm": float(full(weight_a).detach()[index].norm()),
            "moments_zero": all(bool((m[index] == 0).all()) for m in moments[:2])
            and all(bool((m[:, index] == 0).all()) for m in moments[2:]),
        })
    return checks


def quantized(model, folder: str, me: int):
    """``model`` saved by process 0 and loaded back in 4 bits by every process. The 4-bit storage dtype is the
    model's float dtype, so that FSDP can shard the packed weights like any other (FSDP-QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if me == 0:
        model.save_pretrained(folder)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_quant_storage=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)


def save_checkpoint(folder: str, model, optimizer, allocator, step: int, me: int) -> None:
    """Whole tensors (adapter with its gates, Adam state) as safetensors, the rest as JSON; process 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    adapter = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    moments = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if me == 0:
        os.makedirs(folder, exist_ok=True)
        save_file(adapter, os.path.join(folder, "adapter.safetensors"))
        save_file({f"{name}|{key}": full(t).detach().cpu().contiguous() for name, state in moments["state"].items()
                   for key, t in state.items()}, os.path.join(folder, "optimizer.safetensors"))
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump({"step": step, "allocator": allocator.state_dict(), "param_groups": moments["param_groups"]}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def load_checkpoint(folder: str, model, optimizer, allocator) -> int:
    """Load what save_checkpoint wrote into the (sharded) model and optimizer; returns the step to go on after."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, load_file(os.path.join(folder, "adapter.safetensors")), options=options)
    with open(os.path.join(folder, "state.json")) as f:
        saved = json.load(f)
    moments = {}
    for key, tensor in load_file(os.path.join(folder, "optimizer.safetensors")).items():
        name, entry = key.split("|")
        moments.setdefault(name, {})[entry] = tensor
    set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": saved["param_groups"]},
                             options=options)
    allocator.load_state_dict(saved["allocator"])
    return saved["step"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--scorer", default="fast")
    parser.add_argument("--regrow-init", default="gradient")
    parser.add_argument("--scoring-refine", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--qlora", action="store_true",
                        help="4-bit base (bitsandbytes NF4, storage dtype = compute dtype = fp32, as FSDP needs)")
    parser.add_argument("--checkpointing", choices=["reentrant", "non-reentrant"], default=None,
                        help="gradient checkpointing of the decoder blocks (the scorer's gradient passes use it too)")
    parser.add_argument("--save-at", type=int, default=None, help="write OUT_DIR/checkpoint after this step")
    parser.add_argument("--resume-from", default=None, help="a checkpoint folder written by --save-at")
    parser.add_argument("--engine", default="fsdp2", choices=["fsdp2", "zero3", "zero2"],
                        help="how to shard when started with several processes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    processes, me = world()

    tokenizer = toy_tokenizer()
    model = toy_llama(len(tokenizer), layers=3, seed=0)
    if args.qlora:
        model = quantized(model, os.path.join(args.output_dir, "base"), me)
    config = peft_alora.ALoRAConfig(
        r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
        allocation_start=2, allocation_end=6, allocation_rounds=3, scoring_examples=12, scoring_batch_size=4,
        scorer=args.scorer, scoring_refine=args.scoring_refine, regrow_init=args.regrow_init)
    if args.checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": args.checkpointing == "reentrant"})
    torch.manual_seed(0)
    model = get_peft_model(model, config)
    if args.checkpointing:
        model.enable_input_require_grads()
    forward, deepspeed_engine = model, None
    if processes > 1 and args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: the DTensor parameters
    if processes > 1 and args.engine.startswith("zero"):
        import importlib

        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this loop runs on the CPU (gloo), GPU or not
        import deepspeed

        # DeepSpeed's CPU shared-memory all-reduce kernel is compiled at start (~45 s here); gloo does without it
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # no gradient clipping (DeepSpeed's default clips at 1.0): the same update as the 1-process loop
        settings = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // processes, "gradient_accumulation_steps": 1,
                    "gradient_clipping": 0.0,
                    "zero_optimization": {"stage": int(args.engine[-1])},
                    "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.01, "torch_adam": True}}}
        deepspeed_engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                                                 config=settings)
        forward = deepspeed_engine
    else:
        optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    train = encode(tokenizer, toy_pairs(args.steps * GLOBAL_BATCH, seed=0))
    dev = encode(tokenizer, toy_pairs(12, seed=99))
    scoring = ScoringSet([{k: v[i:i + 4] for k, v in dev.items()} for i in range(0, 12, 4)])
    allocator = peft_alora.RankAllocator(model, scoring, total_steps=args.steps, seed=0)

    per_process = GLOBAL_BATCH // processes
    checks = []
    done = load_checkpoint(args.resume_from, model, optimizer, allocator) if args.resume_from else 0
    for step in range(done + 1, args.steps + 1):
        rows = slice((step - 1) * GLOBAL_BATCH + me * per_process, (step - 1) * GLOBAL_BATCH + (me + 1) * per_process)
        batch = {k: v[rows] for k, v in train.items()}
        global_labels = train["labels"][(step - 1) * GLOBAL_BATCH: step * GLOBAL_BATCH]
        tokens = int((global_labels[:, 1:] != -100).sum())
        logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
        # FSDP and ZeRO average the processes' gradients: scale so that the average is the global batch's gradient
        if deepspeed_engine is not None:
            deepspeed_engine.backward(loss * processes / tokens)
            deepspeed_engine.step()
        else:
            (loss * processes / tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
        record = allocator.step(step, optimizer)
        if record is not None:
            checks += slot_checks(allocator, optimizer, record)
        if step == args.save_at:
            save_checkpoint(os.path.join(args.output_dir, "checkpoint"), model, optimizer, allocator, step, me)

    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    state = {k: v.detach().float().cpu().clone().contiguous() for k, v in adapter_state_dict(model).items()}
    result = {
        "world_size": processes,
        "rank": me,
        "param_type": type(lora_a).__name__ + (" (ZeRO-3)" if hasattr(lora_a, "ds_id") else ""),
        "local_numel": (lora_a.to_local().numel() if hasattr(lora_a, "to_local")
                        else lora_a.ds_tensor.numel() if hasattr(lora_a, "ds_id") else lora_a.numel()),
        "full_numel": lora_a.ds_numel if hasattr(lora_a, "ds_id") else lora_a.numel(),
        "gate_type": type(model.base_model.model.model.layers[0].self_attn.q_proj.lora_gate["default"]).__name__,
        "base_layer_type": type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__,
        "base_weight_type": type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight).__name__,
        "history": [{k: r[k] for k in ("round", "step", "pruned", "grown", "grown_slots", "active_total")}
                    for r in allocator.history],
        "scores": [r.get("scores") for r in allocator.history],
        "slot_checks": checks,
    }
    peft_alora.export_lora(model, os.path.join(args.output_dir, "export"))
    model.save_pretrained(os.path.join(args.output_dir, "native"), state_dict=state, is_main_process=me == 0)
    save_file(state, os.path.join(args.output_dir, f"adapter_rank{me}.safetensors"))
    with open(os.path.join(args.output_dir, f"result_rank{me}.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    if processes > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

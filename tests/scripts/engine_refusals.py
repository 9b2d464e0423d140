"""Build each multi-process set-up ALoRA refuses, in one process (gloo), and print what the allocator says.

    python tests/scripts/engine_refusals.py fsdp1|zero3|zero2

Prints one JSON line: ``{"case", "error": <the ValueError's message or null>, "trained",
"moments_keyed_by_lora_params"}``.
The engines are real (FSDP1's wrapper, DeepSpeed's engine and ZeRO optimizer); one process is
enough, since what is refused is the engine, not the number of processes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_alora  # noqa: E402
from peft_alora.scoring import ScoringSet  # noqa: E402
from peft_alora.toy import toy_llama  # noqa: E402


def main(case: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = peft_alora.ALoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                    allocation_start=1, allocation_end=1, allocation_rounds=1)
    model = get_peft_model(toy_llama(128), config)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    scoring = ScoringSet([{"input_ids": ids, "labels": ids}])
    if case == "fsdp1":
        torch.distributed.init_process_group("gloo")
        from torch.distributed.fsdp import FullyShardedDataParallel

        engine = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=1e-3)
    else:
        import importlib

        import deepspeed

        # DeepSpeed's CPU shared-memory all-reduce kernel is compiled at start (~45 s here); gloo does without it
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        settings = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": int(case[-1])},
                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=settings)
    loss = engine(input_ids=ids, labels=ids).loss  # the engine trains: what is refused is ALoRA's round
    (engine.backward(loss) if hasattr(engine, "backward") else loss.backward())
    optimizer.step()
    allocator = peft_alora.RankAllocator(model, scoring, total_steps=4)
    error = None
    try:
        allocator.step(1, optimizer)
    except ValueError as exc:
        error = str(exc)
    # why the refusal: the optimizer's moments are not keyed by the model's LoRA parameters (DeepSpeed: by its
    # flat fp32 partitions), so a regrown slot's moments could not be reset through them
    inner = getattr(optimizer, "optimizer", optimizer)
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    keyed = all(p in getattr(inner, "state", {}) for p in lora)
    print(json.dumps({"case": case, "error": error, "trained": bool(torch.isfinite(loss).item()),
                      "moments_keyed_by_lora_params": keyed}))


if __name__ == "__main__":
    main(sys.argv[1])

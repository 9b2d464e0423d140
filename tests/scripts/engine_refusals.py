"""Train one step under a set-up ALoRA refuses, in one process, and print what an ALoRA round says.

    python tests/scripts/engine_refusals.py fsdp1            # FullyShardedDataParallel (gloo, CPU)
    python tests/scripts/engine_refusals.py fsdp2-offload    # fully_shard with CPUOffloadPolicy (nccl, needs CUDA)

Prints one JSON line: ``{"error": <the ValueError's message or null>, "trained": <the step's loss was finite>}``.
One process is enough: what is refused is the engine, not the number of processes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
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
    if case == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        torch.distributed.init_process_group("gloo")
        engine = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    else:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        torch.distributed.init_process_group("nccl")
        torch.cuda.set_device(0)
        model.cuda()
        ids = ids.cuda()
        for block in model.base_model.model.model.layers:
            fully_shard(block, offload_policy=CPUOffloadPolicy())
        engine = fully_shard(model, offload_policy=CPUOffloadPolicy())
    optimizer = torch.optim.AdamW([p for p in engine.parameters() if p.requires_grad], lr=1e-3)
    loss = engine(input_ids=ids, labels=ids).loss  # the engine trains: what is refused is ALoRA's round
    loss.backward()
    optimizer.step()
    allocator = peft_alora.RankAllocator(model, ScoringSet([{"input_ids": ids, "labels": ids}]), total_steps=4)
    error = None
    try:
        allocator.step(1, optimizer)
    except ValueError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "trained": bool(torch.isfinite(loss).item())}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

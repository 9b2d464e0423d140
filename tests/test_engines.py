"""Multi-process set-ups ALoRA does not support are refused at the round (and at train begin), naming the option.

FSDP1's wrapper is built for real in one process (tests/scripts/engine_refusals.py; FSDP2's CPU offload
in tests/test_gpu.py, it needs CUDA). FSDP2 and
DeepSpeed ZeRO-3 / ZeRO-2 themselves are tested in test_sharded.py.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from peft import get_peft_model
from test_distributed import REPO, free_port

import peft_alora
from peft_alora.distributed import check_engine, fsdp_ignored_warning, share_work

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
SCRIPT = REPO / "tests" / "scripts" / "engine_refusals.py"


def refusal(case: str) -> dict:
    """Run tests/scripts/engine_refusals.py CASE; its JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(SCRIPT), case], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fsdp1_is_refused_naming_fsdp_version():
    result = refusal("fsdp1")
    assert result["trained"]  # FSDP1 itself runs here
    assert "FSDP1" in result["error"] and "fsdp_version: 2" in result["error"]


def test_deepspeed_offload_is_refused_naming_the_option():
    class ZeroOptimizer:  # stands for DeepSpeed's ZeRO optimizer (offload needs DeepSpeed's compiled CPU Adam)
        offload_optimizer = True

    ZeroOptimizer.__module__ = "deepspeed.runtime.zero.stage3"
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="offload_optimizer_device / offload_param_device"):
        check_engine(model, SimpleNamespace(optimizer=ZeroOptimizer()))


def test_plain_model_passes_and_keeps_all_work(torch_single_thread):
    model = get_peft_model(make_tiny_llama(), peft_alora.ALoRAConfig(r=2, target_modules=["q_proj"]))
    check_engine(model, torch.optim.AdamW(model.parameters()))  # one process: nothing to refuse
    work = share_work(model, range(5))
    assert work.mine == [0, 1, 2, 3, 4] and not work.split
    assert torch.equal(work.total(torch.ones(3), torch.device("cpu")), torch.ones(3))


def test_fsdp_requested_but_not_applied_is_named():
    model = make_tiny_llama()
    message = fsdp_ignored_warning(SimpleNamespace(fsdp="full_shard"), model)
    assert "TrainingArguments.fsdp='full_shard'" in message and "DDP" in message
    assert fsdp_ignored_warning(SimpleNamespace(fsdp=""), model) is None
    assert fsdp_ignored_warning(SimpleNamespace(), model) is None

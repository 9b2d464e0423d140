"""ALoRA with sharded weights (FSDP2, FSDP2 + QLoRA, DeepSpeed ZeRO-3) and ZeRO-2, 2 processes (gloo, CPU), decides
like 1 process.

tests/scripts/train_toy_sharded.py runs the same 8 steps with 3 rounds in a custom loop: on 2
processes under an engine (4 rows each) and unsharded on 1 process (8 rows). 27 ranks and 3 scoring
micro-batches do not divide by 2; a hang fails the test through the subprocess timeout instead of
blocking the suite. Each engine runs one scorer variant; the 1-process reference of a variant is
shared.
"""

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, free_port, run

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed"),
]

SCRIPT = REPO / "tests" / "scripts" / "train_toy_sharded.py"
# the exact scorer with the paper's random regrowth; the fast one with exact re-scoring and gradient regrowth
VARIANTS = {"exact": ["--scorer", "exact", "--regrow-init", "random"],
            "fast": ["--scorer", "fast", "--scoring-refine", "2", "--regrow-init", "gradient"]}
# fsdp2+qlora: FSDP-QLoRA, the 4-bit base weights sharded too (NF4 stored as fp32, the model's dtype)
# +checkpointing: gradient checkpointing on (as TRL sets it: non-reentrant under FSDP2, reentrant under ZeRO-3), which
# the scorer's gradient passes then use too; compared with the 1-process run without it
CASES = [("fsdp2", "exact"), ("fsdp2+qlora", "fast"), ("zero3", "fast"), ("zero2", "exact"),
         ("fsdp2+checkpointing", "fast"), ("zero3+checkpointing", "fast")]
SAVE_AT = 4  # the fsdp2-exact run also writes a checkpoint after this step (a round ran at step 4)
NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1-process runs, by scorer variant and base (4-bit or not), computed on first use."""
    cache = {}

    def get(variant, qlora):
        if (variant, qlora) not in cache:
            out = tmp_path_factory.mktemp(f"one-{variant}")
            cache[variant, qlora] = out, run([sys.executable, SCRIPT, out, *VARIANTS[variant], *qlora], out)
        return cache[variant, qlora]
    return get


def torchrun(out, *args):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT, out, *args], out)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, references):
    """2-process runs by case (and their 1-process reference), computed on first use."""
    cache = {}

    def get(case):
        if case not in cache:
            engine, variant = case
            engine, _, base = engine.partition("+")
            qlora = ["--qlora"] if base == "qlora" else []
            checkpointing = ["--checkpointing", "reentrant" if engine == "zero3" else "non-reentrant"] \
                if base == "checkpointing" else []
            save = ["--save-at", str(SAVE_AT)] if case == ("fsdp2", "exact") else []
            if engine.startswith("zero") and NO_DEEPSPEED:
                pytest.skip("deepspeed not installed")
            out = tmp_path_factory.mktemp(f"{engine}-{variant}")
            two = torchrun(out, "--engine", engine, *VARIANTS[variant], *qlora, *checkpointing, *save)
            one_dir, one = references(variant, tuple(qlora))
            cache[case] = case, (out, two), (one_dir, one)
        return cache[case]
    return get


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def runs(request, sharded_runs):
    return sharded_runs(request.param)


def test_weights_are_partitioned_and_gates_replicated(runs):
    (engine, _), (_, two), (_, one) = runs
    assert sorted(two) == [0, 1]
    for rank, (result, _) in two.items():
        assert result["world_size"] == 2 and result["rank"] == rank
        expected = {"fsdp2": "DTensor", "zero3": "Parameter (ZeRO-3)", "zero2": "Parameter"}[engine.split("+")[0]]
        assert result["param_type"] == expected
        if engine != "zero2":  # ZeRO-2 partitions the optimizer state and gradients, not the weights
            assert result["local_numel"] < result["full_numel"]  # each process holds part of lora_A
        assert result["gate_type"] == "Tensor"  # a plain buffer, the same in every process
        if engine == "fsdp2+qlora":
            assert result["base_layer_type"] == "Linear4bit" and result["base_weight_type"] == "DTensor"
    assert one[0][0]["param_type"] == "Parameter" and one[0][0]["world_size"] == 1
    if engine == "fsdp2+qlora":
        assert one[0][0]["base_weight_type"] == "Params4bit"


def test_sharded_run_decides_like_one_process(runs):
    _, (_, two), (_, one) = runs
    (r1, w1) = one[0]
    assert all(len(h["pruned"]) == 3 and len(h["grown_slots"]) == 3 for h in r1["history"][1:])
    assert [h["step"] for h in r1["history"]] == [0, 2, 4, 6]
    for rank, (r2, w2) in two.items():
        assert r2["history"] == r1["history"], rank
        for scores_1, scores_2 in zip(r1["scores"][1:], r2["scores"][1:]):
            assert scores_1.keys() == scores_2.keys()
            worst = max(abs(scores_1[k] - scores_2[k]) for k in scores_1)
            assert worst < 1e-5, f"scores of 1 process and of process {rank} of 2 differ by {worst:.2e}"
        assert w2.keys() == w1.keys()
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=0, msg=name)
    assert two[0][0]["scores"] == two[1][0]["scores"]  # bit-identical across the processes


def test_regrown_slots_are_fresh_in_every_shard(runs):
    _, (_, two), (_, one) = runs
    for result in [one[0][0], two[0][0], two[1][0]]:
        checks = result["slot_checks"]
        assert len(checks) == 9
        # B column zero (also in DeepSpeed's fp32 master copy), moments zero, A row drawn, working copy == master
        assert all(c["b_column_zero"] and c["moments_zero"] and c["a_row_norm"] > 0 and c["a_row_is_master"]
                   for c in checks), checks


@pytest.mark.parametrize("folder", ["native", "export"])
def test_full_adapter_is_saved(runs, folder):
    _, (two_dir, _), (one_dir, _) = runs
    one = load_file(one_dir / folder / "adapter_model.safetensors")
    two = load_file(two_dir / folder / "adapter_model.safetensors")
    assert one.keys() == two.keys() and any("lora_A" in k for k in one)
    for name in one:
        assert two[name].shape == one[name].shape, name  # whole tensors, not one process's shard
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)


def test_checkpoint_resumes_under_fsdp2_to_the_same_end(sharded_runs):
    """Save (whole adapter with gates, Adam state via torch.distributed.checkpoint's full state dicts, allocator
    JSON) after step 4 under FSDP2, resume in 2 new processes: the same rounds and bit-identical weights."""
    _, (out, two), _ = sharded_runs(("fsdp2", "exact"))
    resumed = torchrun(out / "resumed", "--engine", "fsdp2", *VARIANTS["exact"], "--resume-from", out / "checkpoint")
    for rank, (result, weights) in resumed.items():
        assert result["param_type"] == "DTensor"
        assert result["history"] == two[rank][0]["history"] and result["scores"] == two[rank][0]["scores"]
        assert len(result["slot_checks"]) == 3  # only the round after step 4 ran after the resume
        for name, tensor in two[rank][1].items():
            assert torch.equal(weights[name], tensor), name

"""The same SFT run on 2 processes (torchrun, DDP over gloo on CPU) and on 1 process decides the same.

2 processes x batch 4 against 1 process x batch 8 (same global batch, same data order). Both
processes must hold bit-identical scores, decisions and weights (scores are split over the
processes and all-reduced); the 1-process run must make the same decisions, with weights equal up
to floating-point noise (DDP's gradient average against one big batch).

Runs fp32: under TRL's default bf16 autocast the two layouts (one micro-batch of 8, two of 4)
round differently, by ~0.2% of each gradient, which is enough to flip near-tied scores of this toy
model (2 x 4 matches 1 x 4 with gradient_accumulation_steps=2 bit for bit, bf16 or not).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed"),
]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "scripts" / "train_toy_sft.py"
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, out_dir: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # own session: on timeout the whole group (torchrun and its workers) is killed, no orphan left
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} timed out after {TIMEOUT_S} s:\n{stderr[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    results = {}
    for path in sorted(out_dir.glob("result_rank*.json")):
        rank = int(path.stem.removeprefix("result_rank"))
        results[rank] = (json.loads(path.read_text()), load_file(out_dir / f"adapter_rank{rank}.safetensors"))
    return results


@pytest.fixture(scope="module", params=["exact", "fast"])
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"distributed-{request.param}")
    scorer = ["--scorer", request.param]
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               SCRIPT, root / "two", "--per-device-batch", "4", *scorer], root / "two")
    one = run([sys.executable, SCRIPT, root / "one", "--per-device-batch", "8", *scorer], root / "one")
    return request.param, two, one


def test_two_processes_really_run_ddp_over_gloo(runs):
    _, two, _ = runs
    assert sorted(two) == [0, 1]
    for rank, (result, _) in two.items():
        assert result["process_index"] == rank
        assert result["world_size"] == result["num_processes"] == 2
        assert result["backend"] == "gloo"
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["ddp_wrapped"]
        assert result["global_step"] == 16


def test_both_processes_decide_identically(runs):
    (r0, w0), (r1, w1) = runs[1][0], runs[1][1]
    assert r0["scoring_batches"] == r1["scoring_batches"]  # same scoring set drawn on each process
    assert r0["scores"] == r1["scores"]  # bit-identical (all-reduced)
    assert r0["history"] == r1["history"]
    assert r0["rank_state"] == r1["rank_state"]
    assert w0.keys() == w1.keys()
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name


def test_scoring_is_split_over_the_processes(runs):
    scorer, two, _ = runs
    (r0, _), (r1, _) = two[0], two[1]
    # exact: every active rank is scored; fast: the micro-batches are split, and the exact re-scoring of up to
    # 2 x 7 ranks (ranks_per_round: 7 module types here) is split like the exact scorer's ranks, a rank per
    # process at a time (a rank one process alone would not have re-scored next is dropped, at most 1 per chunk)
    assert len(r0["ranks_scored_here"]) == len(r1["ranks_scored_here"]) == 3
    for round_index, (mine, theirs) in enumerate(zip(r0["ranks_scored_here"], r1["ranks_scored_here"])):
        if scorer == "exact":
            assert mine + theirs == r0["history"][round_index]["active_total"]
        else:
            assert 2 <= mine + theirs <= 2 * 2 * 7
        assert abs(mine - theirs) <= 1
    # the block outputs exact passes start from: one recording per round at the current gates (and, for the
    # exact scorer's "only rho" passes, one of the base model per run), not one per share of ranks
    for result in (r0, r1):
        assert result["prefix_records_here"] <= len(result["ranks_scored_here"]) + (scorer == "exact")


def test_two_processes_decide_like_one(runs):
    scorer, two, one = runs
    (r2, w2), (r1, w1) = two[0], one[0]
    assert sorted(one) == [0] and r1["world_size"] == 1 and r1["backend"] is None
    if scorer == "exact":
        assert r1["ranks_scored_here"] == [h["active_total"] for h in r1["history"][:-1]]
    assert r1["scoring_batches"] == r2["scoring_batches"]
    # the scenario is not vacuous: every round moved ranks between modules
    assert [h["step"] for h in r1["history"]] == [0, 4, 8, 12]
    assert all(len(h["pruned"]) == 7 and sum(h["grown"].values()) > 0 for h in r1["history"][1:])
    for round_scores_1, round_scores_2 in zip(r1["scores"][1:], r2["scores"][1:]):
        assert round_scores_1.keys() == round_scores_2.keys()
        worst = max(abs(round_scores_1[k] - round_scores_2[k]) for k in round_scores_1)
        assert worst < 1e-5, f"scores of 1 and 2 processes differ by {worst:.2e}"
    assert r2["history"] == r1["history"]
    assert r2["rank_state"] == r1["rank_state"]
    for name in w1:
        if "lora_gate" in name:
            assert torch.equal(w2[name], w1[name]), name
        else:
            torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=0, msg=name)

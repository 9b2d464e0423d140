"""benchmarks/gpu_qlora.py on the CPU (tiny shape): CI never has a GPU, so this keeps the script running."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_run_on_the_cpu_trains_both_methods_and_runs_a_round(tmp_path):
    out = tmp_path / "gpu_qlora.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_qlora.py"), "--shapes", "tiny", "--device",
                           "cpu", "--warmup", "1", "--steps", "2", "--accumulation", "1", "--length", "32",
                           "--scoring-examples", "8", "--rounds", "1", "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())["shapes"]["tiny"]
    layers, types, r = 2, 7, 16
    assert row["lora"]["trainable_parameters"] * 2 == row["alora"]["trainable_parameters"]  # 2r slots
    assert row["alora"]["ranks"] == layers * types * r  # the budget after a round
    assert len(row["alora"]["round_seconds"]) == 1 and len(row["alora"]["step_time_ratios"]) == 2
    assert json.loads(done.stdout.strip().splitlines()[-1])["tiny"]["step_time_ratio"] > 0

"""benchmarks/overhead.py counts peak memory from the memory profiler's trace: check that accounting."""

import importlib.util
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile, record_function

MIB = 2**20


def _overhead():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
    spec = importlib.util.spec_from_file_location("overhead_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensor_memory_counts_model_training_peak_and_tensors_from_before_the_trace():
    overhead = _overhead()
    mapped = torch.zeros(MIB // 4)  # 1 MiB made before profiling: stands for weights mapped from a file
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model = torch.zeros(2 * MIB // 4)  # 2 MiB allocated while "loading"
        scratch = torch.zeros(MIB // 4)    # freed before training: not part of the start
        del scratch
        with record_function("training"):
            activations = torch.zeros(3 * MIB // 4)  # the peak: 3 MiB on top of the model
            del activations
            kept = torch.zeros(MIB // 4)  # noqa: F841  (still held when profiling ends, below the peak)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (mapped, model)}

    peak, at_start = overhead.tensor_memory_mib(profiler, storages)

    assert abs(at_start - 3.0) < 0.01  # the model's 2 MiB allocated in the trace + 1 MiB from before it
    assert abs(peak - 6.0) < 0.01      # + the 3 MiB of activations, not the 1 MiB kept after them

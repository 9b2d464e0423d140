"""4-bit QLoRA on one GPU at 1B and 8B scale (random weights): ALoRA against PEFT LoRA at the same r.

The set-up of ``recipes/Llama-3.1-8B-Instruct/qlora_alora.yaml``: NF4 with nested quantization, bf16
compute and autocast, the adapter in bf16 as SFTTrainer casts it (``--adapter-dtype fp32``: PEFT's
default, kept by a custom loop or the plain Trainer), gradient checkpointing, all linear layers,
r = 16, micro-batch 4, 4 micro-batches per optimizer step, AdamW. Per shape and method: the median optimizer-step time, the
peak GPU memory from the 4-bit load to the end of the steps (``torch.cuda.max_memory_allocated``),
and for ALoRA the wall time and peak memory of an allocation round (its default scorer, a scoring
set of --scoring-examples sequences). Each method has its own copy of the base; their steps
alternate, and the step-time ratio is the median of the pairs' ratios (trained one after the other,
ALoRA's step at 1B took 0.96 s in one run and 1.35 s in another, LoRA's 1.19 s in both). With
``--eval-mode-round``, one more round runs with the scorer's gradient passes not checkpointed, as
they ran before commit 99f6b9a: its peak memory, or "out of memory".

    python benchmarks/gpu_qlora.py                      # 1B and 8B Llama shapes; needs CUDA and ~40 GB of disk
    python benchmarks/gpu_qlora.py --shapes tiny --device cpu --steps 2   # a smoke run on the CPU

Writes benchmarks/results/gpu_qlora.json after each shape; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from peft_alora import ALoRAConfig  # noqa: E402
from peft_alora.allocator import RankAllocator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B (sizes from their published configs); tiny for a CPU smoke run
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False),
}
GIB = 1 << 30


def save_random_model(shape: str, path: str, device: str) -> float:
    """A random-weight Llama of ``shape`` in bf16, saved; returns its parameter count (billions)."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    return billions


def load_4bit(path: str, device: str):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0} if device == "cuda" else None)
    model.gradient_checkpointing_enable()  # as the Trainer does with gradient_checkpointing: true
    return model


def batches(n: int, batch: int, length: int, vocab: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, length), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class Meter:
    """Wall time with the device synchronised; GPU memory of one method, counted from a ``baseline``:
    the bytes allocated before that method's base model was loaded (the other method's model,
    adapter and optimizer state, which stay as they are meanwhile)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self, baseline: int):
        return (torch.cuda.max_memory_allocated() - baseline) / GIB if self.cuda else None

    def timed(self, fn) -> float:
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started


class Trainee:
    """One method on its own 4-bit base: model, optimizer, (ALoRA) allocator, and its optimizer step."""

    def __init__(self, method: str, path: str, args, vocab: int, meter: Meter):
        meter.reset()
        self.baseline = meter.allocated()
        common = dict(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear")
        config = ALoRAConfig(**common, scoring_batch_size=args.scoring_batch_size) if method == "alora" \
            else LoraConfig(**common)
        self.method, self.meter = method, meter
        self.model = get_peft_model(load_4bit(path, args.device), config)
        self.model.enable_input_require_grads()
        if args.adapter_dtype == "bf16":  # what TRL's SFTTrainer does to the adapter of a quantized model
            for parameter in self.model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(torch.bfloat16)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=2e-4)
        self.device = next(p.device for p in self.model.parameters())
        self.allocator = None
        if method == "alora":  # attached before training, as ALoRACallback does
            scoring = batches(args.scoring_examples // args.scoring_batch_size, args.scoring_batch_size,
                              args.length, vocab, seed=1)
            self.allocator = RankAllocator(self.model, scoring, total_steps=100)

    def step(self, micro_batches):
        for batch in micro_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = self.model(**batch).loss / len(micro_batches)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def round(self, global_step: int) -> tuple[float, object]:
        self.meter.reset()
        seconds = self.meter.timed(lambda: self.allocator.run_round(global_step, optimizer=self.optimizer))
        return seconds, self.meter.peak_gib(self.baseline)


def measure_shape(path: str, args, vocab: int, meter: Meter) -> dict:
    """Both methods loaded side by side: each one's training peak (load + warm-up steps), then their
    optimizer steps alternating (order swapped every pair), then ALoRA's rounds."""
    data = batches((args.warmup + args.steps) * args.accumulation, args.batch, args.length, vocab, seed=0)
    data = [data[i:i + args.accumulation] for i in range(0, len(data), args.accumulation)]
    trainees, rows = {}, {}
    for method in ("lora", "alora"):
        trainee = trainees[method] = Trainee(method, path, args, vocab, meter)
        for micro_batches in data[:args.warmup]:
            trainee.step(micro_batches)
        rows[method] = {"train_peak_gib": meter.peak_gib(trainee.baseline),
                        "trainable_parameters": sum(p.numel() for p in trainee.model.parameters() if p.requires_grad)}
    times = {"lora": [], "alora": []}
    for i, micro_batches in enumerate(data[args.warmup:]):
        for method in (("lora", "alora") if i % 2 == 0 else ("alora", "lora")):
            times[method].append(meter.timed(lambda: trainees[method].step(micro_batches)))
    for method, row in rows.items():
        row["step_seconds"] = statistics.median(times[method])
        print(f"  {method}: step {row['step_seconds']:.3f}s (median of {len(times[method])}, alternating), "
              f"peak {row['train_peak_gib'] or 0:.2f} GiB", flush=True)
    alora, row = trainees["alora"], rows["alora"]
    row["step_time_ratios"] = [a / b for a, b in zip(times["alora"], times["lora"])]
    round_times, round_peaks = [], []
    for i in range(args.rounds):
        seconds, peak = alora.round(global_step=10 + i)
        round_times.append(seconds)
        round_peaks.append(peak)
        alora.step(data[-1])  # the moved ranks train once, as between rounds
        print(f"  alora round {i + 1}: {seconds:.1f}s = {seconds / row['step_seconds']:.1f} steps, peak "
              f"{peak or 0:.2f} GiB", flush=True)
    row.update(round_seconds=round_times, round_peak_gib=round_peaks,
               round_in_steps=[t / row["step_seconds"] for t in round_times],
               ranks=sum(len(v) for v in alora.allocator.active_slots().values()))
    if args.eval_mode_round:
        row["eval_mode_round_peak_gib"] = eval_mode_round(alora)
    return rows


def eval_mode_round(alora: Trainee):
    """Peak memory of a round whose gradient passes keep every block's activations (no checkpointing)."""
    import contextlib

    from peft_alora.scoring import fast

    checkpointed = fast._checkpointed_as_in_training
    fast._checkpointed_as_in_training = lambda model: contextlib.nullcontext()
    try:
        peak = alora.round(global_step=99)[1]
    except torch.OutOfMemoryError:
        peak = "out of memory"
    finally:
        fast._checkpointed_as_in_training = checkpointed
    print(f"  alora round, gradient passes not checkpointed: peak {peak}", flush=True)
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--adapter-dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: as TRL's SFTTrainer casts a quantized model's adapter; fp32: PEFT's default "
                             "(a custom loop or the plain Trainer)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval-mode-round", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scoring-examples", type=int, default=32)
    parser.add_argument("--scoring-batch-size", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="where the random models are saved (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_qlora.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark measures GPU memory and time (--device cpu for a smoke run)")
    meter = Meter(args.device)
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "shapes": {}}
    for shape in args.shapes:
        with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
            started = time.perf_counter()
            billions = save_random_model(shape, folder, args.device)
            print(f"{shape}: {billions:.2f}B parameters, saved in {time.perf_counter() - started:.0f}s", flush=True)
            rows = measure_shape(folder, args, SHAPES[shape]["vocab_size"], meter)
            meter.reset()
        lora, alora = rows["lora"], rows["alora"]
        ratios = {"step_time_ratio": statistics.median(alora["step_time_ratios"])}
        if args.device == "cuda":
            ratios.update(peak_memory_ratio=alora["train_peak_gib"] / lora["train_peak_gib"],
                          round_peak_vs_lora_train=max(alora["round_peak_gib"]) / lora["train_peak_gib"])
        result["shapes"][shape] = {"billions": billions, **rows, **ratios}
        print(f"{shape}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({shape: {k: v for k, v in row.items() if not isinstance(v, dict)}
                      for shape, row in result["shapes"].items()}))


if __name__ == "__main__":
    main()

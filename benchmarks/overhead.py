"""What ALoRA costs next to PEFT LoRA at the same r: step time, peak memory, whole-run wall time (CPU).

1. Per optimizer step, in fp32 and in 4-bit (bitsandbytes runs 4-bit layers on the CPU; once with the
   adapter and compute in fp32, as PEFT and the plain Trainer train it, once in bf16, as TRL's
   SFTTrainer trains QLoRA): a random
   Llama with hidden size 1024 (few layers, so LoRA is a realistic share of the compute), ALoRA at
   its default capacity (max_r = 2r slots, r active) vs LoRA at r. ALoRA is measured in the state a
   run at the default schedule can reach at most after its rounds: every rank its 8 rounds x 7 grow
   in a spare slot, in the widest modules (a spare slot in use costs its gradients and moments, one
   never grown its weights only; ``--spare-slots``, peft_alora.layers). Step times: one process holds
   both models and alternates their steps, so both see the same load on a shared machine; the
   ratio is the median over step pairs. Memory: a fresh process per method (so the peak resident
   memory is that method's alone), ALoRA and LoRA alternating, several repetitions, medians.
   Peak memory is the peak of the bytes held by tensors from loading the model to the end of the
   steps: model, adapter, optimizer state and activations, counted by torch's memory profiler
   (plus the weights mapped from the file), so the same every time. The growth of the process's
   peak resident set from after the imports is reported beside it; it also holds memory freed but
   not returned by the C allocator, which made it swing by tens of percent between runs.
2. Whole SFT runs, wall time of ``trainer.train()``: the default recipe (``alora-sft`` with no
   arguments: the real SmolLM2-135M-Instruct, 30 steps, 4 rounds) with ALoRA (its default scorer)
   vs plain LoRA, alternating — this is ``run_time_ratio``; without ``--quick`` also longer TRL
   SFTTrainer runs on the offline toy world (8 scoring rounds), ``toy_run_time_ratio_*``.
   Whole-run workers run with glibc malloc keeping freed memory (``KEEP_FREED_MEMORY``), so that both
   methods' steps run at the same speed. ``--side-by-side`` runs each recipe pair at the same time,
   one process per core, so that other jobs' load hits both; ``--recipe-steps`` trains it longer;
   ``--recipe`` times another recipe (e.g. the one where the rank budget binds).

    python benchmarks/overhead.py --quick      # < 10 min on 2 CPU cores
    python benchmarks/overhead.py --reps 0 --run-reps 0 --recipe-steps 120 --side-by-side  # a longer recipe
    python benchmarks/overhead.py --reps 0 --run-reps 0 --recipe recipes/SmolLM2-135M-Instruct/alora_cpu_qv_r1.yaml

Prints a table, writes benchmarks/results/overhead.json (overhead_quick.json with --quick); the last line is one JSON object with
step_time_ratio, peak_memory_ratio and run_time_ratio (ALoRA / LoRA; the step and memory ratios
are the worst of the precisions measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HERE = os.path.abspath(__file__)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def adapter_config(method: str, r: int, scorer: str = "fast"):
    from peft import LoraConfig

    from peft_alora import ALoRAConfig

    common = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")
    return ALoRAConfig(**common, scorer=scorer) if method == "alora" else LoraConfig(**common)


def model_path(name: str, wide_folder: str) -> str:
    if name == "smollm2":
        from peft_alora.models import default_model_path

        return str(default_model_path())
    return wide_folder


def wide_llama(path: str, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=int(2.75 * hidden) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)


def spare_slots_in_use(layers, module_types: int = 7) -> dict:
    """The spare slots a run at the default schedule can have in use at most, where they cost the most memory:
    every rank grown in its rounds (``allocation_rounds`` x one per module type) in a spare slot (so in a module
    that has lost no rank before, peft_alora.layers), the widest modules' slots first. ``layers``: (name, gated
    layer) pairs; returns {name: spare slots in use}."""
    from peft_alora import ALoRAConfig

    left = ALoRAConfig(target_modules="all-linear").allocation_rounds * module_types
    counts = {}
    for name, layer in sorted(layers, key=lambda item: (-(item[1].in_features + item[1].out_features), item[0])):
        counts[name] = min(left, layer.capacity("default") - layer.r_init["default"])
        left -= counts[name]
    return {name: count for name, count in counts.items() if count > 0}


def _trainable(path: str, precision: str, method: str, r: int, spare_slots: str = "bound"):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft_alora  # noqa: F401

    quant = None
    dtype = torch.bfloat16 if precision == "4bit_bf16" else torch.float32
    if precision in ("4bit", "4bit_bf16"):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant),
                           adapter_config(method, r))
    if method == "alora" and spare_slots != "none":
        # "bound": the state of a run after its rounds, at its most (spare_slots_in_use); "all": every spare slot;
        # "none": before any round (the spare slots then cost their weights only)
        layers = dict(model.base_model.gated_layers())
        counts = {name: layer.capacity("default") - layer.r_init["default"] for name, layer in layers.items()} \
            if spare_slots == "all" else spare_slots_in_use(layers.items())
        for name, count in counts.items():
            for slot in range(layers[name].r_init["default"], layers[name].r_init["default"] + count):
                layers[name].activate_slot("default", slot, generator=torch.Generator().manual_seed(0))
    if precision == "4bit_bf16":
        # what TRL's SFTTrainer does to the adapter of a quantized model (QLoRA): its trainable tensors in bf16
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    model.train()
    # fused: what transformers.Trainer (and so TRL) uses by default (optim="adamw_torch_fused")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(ids):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step.model = model
    return step


def step_worker(setup: str, path: str, args) -> dict:
    """One process holding a LoRA and an ALoRA model: their optimizer steps alternate (the order swapped
    every pair), so both see the same machine load; the ratio of each pair is kept."""
    import torch

    torch.set_num_threads(args.threads)
    steps = {m: _trainable(path, setup.rsplit("-", 1)[-1], m, args.r, args.spare_slots) for m in ("lora", "alora")}
    ids = torch.randint(0, 2048, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    times = {"lora": [], "alora": []}
    for i in range(args.warmup + args.steps):
        for method in (("lora", "alora") if i % 2 == 0 else ("alora", "lora")):
            seconds = steps[method](ids)
            if i >= args.warmup:
                times[method].append(seconds)
    return {"precision": setup, "lora_step_seconds": times["lora"], "alora_step_seconds": times["alora"]}


def tensor_memory_mib(profiler, model_storages: dict) -> tuple[float, float]:
    """``(peak, at the start of training)`` of the bytes held by tensors, from a memory profile whose
    training part ran inside ``record_function("training")``: every tensor allocation and free is
    an event carrying the running total. The model's tensors not allocated inside the profile
    (weights mapped from the safetensors file) are added from ``model_storages`` ({address: bytes}).
    Deterministic, unlike the resident set, which also holds freed memory the C allocator has not
    returned."""
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(trace)
        with open(trace) as handle:
            trace_events = json.load(handle)["traceEvents"]
    training_began = min(e["ts"] for e in trace_events if e.get("name") == "training")
    events = sorted((e["ts"], e["args"]) for e in trace_events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    live: dict[int, int] = {}
    at_start = 0
    for ts, fields in events:
        if ts >= training_began:
            break
        if fields["Bytes"] > 0:
            live[fields["Addr"]] = fields["Bytes"]
        else:
            live.pop(fields["Addr"], None)
        at_start = fields["Total Allocated"]
    mapped = sum(size for address, size in model_storages.items() if address not in live)
    peak = max([at_start] + [fields["Total Allocated"] for ts, fields in events if ts >= training_began])
    return (peak + mapped) / 2**20, (at_start + mapped) / 2**20


def memory_worker(method: str, setup: str, path: str, args) -> dict:
    """One process, one method: the growth of its peak RSS from after the imports to after a few steps,
    and the peak of the bytes held by tensors over the same window (model, adapter, optimizer state,
    activations), counted by the memory profiler."""
    import bitsandbytes  # noqa: F401  (every library the step needs is loaded before the baseline)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from torch.profiler import ProfilerActivity, profile, record_function

    import peft_alora  # noqa: F401

    torch.set_num_threads(args.threads)
    rss_libraries = peak_rss_mib()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step = _trainable(path, setup.rsplit("-", 1)[-1], method, args.r, args.spare_slots)
        ids = torch.randint(0, 2048, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
        tensors = [*step.model.parameters(), *step.model.buffers()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        with record_function("training"):
            for _ in range(args.warmup):
                step(ids)
    peak_rss = peak_rss_mib()
    peak, at_start = tensor_memory_mib(profiler, storages)
    return {"method": method, "precision": setup, "peak_rss_mib": peak_rss,
            "model_and_training_mib": peak_rss - rss_libraries, "tensor_peak_mib": peak, "tensor_at_start_mib": at_start}


def timed_training(trainer, method: str) -> tuple[float, list]:
    """Wall time of ``trainer.train()``, ALoRA with its callback, and the allocator's round history ([] for LoRA)."""
    from peft_alora import ALoRACallback

    callback = ALoRACallback(trainer) if method == "alora" else None
    if callback:
        trainer.add_callback(callback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return seconds, callback.allocator.history if callback else []


def run_worker(method: str, seed: int, scorer: str, args) -> dict:
    """One process: a whole SFTTrainer run on the toy world (ALoRA: its default schedule and scorer)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from peft_alora.toy import toy_dataset, toy_llama, toy_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = toy_tokenizer()
    sft = SFTConfig(output_dir=tempfile.mkdtemp(prefix=f"alora-overhead-{method}-"), max_steps=args.run_steps,
                    per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=10**6, save_strategy="no",
                    report_to=[], seed=seed, assistant_only_loss=True, max_length=64, use_cpu=True, bf16=False,
                    disable_tqdm=True)
    trainer = SFTTrainer(model=toy_llama(len(tokenizer), hidden_size=args.run_hidden, layers=2, seed=seed), args=sft,
                         processing_class=tokenizer, peft_config=adapter_config(method, args.r, scorer),
                         train_dataset=toy_dataset(args.run_steps * 16, seed=seed),
                         eval_dataset=toy_dataset(64, seed=1000 + seed))
    seconds, history = timed_training(trainer, method)
    return {"method": method, "seed": seed, "run_seconds": seconds,
            "scoring_seconds": sum(r["scoring_seconds"] for r in history), "rounds": max(len(history) - 1, 0)}


def recipe_worker(method: str, args) -> dict:
    """One process: the default recipe (``alora-sft`` with no arguments: SmolLM2-135M-Instruct on the
    ISO-dates task) trained with ALoRA (its callback, default scorer) or with plain LoRA from the
    same ModelConfig; the wall time of ``trainer.train()`` (the before/after evaluations are the same for both)."""
    import torch
    from trl import get_peft_config

    from peft_alora.cli.args import parse_args
    from peft_alora.cli.sft import build_trainer

    torch.set_num_threads(args.threads)
    length = ["--max_steps", str(args.recipe_steps)] if args.recipe_steps else []  # default: the recipe's own
    recipe = ["--config", args.recipe] if args.recipe else []  # default: alora-sft's embedded default
    script, training, model, data, alora, _ = parse_args(
        [*recipe, "--output_dir", tempfile.mkdtemp(prefix=f"alora-recipe-{method}-"), "--disable_tqdm", "true", *length])
    trainer, *_ = build_trainer(script, training, model, data, alora,
                                peft_config=get_peft_config(model) if method == "lora" else None)
    seconds, history = timed_training(trainer, method)
    return {"method": method, "run_seconds": seconds, "steps": trainer.state.global_step,
            "scoring_seconds": sum(r["scoring_seconds"] for r in history), "rounds": max(len(history) - 1, 0),
            "final_train_loss": trainer.state.log_history[-1].get("train_loss")}


def _worker_command(kind: str, fields, args) -> list:
    return [sys.executable, HERE, "--worker", kind, *map(str, fields), "--threads", str(args.threads),
            "--r", str(args.r), "--batch", str(args.batch), "--length", str(args.length), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--run-steps", str(args.run_steps),
            "--run-hidden", str(args.run_hidden), "--recipe-steps", str(args.recipe_steps or 0), "--recipe", args.recipe,
            "--spare-slots", args.spare_slots]


def _worker_result(kind: str, fields, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        raise RuntimeError(f"worker {kind} {fields} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


# glibc malloc keeps what it frees (no mmap, no trim) in the whole-run workers (recipe and toy runs). With its defaults, the large
# tensors of a step come from fresh pages (page faults) until something grows and fragments the heap:
# ALoRA's first scoring round does, and its later steps ran 1.5x faster than LoRA's (3.1 -> 2.0 s on
# SmolLM2, same ops; LoRA runs at 2.0 s with these settings too). They make both runs' steps equal, so
# the ratio is the cost of the allocation rounds. Ignored where the C library is not glibc.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


WHOLE_RUNS = ("recipe", "run")  # the workers that time a whole SFT run, scoring rounds included


def _worker_env(kind: str) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **(KEEP_FREED_MEMORY if kind in WHOLE_RUNS else {})}


def in_subprocess(kind: str, *fields, args) -> dict:
    done = subprocess.run(_worker_command(kind, fields, args), capture_output=True, text=True, env=_worker_env(kind))
    return _worker_result(kind, fields, done.returncode, done.stdout, done.stderr)


def side_by_side(kind: str, methods, args) -> list[dict]:
    """One worker per method, all at once (one core each): load from other jobs on a shared machine then
    hits every method alike, which one-after-the-other runs cannot promise."""
    running = [(m, subprocess.Popen(_worker_command(kind, (m,), args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=_worker_env(kind))) for m in methods]
    results = []
    for method, process in running:
        stdout, stderr = process.communicate()
        results.append(_worker_result(kind, (method,), process.returncode, stdout, stderr))
    return results


def ratio(rows, key, **where) -> float:
    pick = lambda m: statistics.median(r[key] for r in rows if r["method"] == m and all(r[k] == v for k, v in where.items()))  # noqa: E731
    return pick("alora") / pick("lora")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed step pairs per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None, help="processes per method and precision")
    parser.add_argument("--run-steps", type=int, default=None)
    parser.add_argument("--run-hidden", type=int, default=128)
    parser.add_argument("--run-reps", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "4bit", "4bit_bf16", "smollm2-fp32"],
                        help="fp32 / 4bit: the wide random Llama (4bit: fp32 compute and adapter, as PEFT and "
                             "the plain Trainer have it); 4bit_bf16: the same 4-bit model with bf16 compute and the "
                             "adapter cast to bf16, as TRL's SFTTrainer trains QLoRA; smollm2-fp32 / smollm2-4bit: "
                             "the real SmolLM2-135M")
    parser.add_argument("--run-scorers", nargs="+", default=None, help="ALoRA scorers of the whole-run comparison")
    parser.add_argument("--recipe-reps", type=int, default=None,
                        help="runs of the default recipe (alora-sft, SmolLM2) per method, ~1.5-2.5 min each; "
                             "its ratio is run_time_ratio (default 1, 2 without --quick)")
    parser.add_argument("--recipe-steps", type=int, default=None,
                        help="train the recipe for this many steps instead of its 30 (its rounds stay at 10%%-40%% of the run)")
    parser.add_argument("--recipe", default="",
                        help="the recipe YAML of the whole-run comparison (default: alora-sft's own, the CPU recipe), "
                             "e.g. recipes/SmolLM2-135M-Instruct/alora_cpu_qv_r1.yaml")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run each LoRA/ALoRA recipe pair at the same time, one process per core")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spare-slots", choices=["bound", "none", "all"], default="bound",
                        help="ALoRA's spare slots in use in the step and memory workers: as many as a default run can "
                             "grow, in the widest modules (bound), none (before any round) or all")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/overhead[_quick].json")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(RESULTS, "overhead_quick.json" if args.quick else "overhead.json")
    args.steps = args.steps if args.steps is not None else (6 if args.quick else 20)
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    args.run_steps = args.run_steps if args.run_steps is not None else 300
    args.run_reps = args.run_reps if args.run_reps is not None else (0 if args.quick else 3)
    args.recipe_reps = args.recipe_reps if args.recipe_reps is not None else (1 if args.quick else 2)
    args.run_scorers = args.run_scorers if args.run_scorers is not None else (["fast"] if args.quick else ["fast", "exact"])
    if args.worker:
        kind, *fields = args.worker
        if kind == "step":
            result = step_worker(fields[0], fields[1], args)
        elif kind == "memory":
            result = memory_worker(fields[0], fields[1], fields[2], args)
        elif kind == "recipe":
            result = recipe_worker(fields[0], args)
        else:
            result = run_worker(fields[0], int(fields[1]), fields[2], args)
        print(json.dumps(result))
        return

    steps, memory, runs = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        wide_llama(folder, args.hidden, args.layers)
        for rep in range(args.reps):
            for precision in args.precisions:
                path = model_path("smollm2" if precision.startswith("smollm2") else "wide", folder)
                row = in_subprocess("step", precision, path, args=args)
                steps.append(row)
                pairs = [a / b for a, b in zip(row["alora_step_seconds"], row["lora_step_seconds"])]
                print(f"{precision:5} rep {rep}: step LoRA {statistics.median(row['lora_step_seconds']):.3f}s "
                      f"ALoRA {statistics.median(row['alora_step_seconds']):.3f}s, paired ratio "
                      f"{statistics.median(pairs):.3f}", flush=True)
                for method in (("lora", "alora") if rep % 2 == 0 else ("alora", "lora")):
                    row = in_subprocess("memory", method, precision, path, args=args)
                    memory.append(row)
                    print(f"{precision:5} {method:6} rep {rep}: tensors peak {row['tensor_peak_mib']:.1f} MiB, "
                          f"peak RSS {row['peak_rss_mib']:.0f} MiB (+{row['model_and_training_mib']:.0f} after imports)",
                          flush=True)
    for rep in range(args.run_reps):
        for method in (("lora", *args.run_scorers) if rep % 2 == 0 else (*args.run_scorers, "lora")):
            kind = "lora" if method == "lora" else "alora"
            row = in_subprocess("run", kind, rep, "fast" if method == "lora" else method, args=args)
            row["scorer"] = None if method == "lora" else method
            runs.append(row)
            print(f"SFT run {kind:6} {row['scorer'] or '':5} rep {rep}: {row['run_seconds']:.1f}s "
                  f"(scoring {row['scoring_seconds']:.1f}s, {row['rounds']} rounds)", flush=True)

    recipes = []
    recipe_name = f"recipe {os.path.basename(args.recipe)}" if args.recipe else "default recipe"
    for rep in range(args.recipe_reps):
        order = ("lora", "alora") if rep % 2 == 0 else ("alora", "lora")
        rows = side_by_side("recipe", order, args) if args.side_by_side else [
            in_subprocess("recipe", method, args=args) for method in order]
        for method, row in zip(order, rows):
            row["side_by_side"] = args.side_by_side
            recipes.append(row)
            print(f"{recipe_name} {method:6} rep {rep}: {row['run_seconds']:.1f}s for {row['steps']} steps "
                  f"(scoring {row['scoring_seconds']:.1f}s, {row['rounds']} rounds)", flush=True)

    table = {}
    for precision in args.precisions if steps else []:
        rows = [r for r in steps if r["precision"] == precision]
        pairs = [a / b for r in rows for a, b in zip(r["alora_step_seconds"], r["lora_step_seconds"])]
        table[precision] = {"step_time_ratio": statistics.median(pairs),
                            "peak_memory_ratio": ratio(memory, "tensor_peak_mib", precision=precision),
                            "rss_growth_ratio": ratio(memory, "model_and_training_mib", precision=precision),
                            "process_peak_rss_ratio": ratio(memory, "peak_rss_mib", precision=precision)}
        for method in ("lora", "alora"):
            table[precision][f"{method}_step_seconds"] = statistics.median(
                t for r in rows for t in r[f"{method}_step_seconds"])
            sel = [r for r in memory if r["method"] == method and r["precision"] == precision]
            table[precision][f"{method}_peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in sel)
            table[precision][f"{method}_model_and_training_mib"] = statistics.median(
                r["model_and_training_mib"] for r in sel)
            table[precision][f"{method}_tensor_peak_mib"] = statistics.median(r["tensor_peak_mib"] for r in sel)
    run_ratios = {}
    if runs:
        lora_run = statistics.median(r["run_seconds"] for r in runs if r["method"] == "lora")
        run_ratios = {scorer: statistics.median(r["run_seconds"] for r in runs if r["scorer"] == scorer) / lora_run
                      for scorer in args.run_scorers}
    recipe_ratio = ratio(recipes, "run_seconds") if recipes else None
    # the figure: the default recipe; the toy runs where the recipe was not run
    run_ratio = recipe_ratio if recipes else run_ratios.get(args.run_scorers[0], float("nan"))
    print("\nstep ratio = median over alternating step pairs of ALoRA / LoRA; peak memory = peak of the bytes held by "
          "tensors (model, adapter, optimizer state, activations; memory profiler); RSS = growth of the process's "
          "peak resident set from after the imports (noisy: it keeps freed memory)")
    print(f"{'precision':12} {'LoRA step s':>11} {'ALoRA step s':>12} {'ratio':>6} {'LoRA MiB':>9} {'ALoRA MiB':>9} "
          f"{'ratio':>6} {'RSS ratio':>9}")
    for precision, t in table.items():
        print(f"{precision:12} {t['lora_step_seconds']:11.3f} {t['alora_step_seconds']:12.3f} {t['step_time_ratio']:6.3f} "
              f"{t['lora_tensor_peak_mib']:9.1f} {t['alora_tensor_peak_mib']:9.1f} "
              f"{t['peak_memory_ratio']:6.3f} {t['rss_growth_ratio']:9.3f}")
    if recipes:
        print(f"{recipe_name} (alora-sft): ALoRA / LoRA wall time of trainer.train() {recipe_ratio:.3f}")
    for scorer, value in run_ratios.items():
        share = statistics.median(r["scoring_seconds"] / r["run_seconds"] for r in runs if r["scorer"] == scorer)
        print(f"whole SFT run, scorer {scorer}: ALoRA / LoRA wall time {value:.3f} (scoring {100 * share:.0f}% of it)")
    headline = {"step_time_ratio": round(max((t["step_time_ratio"] for t in table.values()), default=float("nan")), 4),
                "peak_memory_ratio": round(max((t["peak_memory_ratio"] for t in table.values()), default=float("nan")),
                                           4),
                "run_time_ratio": round(run_ratio, 4),
                **{f"toy_run_time_ratio_{k}": round(v, 4) for k, v in run_ratios.items()},
                **({"recipe_run_time_ratio": round(recipe_ratio, 4)} if recipes else {}),
                **{f"step_time_ratio_{p}": round(t["step_time_ratio"], 4) for p, t in table.items()},
                **{f"peak_memory_ratio_{p}": round(t["peak_memory_ratio"], 4) for p, t in table.items()}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"settings": vars(args), "whole_run_env": KEEP_FREED_MEMORY,
                   "machine": f"{os.cpu_count()}-core CPU, torch threads {args.threads}",
                   "steps": steps, "memory": memory, "runs": runs, "recipes": recipes, "table": table, "headline": headline}, handle, indent=1)
    print(f"wrote {args.out}")
    print(json.dumps(headline))


if __name__ == "__main__":
    main()

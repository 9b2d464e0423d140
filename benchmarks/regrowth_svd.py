"""Gradient regrowth on wide layers: the full SVD against the subspace iteration (``regrowth.py``), CPU.

A random Llama of hidden size 2048 (2 layers, its MLP 5632 wide), ALoRA r = 8 on all linear layers, a
few training steps, then on one model state: the regrowth pass for one new rank in each of layer 1's
seven modules, with the full SVD (``EXACT_SVD_MAX_DIM`` raised past every width) and with the
default, alternating, --repeats times each; the gradient that the new rows catch, ``|G_perp v|^2``
summed over the rows, for both; and one whole allocation round with the default, for scale.

    python benchmarks/regrowth_svd.py       # about 3 minutes on 2 CPU cores

Writes benchmarks/results/regrowth_svd.json; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from overhead import wide_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import peft_alora  # noqa: E402
from peft_alora import regrowth  # noqa: E402
from peft_alora.allocator import RankAllocator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def caught(grads, layers, directions) -> dict:
    """``|G_perp v^T|_F^2`` per module: the gradient the new rows catch (G outside the active rows' span)."""
    out = {}
    for name, rows in directions.items():
        g, layer = grads[name], layers[name]
        active = layer.lora_A["default"].weight.detach().float()[layer.active_slots("default")]
        basis, _ = torch.linalg.qr(active.T)
        out[name] = float((g - (g @ basis) @ basis.T).matmul(rows.T).pow(2).sum())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "regrowth_svd.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:  # the random model's file: 425 MB at hidden 2048
        wide_llama(folder, args.hidden, 2)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # a mapping outlives the file
    model = get_peft_model(base, peft_alora.ALoRAConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        lora_dropout=0.0))
    generator = torch.Generator().manual_seed(0)

    def batch(rows, length=64):
        ids = torch.randint(0, 2048, (rows, length), generator=generator)
        return {"input_ids": ids, "labels": ids.clone()}

    scoring = [batch(8) for _ in range(4)]
    allocator = RankAllocator(model, scoring, total_steps=100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model.train()
        model(**batch(8)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = allocator.layers
    counts = {name: 1 for name in layers if ".layers.1." in name}
    default_limit = regrowth.EXACT_SVD_MAX_DIM

    def directions(limit):
        regrowth.EXACT_SVD_MAX_DIM = limit
        try:
            started = time.perf_counter()
            found, _ = regrowth.gradient_directions(model, layers, "default", counts, allocator.scoring)
            return time.perf_counter() - started, found
        finally:
            regrowth.EXACT_SVD_MAX_DIM = default_limit

    seconds = {"full_svd": [], "default": []}
    found = {}
    for i in range(args.repeats):
        for setting, limit in ((("full_svd", 10**9), ("default", default_limit)) if i % 2 == 0
                               else (("default", default_limit), ("full_svd", 10**9))):
            elapsed, found[setting] = directions(limit)
            seconds[setting].append(elapsed)
    grads, _ = regrowth._weight_gradients(model, {n: layers[n] for n in counts}, allocator.scoring, "default")
    energy = {setting: caught(grads, layers, found[setting]) for setting in found}
    ratios = {name: energy["default"][name] / energy["full_svd"][name] for name in counts}
    started = time.perf_counter()
    allocator.run_round(10, optimizer)
    round_seconds = time.perf_counter() - started
    result = {
        "hidden": args.hidden, "threads": args.threads, "modules": {n: list(layers[n].weight.shape) for n in counts},
        "regrowth_pass_seconds": seconds, "round_seconds_default": round_seconds,
        "speedup": statistics.median(seconds["full_svd"]) / statistics.median(seconds["default"]),
        "caught_gradient_ratio": ratios, "caught_gradient_ratio_min": min(ratios.values()),
    }
    for name in counts:
        print(f"{name.split('model.layers.')[-1]:>20} {tuple(layers[name].weight.shape)}  caught gradient, "
              f"subspace iteration / full SVD {ratios[name]:.4f}")
    print(f"regrowth pass for 7 new ranks: full SVD {statistics.median(seconds['full_svd']):.2f}s, default "
          f"{statistics.median(seconds['default']):.2f}s (medians of {args.repeats}); a whole round with the default "
          f"{round_seconds:.1f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("speedup", "caught_gradient_ratio_min", "round_seconds_default")}))


if __name__ == "__main__":
    main()

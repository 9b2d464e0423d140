"""The output folder of a run and its summary.

    <output_dir>/adapter_config.json, adapter_model.safetensors   stock-LoRA export (plain PEFT, vLLM)
    <output_dir>/alora/                                           native ALoRA adapter (needs peft_alora)
    <output_dir>/alora_allocation.{json,png}                      allocation report and heatmap
    <output_dir>/loss_curve.png, alora_summary.json, README.md    loss curve, numbers, model card

Every rank and parameter count here is of *active* ranks (slots whose gate is on), never of
the capacity slots the adapter holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..export import export_lora
from ..report import type_totals
from .plots import write_loss_curve

NATIVE_SUBFOLDER = "alora"
SUMMARY_FILE = "alora_summary.json"
LOSS_CURVE_FILE = "loss_curve.png"
TRAINING_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
                   "optim", "weight_decay", "bf16", "fp16", "seed")
ADAPTER_FIELDS = ("r", "lora_alpha", "max_r", "lora_dropout", "allocation_start", "allocation_end",
                  "allocation_interval", "allocation_rounds", "ranks_per_round", "scoring_examples",
                  "scoring_batch_size", "scorer")


def _name_base_model(folder: Path, base_model: str) -> None:
    """Point ``base_model_name_or_path`` at the public model name (not a local cache path)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rank_summary(tuner, adapter: str, history: list) -> dict:
    """Active ranks and active trainable parameters, first and last, with the capacity beside them."""
    ranks = {name: layer.num_active(adapter) for name, layer in tuner.gated_layers(adapter)}
    capacity = sum(layer.capacity(adapter) for _, layer in tuner.gated_layers(adapter))
    return {
        "modules": len(ranks),
        "active_ranks_initial": history[0]["active_total"] if history else None,
        "active_ranks_final": tuner.count_active_ranks(adapter),
        "budget": history[-1]["budget"] if history else None,
        "capacity_slots": capacity,
        "active_trainable_params_initial": history[0]["trainable_params"] if history else None,
        "active_trainable_params_final": tuner.count_active_parameters(adapter),
        "rounds": max(len(history) - 1, 0),
        "scoring_seconds": round(sum(float(e.get("scoring_seconds") or 0) for e in history), 2),
        "per_type_ranks": type_totals(ranks),
        "per_module_ranks": ranks,
    }


def save_outputs(trainer, callback, base_model: str, before: dict, after: dict, run: dict,
                 wall_seconds: float) -> dict:
    """Save adapters, export, summary, loss curve and card; returns the summary (empty off the main process)."""
    from ..hub import write_model_card

    out = Path(trainer.args.output_dir)
    native = out / NATIVE_SUBFOLDER
    trainer.save_model(str(native))  # every process: gathers sharded weights where needed
    model = trainer.model
    adapter = model.active_adapter
    export_lora(model, out, adapter_name=adapter)  # every process too (FSDP2 / ZeRO-3 gather); process 0 writes
    if not trainer.accelerator.is_main_process:
        return {}
    for leftover in ("training_args.bin", "README.md"):  # a pickle, and PEFT's empty card template
        (native / leftover).unlink(missing_ok=True)
    trainer.processing_class.save_pretrained(str(out))
    for folder in (out, out / NATIVE_SUBFOLDER):
        _name_base_model(folder, base_model)
    history = callback.allocator.history if callback.allocator is not None else []
    args, config = trainer.args, model.peft_config[adapter]
    summary = {
        "base_model": base_model,
        **run,
        "optimizer_steps": trainer.state.global_step,
        "processes": args.world_size,
        "wall_seconds": round(wall_seconds, 1),
        "before": before,
        "after": after,
        "adapter": rank_summary(model.base_model, adapter, history),
        "training": {name: getattr(getattr(args, name), "value", getattr(args, name))
                     for name in TRAINING_FIELDS if hasattr(args, name)},
        "alora_config": {name: getattr(config, name) for name in ADAPTER_FIELDS},
        "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, (set, list))
        else config.target_modules,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_loss_curve(trainer.state.log_history, out / LOSS_CURVE_FILE, before.get("eval_loss"),
                     after.get("eval_loss"), round_steps=tuple(e["step"] for e in history[1:]))
    write_model_card(out, summary)
    trainer.accelerator.print(format_summary(summary, out))
    return summary


def _held_out(summary: dict) -> str:
    held = summary.get("scoring_examples_held_out")
    return f"; the {held} scored on are left out" if held else ""


def format_summary(summary: dict, out: Path) -> str:
    ranks, metric = summary["adapter"], summary.get("task_metric")
    lines = [f"alora-sft finished in {summary['wall_seconds']:.0f} s ({summary['optimizer_steps']} optimizer steps, "
             f"{ranks['rounds']} allocation round{'' if ranks['rounds'] == 1 else 's'}, "
             f"{ranks['scoring_seconds']:.0f} s scoring)",
             f"  eval loss     {summary['before']['eval_loss']:.4f} -> {summary['after']['eval_loss']:.4f}"]
    if metric:
        lines.append(f"  {metric:<13} {summary['before'][metric]:.3f} -> {summary['after'][metric]:.3f} "
                     f"({summary['after'][metric + '_examples']} eval examples{_held_out(summary)})")
    lines += [f"  active ranks  {ranks['active_ranks_final']} of budget {ranks['budget']} in {ranks['modules']} "
              f"modules (capacity {ranks['capacity_slots']} slots)",
              f"  active trainable parameters {ranks['active_trainable_params_final']:,}",
              f"  per type      {ranks['per_type_ranks']}",
              f"  output        {os.path.abspath(out)}: stock-LoRA export at the root, native adapter in "
              f"{NATIVE_SUBFOLDER}/, alora_allocation.png, {LOSS_CURVE_FILE}, {SUMMARY_FILE}, README.md"]
    return "\n".join(lines)

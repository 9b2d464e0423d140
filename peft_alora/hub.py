"""Model card and Hub upload of an ``alora-sft`` output folder.

The repository mirrors the folder: the stock-LoRA export at the root (plain PEFT and vLLM load
it), the native ALoRA adapter in ``alora/``, and a card that says ``library_name: peft`` (TRL's
own card would say ``transformers``), the base model, the allocation picture and the results.
Checkpoints and logs stay local.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .report import NO_LAYER, allocation_matrix

UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/*", "runs/*", "runs/**", "*.pt", "*.pth", "*.bin", ".*"]
TAGS = ["peft", "lora", "alora", "allocating-lora", "peft-alora", "trl", "sft"]
CARD_FILE = "README.md"


def _yaml_list(values) -> str:
    return "".join(f"\n- {v}" for v in values)


def _model_link(name: str) -> str:
    """A Hub link for a Hub id, the plain name for a local path."""
    if name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/")):
        return f"[{name}](https://huggingface.co/{name})"
    return f"`{name}`"


def _weights_note(summary: dict) -> str:
    note = summary.get("base_weights")
    return f"\n\nBase weights used in training: {note}." if note else ""


def _results_table(summary: dict) -> str:
    before, after = summary["before"], summary["after"]
    rows = ["| metric | before training | after training |", "| --- | --- | --- |",
            f"| eval loss | {before['eval_loss']:.4f} | {after['eval_loss']:.4f} |"]
    metric = summary.get("task_metric")
    if metric and metric in before:
        rows.append(f"| {metric} ({after[metric + '_examples']} eval examples, greedy) | {before[metric]:.3f} | "
                    f"{after[metric]:.3f} |")
    return "\n".join(rows)


def _held_out_note(summary: dict) -> str:
    held = summary.get("scoring_examples_held_out")
    if not held:
        return ""
    counted = summary.get("eval_examples")  # None for a streaming split
    return (f"\n\nMeasured on the {f'{counted} ' if counted else ''}eval examples outside ALoRA's scoring set: "
            f"{held} of the eval split were used to score ranks and aim regrown ones, and are left out.")


def _rank_table(per_module: dict) -> str:
    layers, types, matrix = allocation_matrix(per_module)
    rows = ["| layer | " + " | ".join(types) + " |", "| --- |" + " --- |" * len(types)]
    for layer, cells in zip(layers, matrix):
        rows.append(f"| {'-' if layer == NO_LAYER else layer} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def _settings_table(summary: dict) -> str:
    items = {**summary.get("training", {}), **summary.get("alora_config", {}),
             "target_modules": summary.get("target_modules")}
    return "\n".join(["| setting | value |", "| --- | --- |"] + [f"| {k} | `{v}` |" for k, v in items.items()])


def model_card(summary: dict, repo_id: str) -> str:
    """The card's markdown (YAML metadata first), from a run's ``alora_summary.json``."""
    base, ranks = summary["base_model"], summary["adapter"]
    largest = max(ranks["per_module_ranks"].values())
    return f"""---
library_name: peft
base_model: {base}
pipeline_tag: text-generation
tags:{_yaml_list(TAGS)}
---

# {repo_id.split('/')[-1]}

An ALoRA (Allocating LoRA) adapter of {_model_link(base)}, fine-tuned with `alora-sft` (peft-alora)
on {summary.get('dataset')} ({summary.get('train_examples')}
training examples, {summary.get('optimizer_steps')} optimizer steps). During training, ALoRA scored every LoRA rank,
pruned the weakest across the model and regrew ranks where they were needed
({ranks['rounds']} rounds), so modules end with different ranks.{_weights_note(summary)}

![allocation of ranks (layer x module type) and training loss](alora_allocation.png)

## Results (held-out eval split)

{_results_table(summary)}{_held_out_note(summary)}

![loss curve](loss_curve.png)

## Ranks

{ranks['active_ranks_final']} active ranks (budget {ranks['budget']}) in {ranks['modules']} modules, i.e.
{ranks['active_trainable_params_final']:,} trainable LoRA parameters in active ranks; largest rank {largest}.
Per module type: {', '.join(f'{t} {n}' for t, n in ranks['per_type_ranks'].items())}.

<details><summary>Active ranks per module (layer x type)</summary>

{_rank_table(ranks['per_module_ranks'])}

</details>

## Training settings

{_settings_table(summary)}

## How to load

The repository root is a **stock LoRA adapter** (gates and scales folded into B, only active ranks,
`rank_pattern`/`alpha_pattern` with every scale 1): plain PEFT loads it, no `peft_alora` needed.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

The native ALoRA adapter (gates, all capacity slots; for continuing training or re-allocating) is in
`alora/` and needs `pip install peft-alora` and `import peft_alora` before loading:

```python
import peft_alora  # registers ALoRA with PEFT
model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="alora")
```

With vLLM (which ignores rank/alpha patterns; the export is written so that it does not need them — not
tested by peft-alora itself):

```python
from huggingface_hub import snapshot_download
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

llm = LLM("{base}", enable_lora=True, max_lora_rank={max(8, largest)})
outputs = llm.generate(["..."], SamplingParams(max_tokens=32),
                       lora_request=LoRARequest("alora", 1, snapshot_download("{repo_id}")))
```
"""


def write_model_card(out_dir, summary: dict, repo_id: Optional[str] = None) -> Path:
    """Write ``README.md`` into ``out_dir``; ``repo_id`` defaults to the folder's name."""
    out = Path(out_dir)
    path = out / CARD_FILE
    path.write_text(model_card(summary, repo_id or out.resolve().name), encoding="utf-8")
    return path


def upload_files(out_dir) -> list[str]:
    """The files (relative paths) :func:`push_output_dir` uploads, with the same filter the upload applies."""
    from huggingface_hub.utils import filter_repo_objects

    out = Path(out_dir)
    paths = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE))


def push_problem(token: Optional[str] = None) -> Optional[str]:
    """Why a push at the end of a run would fail, found before training (no network call): offline mode,
    or no token. None when nothing is known to stand in the way."""
    from huggingface_hub import constants, get_token

    later = ("or train without --push_to_hub and push the finished folder later with "
             "`peft_alora.hub.push_output_dir(output_dir, repo_id)`.")
    if constants.HF_HUB_OFFLINE:
        return f"--push_to_hub true, but HF_HUB_OFFLINE is set, so the push after training would fail: unset it, {later}"
    if token is None and get_token() is None:
        return ("--push_to_hub true, but there is no Hugging Face token, so the push after training would fail: run "
                f"`hf auth login`, set HF_TOKEN or pass --hub_token, {later}")
    return None


def push_output_dir(out_dir, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                    api=None) -> str:
    """Create ``repo_id`` if needed, rewrite the card for it and upload the folder; returns the repo URL.

    ``api`` defaults to ``huggingface_hub.HfApi(token=token)`` (tests pass a local stand-in).
    """
    out = Path(out_dir)
    summary_path = out / "alora_summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{out} holds no alora_summary.json: push the output folder of a finished alora-sft run.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    write_model_card(out, json.loads(summary_path.read_text()), repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(out), ignore_patterns=UPLOAD_IGNORE,
                      commit_message="alora-sft: stock-LoRA export at the root, native ALoRA adapter in alora/")
    return str(url)

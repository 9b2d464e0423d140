"""What the run measures on eval prompts: greedy replies, the task metric, a few shown generations.

A row is TRL's prompt-completion format (``prompt``/``completion``, as messages or as text) or
the conversational ``messages`` format, whose last message is the reference answer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..data.iso_dates import exact_match

TASK_METRICS: dict[str, Callable[[str, str], bool]] = {"exact_match": exact_match}


def split_row(row: dict) -> tuple:
    """``(prompt, reference)``: the prompt as messages or text, the reference answer as text."""
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        return prompt, completion[-1]["content"] if isinstance(completion, list) else completion
    if "messages" in row and row["messages"] and row["messages"][-1]["role"] == "assistant":
        return row["messages"][:-1], row["messages"][-1]["content"]
    raise ValueError(
        f"eval rows with columns {sorted(row)} cannot be split into prompt and reference answer: the task metric "
        "and the shown generations need 'prompt'/'completion' or 'messages' ending with the assistant's answer "
        "(or leave task_metric unset and show_generations at 0)."
    )


def _render(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 16,
                     desc: str = "generating") -> list[str]:
    """Greedy replies, left-padded batches; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    replies = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
            texts = [_render(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                 use_cache=True)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def evaluate_generations(model, tokenizer, dataset, metric: Optional[str], n_metric: int, n_show: int,
                         max_new_tokens: int, desc: str) -> dict:
    """``{"<metric>": score, "generations": [...]}`` on the first eval rows (as many as either needs)."""
    n = min(len(dataset), max(n_metric if metric else 0, n_show))
    if n == 0:
        return {}
    rows = [split_row(dataset[i]) for i in range(n)]
    replies = generate_replies(model, tokenizer, [p for p, _ in rows], max_new_tokens, desc=desc)
    result = {}
    if metric:
        checks = [TASK_METRICS[metric](reply, ref) for reply, (_, ref) in zip(replies[:n_metric], rows[:n_metric])]
        result[metric] = sum(checks) / len(checks)
        result[f"{metric}_examples"] = len(checks)
    if n_show:
        result["generations"] = [{"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
                                  "reference": ref, "reply": reply}
                                 for (prompt, ref), reply in zip(rows[:n_show], replies[:n_show])]
    return result

"""What the run measures on the eval split: loss, the task metric, a few shown generations.

The task metric ``exact_match`` is greedy exact match computed by teacher forcing: a reply
decoded greedily equals the reference (and then ends) exactly when, given the reference's own
prefix, every reference token, end-of-turn included, is the model's top-1 prediction. So one
forward pass over the eval split gives both the loss and the metric, at the cost of the Trainer's
own evaluation, where generating every reply would cost a prefill plus one pass per new token.
(A reply that spells the reference with other tokens counts as a miss: the metric is a lower bound.)
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.iso_dates import exact_match

IGNORE_INDEX = -100
TASK_METRICS = ("exact_match",)
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@torch.no_grad()
def loss_and_exact_match(trainer, desc: str) -> dict:
    """Eval loss (mean over completion tokens) and greedy exact match over the trainer's eval split."""
    model = trainer.model
    was_training = model.training
    model.eval()
    per_row = []
    try:
        for batch in tqdm(trainer.get_eval_dataloader(), desc=desc, leave=False,
                          disable=not trainer.is_local_process_zero() or trainer.args.disable_tqdm):
            batch = trainer._prepare_inputs(batch)
            logits = model(**{k: batch[k] for k in _MODEL_INPUTS if k in batch}).logits[:, :-1]
            target = batch["labels"][:, 1:]
            mask = target != IGNORE_INDEX
            answer_logits, answer_target = logits[mask].float(), target[mask]  # answer positions only
            rows_of = mask.nonzero()[:, 0]
            nll = torch.nn.functional.cross_entropy(answer_logits, answer_target, reduction="none")
            miss = (answer_logits.argmax(-1) != answer_target).float()
            zeros = torch.zeros(len(target), device=nll.device)
            row = torch.stack([zeros.index_add(0, rows_of, nll), mask.sum(1).float(),
                               (zeros.index_add(0, rows_of, miss) == 0).float()], dim=1)
            per_row.append(trainer.accelerator.gather_for_metrics(row[mask.any(1)]))
    finally:
        model.train(was_training)
    rows = torch.cat(per_row)
    return {"eval_loss": (rows[:, 0].sum() / rows[:, 1].sum()).item(), "exact_match": rows[:, 2].mean().item(),
            "exact_match_examples": len(rows)}


def split_row(row: dict) -> tuple:
    """``(prompt, reference)``: the prompt as messages or text, the reference answer as text."""
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        return prompt, completion[-1]["content"] if isinstance(completion, list) else completion
    if "messages" in row and row["messages"] and row["messages"][-1]["role"] == "assistant":
        return row["messages"][:-1], row["messages"][-1]["content"]
    raise ValueError(
        f"eval rows with columns {sorted(row)} cannot be split into prompt and reference answer: shown generations "
        "need 'prompt'/'completion' or 'messages' ending with the assistant's answer (or set show_generations 0)."
    )


def _render(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list, max_new_tokens: int, desc: str = "generating") -> list[str]:
    """Greedy replies in one left-padded batch; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        batch = tokenizer([_render(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(next(model.parameters()).device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             use_cache=True)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def shown_generations(model, tokenizer, dataset, n: int, max_new_tokens: int) -> list[dict]:
    """Replies to the first ``n`` eval prompts, with the reference and whether they match it exactly."""
    rows = [split_row(dataset[i]) for i in range(min(n, len(dataset)))]
    replies = generate_replies(model, tokenizer, [p for p, _ in rows], max_new_tokens)
    return [{"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"], "reference": ref,
             "reply": reply, "exact_match": exact_match(reply, ref)} for (prompt, ref), reply in zip(rows, replies)]

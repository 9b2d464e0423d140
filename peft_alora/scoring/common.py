"""What every scorer shares: the fixed scoring set, its loss, and eval mode while scoring."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100
NO_SCORING_DATA = (
    "ALoRA has no scoring data: give the trainer an eval_dataset, or pass scoring_dataset= to "
    "ALoRACallback / scoring batches to RankAllocator."
)


@dataclass
class ScoringSet:
    """Collated micro-batches of the fixed scoring examples.

    ``cache`` holds what scorers may keep between rounds because it depends only on this set and
    the frozen base model (see ``scoring/base_gradient.py``).
    """

    batches: list[dict]
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not self.batches:
            raise ValueError(NO_SCORING_DATA)
        for i, batch in enumerate(self.batches):
            if "labels" not in batch:
                raise ValueError(f"scoring batch {i} has no 'labels': the collator must produce training labels.")
            if trained_token_count(batch["labels"]) == 0:
                raise ValueError(
                    f"scoring batch {i} has no trained token (every label is {IGNORE_INDEX}, e.g. the completions "
                    "were truncated away): raise max_length or use longer scoring examples."
                )

    @property
    def n_tokens(self) -> int:
        return sum(trained_token_count(b["labels"]) for b in self.batches)


def base_is_frozen(model: torch.nn.Module) -> bool:
    """Only LoRA factors train (no bias, embedding or modules_to_save): the base model then computes the
    same on the scoring set all run, so what scorers derive from it may be kept in ``ScoringSet.cache``."""
    return all("lora_A" in name or "lora_B" in name for name, p in model.named_parameters() if p.requires_grad)


def base_cache_key(model: torch.nn.Module, what: str, adapter: str, layers) -> tuple:
    return (what, id(model), adapter, tuple(layers))


def trained_token_count(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while scoring; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def forwards_replaced(modules, make_forward):
    """Inside, each module's ``forward`` is ``make_forward(module)`` (module hooks still run around it); afterwards
    the module's own forward, or an override it had before (e.g. accelerate's), is back."""
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = make_forward(module)
    try:
        yield
    finally:
        for module, forward in zip(modules, saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _to_device(batch: Mapping, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


@contextlib.contextmanager
def _head_on(model: torch.nn.Module, keep: torch.Tensor):
    """Run the output layer only on the positions in ``keep`` (predicting a trained token).

    The LM head is a large share of a forward pass (SmolLM2: 49,152-token vocabulary) and scoring
    needs its output only where a loss is taken. A pre-hook hands the head ``hidden[:, :-1][keep]``;
    the model then returns 2-D logits, one row per trained token.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def select(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != (keep.shape[0], keep.shape[1] + 1):
            return None  # not the layout we know: leave the head alone
        return (hidden[:, :-1][keep],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def batch_loss_sum(model: torch.nn.Module, batch: Mapping, device) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained tokens of one micro-batch, computed in fp32.

    Any autocast of the training loop is switched off: scores decide the same under bf16 and fp32
    training. Gradients flow when the caller enables them.
    """
    batch = _to_device(batch, device)
    labels = batch.pop("labels")
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    with torch.autocast(device_type=device.type, enabled=False), _head_on(model, keep):
        logits = model(**batch).logits
    if logits.dim() == 3:  # the head saw every position
        logits = logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


@torch.no_grad()
def scoring_loss(model: torch.nn.Module, scoring: ScoringSet) -> float:
    """Mean next-token cross-entropy over all trained tokens of the scoring set (fp32)."""
    device = model_device(model)
    total = sum(batch_loss_sum(model, batch, device).item() for batch in scoring.batches)
    return total / scoring.n_tokens

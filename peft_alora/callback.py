"""``ALoRACallback``: runs the ALoRA schedule inside ``transformers.Trainer`` / TRL's ``SFTTrainer``.

    trainer.add_callback(ALoRACallback(trainer))

The callback takes the trainer (as TRL's ``LogCompletionsCallback`` does) because a Trainer
gives its callbacks neither itself nor, unless it evaluates, any eval data.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .allocator import RankAllocator
from .report import write_report
from .scoring import NO_SCORING_DATA, ScoringSet

logger = logging.getLogger(__name__)

STATE_KEY = "ALoRAAllocator"  # entry in TrainerState.stateful_callbacks (saved in every checkpoint)


def _prepared(trainer, dataset):
    """Tokenise a raw dataset the way the trainer prepared its own (TRL's SFTTrainer); no-op otherwise."""
    prepare = getattr(trainer, "_prepare_dataset", None)
    if prepare is None or getattr(trainer, "_skip_prepare_dataset", False):
        return dataset
    args = trainer.args
    packing = args.packing if getattr(args, "eval_packing", None) is None else args.eval_packing
    return prepare(dataset, trainer.processing_class, args, packing, getattr(trainer, "_formatting_func", None),
                   "alora_scoring")


def build_scoring_set(trainer, dataset, n_examples: int, batch_size: int, seed: int) -> ScoringSet:
    """Draw ``n_examples`` once (seeded) and collate them with the trainer's own collator.

    A map-style dataset is sampled with a generator seeded by ``seed``; a streaming (iterable)
    dataset gives its first ``n_examples``.
    """
    if dataset is None:
        dataset = trainer.eval_dataset
        if isinstance(dataset, dict):
            name = sorted(dataset)[0]
            logger.info("ALoRA: scoring on eval dataset %r", name)
            dataset = dataset[name]
    else:
        dataset = _prepared(trainer, dataset)
    if dataset is None:
        raise ValueError(NO_SCORING_DATA)
    collator = trainer.data_collator
    if not hasattr(dataset, "__len__"):  # streaming
        examples = list(itertools.islice(dataset, n_examples))
        collator = trainer._get_collator_with_removed_columns(collator, description="ALoRA scoring")
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(len(dataset), generator=generator)[:n_examples].tolist())
        if hasattr(dataset, "select"):  # datasets.Dataset: drop the columns the model does not take
            subset = trainer._remove_unused_columns(dataset.select(indices), description="ALoRA scoring")
            examples = [subset[i] for i in range(len(subset))]
        else:
            examples = [dataset[i] for i in indices]
            collator = trainer._get_collator_with_removed_columns(collator, description="ALoRA scoring")
    return ScoringSet([collator(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)])


class ALoRACallback(TrainerCallback):
    """Scores, prunes and regrows ALoRA ranks on the schedule of the model's ``ALoRAConfig``.

    Args:
        trainer: the ``Trainer`` / ``SFTTrainer`` whose model holds the ALoRA adapter.
        scoring_dataset: examples to score on (raw or prepared); default: the trainer's eval dataset.
        report_dir: where ``alora_allocation.{json,png}`` go at the end; default ``args.output_dir``.
    """

    def __init__(self, trainer, scoring_dataset=None, adapter_name: Optional[str] = None,
                 report_dir: Optional[str] = None):
        self.trainer = trainer
        self.scoring_dataset = scoring_dataset
        self.adapter_name = adapter_name
        self.report_dir = report_dir
        self.allocator: Optional[RankAllocator] = None
        self.report_paths: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = model if model is not None else self.trainer.model
        tuner_config = model.peft_config[self.adapter_name or model.active_adapter]
        scoring = build_scoring_set(self.trainer, self.scoring_dataset, tuner_config.scoring_examples,
                                    tuner_config.scoring_batch_size, args.seed)
        show = state.is_local_process_zero and not args.disable_tqdm
        self.allocator = RankAllocator(
            model, scoring, total_steps=state.max_steps, adapter_name=self.adapter_name, seed=args.seed,
            progress=(lambda ranks: tqdm(ranks, desc="ALoRA scoring", leave=False)) if show else None,
        )
        saved = state.stateful_callbacks.get(STATE_KEY)
        if saved is not None and state.global_step > 0:
            self.allocator.load_state_dict(saved)  # resumed from a checkpoint
        elif state.global_step > 0:
            logger.warning("ALoRA: resuming at step %d from a checkpoint without ALoRA allocator state; the "
                           "rounds scheduled up to that step are skipped.", state.global_step)
            self.allocator.schedule = [s for s in self.allocator.schedule if s > state.global_step]
        state.stateful_callbacks[STATE_KEY] = self.allocator.state_dict()
        if state.is_world_process_zero:
            logger.info("ALoRA: %d gated modules, budget %d ranks, rounds after steps %s, %d ranks per round",
                        len(self.allocator.layers), self.allocator.budget, self.allocator.schedule,
                        self.allocator.ranks_per_round)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        record = self.allocator.step(state.global_step, optimizer)
        if record is None:
            return
        state.stateful_callbacks[STATE_KEY] = self.allocator.state_dict()
        self._log(control, {
            "alora/round": record["round"],
            "alora/pruned": len(record["pruned"]),
            "alora/added": sum(record["grown"].values()),
            "alora/active_ranks": record["active_total"],
            "alora/trainable_params": record["trainable_params"],
            "alora/scoring_seconds": round(record["scoring_seconds"], 3),
            "alora/scoring_loss": record["scoring_loss"],
        })

    def _log(self, control, metrics: dict) -> None:
        """Log through the Trainer (console, TensorBoard, W&B...) without disturbing its own logging.

        The base ``Trainer.log`` is called on purpose: TRL's override would attach and reset the
        running training metrics (entropy, token accuracy) meant for the regular log. Logging also
        clears ``control.should_log``, which would cancel the regular loss log of this very step.
        """
        should_log = control.should_log
        Trainer.log(self.trainer, metrics)
        control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.allocator is None or not state.is_world_process_zero:
            return
        out_dir = self.report_dir or args.output_dir
        losses = [(entry["step"], entry["loss"]) for entry in state.log_history if "loss" in entry and "step" in entry]
        self.report_paths = write_report(self.allocator.history, out_dir, loss_curve=losses)
        logger.info("ALoRA allocation report written to %s", os.path.abspath(out_dir))

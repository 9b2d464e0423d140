"""``ALoRACallback``: runs the ALoRA schedule inside ``transformers.Trainer`` / TRL's ``SFTTrainer``.

    trainer.add_callback(ALoRACallback(trainer))

The callback takes the trainer (as TRL's ``LogCompletionsCallback`` does) because a Trainer
gives its callbacks neither itself nor, unless it evaluates, any eval data.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .allocator import RankAllocator, loud_warning
from .config import alora_config_of
from .distributed import check_engine, fsdp_ignored_warning
from .report import write_report
from .scoring import IGNORE_INDEX, NO_SCORING_DATA, ScoringSet

logger = logging.getLogger(__name__)

NEEDS_TRAINER = (
    "ALoRACallback needs its trainer (it scores on the trainer's eval data with the trainer's collator), so it cannot "
    "go in Trainer(callbacks=[...]): build the trainer first, then trainer.add_callback(ALoRACallback(trainer))."
)
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


def scoring_indices(n_rows: int, n_examples: int, seed: int) -> list[int]:
    """The rows of a map-style dataset of ``n_rows`` that the scoring set takes with this seed (sorted)."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_rows, generator=generator)[:n_examples].tolist())


def build_scoring_set(trainer, dataset, n_examples: int, batch_size: int, seed: int) -> ScoringSet:
    """Draw ``n_examples`` once (seeded) and collate them with the trainer's own collator.

    A map-style dataset is sampled with a generator seeded by ``seed``; a streaming (iterable)
    dataset gives its first ``n_examples``.
    """
    given = dataset
    if dataset is None:
        dataset = trainer.eval_dataset
        if isinstance(dataset, dict):
            name = sorted(dataset)[0]
            logger.info("ALoRA: scoring on eval dataset %r", name)
            dataset = dataset[name]
    if dataset is None:
        raise ValueError(NO_SCORING_DATA)
    source = "the trainer's eval_dataset" if given is None else "scoring_dataset"
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"ALoRA: {source} is empty: give it examples to score on.")
    if given is not None:
        dataset = _prepared(trainer, dataset)
    collator = trainer.data_collator
    if not hasattr(dataset, "__len__"):  # streaming
        examples = list(itertools.islice(dataset, n_examples))
        collator = trainer._get_collator_with_removed_columns(collator, description="ALoRA scoring")
    else:
        indices = scoring_indices(len(dataset), n_examples, seed)
        if hasattr(dataset, "select"):  # datasets.Dataset: drop the columns the model does not take
            subset = trainer._remove_unused_columns(dataset.select(indices), description="ALoRA scoring")
            examples = [subset[i] for i in range(len(subset))]
        else:
            examples = [dataset[i] for i in indices]
            collator = trainer._get_collator_with_removed_columns(collator, description="ALoRA scoring")
    if not examples:
        raise ValueError(f"ALoRA: {source} has no example left after the trainer prepared it (TRL drops examples "
                         "whose completion was truncated away): give shorter scoring examples or raise max_length.")
    scoring = ScoringSet([collator(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)])
    untrained = sum(int(((batch["labels"][..., 1:] != IGNORE_INDEX).sum(-1) == 0).sum()) for batch in scoring.batches)
    if len(examples) < n_examples or untrained:
        message = (f"ALoRA scores on {len(examples) - untrained} example(s) with trained tokens instead of "
                   f"scoring_examples={n_examples}: {source} gave {len(examples)}, {untrained} of them with every "
                   "label masked (e.g. the completion truncated away). Give more or shorter examples, or raise "
                   "max_length.")
        loud_warning(message)
    return scoring


class ALoRACallback(TrainerCallback):
    """Scores, prunes and regrows ALoRA ranks on the schedule of the model's ``ALoRAConfig``.

    Args:
        trainer: the ``Trainer`` / ``SFTTrainer`` whose model holds the ALoRA adapter.
        scoring_dataset: examples to score on (raw or prepared); default: the trainer's eval dataset.
        report_dir: where ``alora_allocation.{json,png}`` go at the end; default ``args.output_dir``.
    """

    def __init__(self, trainer=None, scoring_dataset=None, adapter_name: Optional[str] = None,
                 report_dir: Optional[str] = None):
        if trainer is None:  # e.g. Trainer(callbacks=[ALoRACallback]), which instantiates the class with no argument
            raise TypeError(NEEDS_TRAINER)
        self.trainer = trainer
        self.scoring_dataset = scoring_dataset
        self.adapter_name = adapter_name
        self.report_dir = report_dir
        self.allocator: Optional[RankAllocator] = None
        self.report_paths: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        handler = getattr(self.trainer, "callback_handler", None)
        copies = sum(isinstance(c, ALoRACallback) for c in getattr(handler, "callbacks", ()))
        if copies > 1:
            raise ValueError(f"ALoRACallback was added {copies} times to this trainer: each copy would run every "
                             "round, pruning and regrowing ranks that many times. Add it once.")
        model = model if model is not None else self.trainer.model
        tuner_config = alora_config_of(model, self.adapter_name, "ALoRACallback", "create it with "
                                       "peft_alora.ALoRAConfig (or drop the callback for plain LoRA).")
        check_engine(model, optimizer)
        ignored = fsdp_ignored_warning(args, model)
        if ignored:
            loud_warning("ALoRA: " + ignored)
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
            self.allocator.restore_position(state.global_step)
            logger.warning(
                "ALoRA: resuming at step %d from a checkpoint whose trainer_state.json has no %r entry: the %d "
                "round(s) scheduled up to that step count as done, the allocation is taken from the loaded gates, "
                "and the settings of the interrupted run cannot be compared with this one's; the report's history "
                "starts here.", state.global_step, STATE_KEY, self.allocator.rounds_done)
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
            "alora/budget": record["budget"],
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
        try:
            self.report_paths = write_report(self.allocator.history, out_dir, loss_curve=losses)
        except Exception as error:  # the trained model matters more than its report: never lose it here
            message = (f"ALoRA: could not write the allocation report to {os.path.abspath(out_dir)} ({error!r}); "
                       "training is not affected, and the history is still in callback.allocator.history.")
            logger.error(message)
            warnings.warn(message, stacklevel=2)
            return
        logger.info("ALoRA allocation report written to %s", os.path.abspath(out_dir))

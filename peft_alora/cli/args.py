"""Arguments of ``alora-sft``: TRL's own dataclasses plus the ALoRA schedule and the run's evaluation.

The LoRA side of the adapter (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``...)
comes from TRL's ``ModelConfig`` flags users already know; :class:`ALoRAArguments` adds the fields
that only ALoRA has, under the names ``ALoRAConfig`` gives them.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

from ..config import SCORERS, ALoRAConfig
from .evaluation import TASK_METRICS

DEFAULT_RECIPE = Path(__file__).parent / "default.yaml"


def _number(value: str):
    """A schedule point from the command line: ``10`` is a step, ``0.1`` a fraction of the run."""
    return float(value) if any(c in value for c in ".eE") else int(value)


@dataclass
class ALoRAArguments:
    """The ALoRA-only fields of :class:`peft_alora.ALoRAConfig` (defaults: the config's own)."""

    max_r: Optional[int] = field(default=None, metadata={"help": "Rank slots per module (default 2 * lora_r)."})
    allocation_start: Optional[str] = field(
        default=None, metadata={"help": "First round: optimizer step (int) or fraction of the run (float)."})
    allocation_end: Optional[str] = field(
        default=None, metadata={"help": "Last round: step or fraction (rounds spread evenly from start to end)."})
    allocation_interval: Optional[str] = field(
        default=None, metadata={"help": "Steps (or fraction) between rounds, instead of allocation_end."})
    allocation_rounds: Optional[int] = field(default=None, metadata={"help": "Prune-and-regrow rounds."})
    ranks_per_round: Optional[int] = field(
        default=None, metadata={"help": "Ranks pruned and regrown per round (default: number of module types)."})
    scoring_examples: Optional[int] = field(default=None, metadata={"help": "Size of the fixed scoring set."})
    scoring_batch_size: Optional[int] = field(default=None, metadata={"help": "Micro-batch of scoring passes."})
    scorer: Optional[str] = field(default=None, metadata={"help": f"Importance scorer, one of {SCORERS}."})
    scoring_refine: Optional[int] = field(
        default=None, metadata={"help": "Fast scorer: at most this many low-scored ranks get their removal "
                                        "computed exactly, until the pruned set is settled (default 2 * "
                                        "ranks_per_round; 0: first order only)."})
    regrow_init: Optional[str] = field(
        default=None, metadata={"help": "A regrown rank's A row: 'gradient' (default) or 'random' (the paper)."})

    def to_config(self, model_args: ModelConfig) -> ALoRAConfig:
        """The adapter config: LoRA fields from TRL's ``ModelConfig``, ALoRA fields from here."""
        targets = model_args.lora_target_modules
        if targets is None or targets == "all-linear" or list(targets) == ["all-linear"]:
            targets = "all-linear"
        kwargs = dict(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=targets, modules_to_save=model_args.lora_modules_to_save,
                      task_type=model_args.lora_task_type, use_rslora=model_args.use_rslora,
                      use_dora=model_args.use_dora, target_parameters=model_args.lora_target_parameters)
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None:
                continue
            if spec.name.startswith("allocation_") and spec.name != "allocation_rounds":
                value = None if str(value).lower() == "none" else _number(str(value))
            kwargs[spec.name] = value
        return ALoRAConfig(**kwargs)


@dataclass
class EvalArguments:
    """What the run measures before and after training, besides the eval loss."""

    task_metric: Optional[str] = field(
        default=None, metadata={"help": f"Score the eval split's answers, one of {TASK_METRICS} (greedy exact match, "
                                        "by teacher forcing, in the same pass as the eval loss); 'none' turns a recipe's off."})
    show_generations: int = field(default=0, metadata={"help": "Eval prompts whose greedy replies are shown and "
                                                               "kept in the summary, before and after training."})
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length of the shown replies."})

    def __post_init__(self):
        if self.task_metric in ("none", ""):  # so that a flag can turn off the metric a recipe sets
            self.task_metric = None
        if self.task_metric is not None and self.task_metric not in TASK_METRICS:
            raise ValueError(f"task_metric={self.task_metric!r}: choose one of {TASK_METRICS}, or 'none' for the "
                             "eval loss alone.")
        for name in ("show_generations", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name == "max_new_tokens" and value == 0):
                raise ValueError(f"{name}={value!r}: must be a non-negative integer (max_new_tokens: positive).")


DATACLASSES = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, ALoRAArguments, EvalArguments)


def make_parser() -> TrlParser:
    return TrlParser(DATACLASSES, prog="alora-sft", allow_abbrev=False, description=(
        "Supervised fine-tuning with ALoRA (TRL SFTTrainer + ALoRACallback). Without --config, the embedded "
        "default recipe (SmolLM2-135M-Instruct on the shipped ISO-dates task, CPU) is the base that flags override."))


def parse_args(args: Optional[Sequence[str]] = None) -> tuple:
    """Parse ``--config recipe.yaml`` (default: the embedded recipe) and flags, which override it.

    Keys the recipe or the command line do not know, and values that TRL's dataclasses or
    ``ALoRAConfig`` reject, end the program (exit code 2) with a message naming them.
    """
    args = list(sys.argv[1:] if args is None else args)
    if "--config" not in args:
        args = ["--config", str(DEFAULT_RECIPE), *args]
    parser = make_parser()

    def fail(message: str):  # argparse's error() would print the whole (long) usage first
        parser.exit(2, f"alora-sft: error: {message}\n")

    config_path = args[args.index("--config") + 1] if args.index("--config") + 1 < len(args) else None
    if config_path is None or not Path(config_path).is_file():
        fail(f"--config {config_path}: no such recipe file.")
    try:
        *parsed, from_config, from_flags = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True)
    except ValueError as error:  # a value TRL's or our dataclasses reject
        fail(str(error))
    unknown_keys = [s.lstrip("-") for s in from_config if s.startswith("--")]
    if unknown_keys:
        fail(f"unknown keys in {config_path}: {', '.join(unknown_keys)} (see `alora-sft --help`).")
    if from_flags:
        fail(f"unknown arguments: {' '.join(from_flags)} (see `alora-sft --help`).")
    _, _, model_args, _, alora_args, _ = parsed
    if not model_args.use_peft:  # TRL's flag (default false); alora-sft always trains the ALoRA adapter
        recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        if "use_peft" in recipe or any(a == "--use_peft" or a.startswith("--use_peft=") for a in args):
            fail("use_peft false: alora-sft always trains an ALoRA adapter; for full fine-tuning use `trl sft`.")
        model_args.use_peft = True  # left unset in the recipe: what alora-sft does anyway
    try:  # the adapter's own validation, before anything is loaded
        alora_args.to_config(model_args)
    except (ValueError, TypeError) as error:
        fail(str(error))
    return tuple(parsed)

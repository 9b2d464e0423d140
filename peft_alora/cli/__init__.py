"""``alora-sft``, the recipe runner (see :mod:`peft_alora.cli.sft`)."""

from .args import ALoRAArguments, EvalArguments, make_parser, parse_args
from .sft import cli, main

__all__ = ["ALoRAArguments", "EvalArguments", "cli", "main", "make_parser", "parse_args"]

"""``python -m peft_alora.cli`` (and ``accelerate launch -m peft_alora.cli``) runs ``alora-sft``."""

from .sft import cli

if __name__ == "__main__":
    cli()

"""``ALoRAConfig``: LoRA's config plus the per-module capacity and the allocation schedule."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

from .registration import add_peft_type_member

SCORERS = ("fast", "exact")
REGROW_INITS = ("random", "gradient")
SUPPORTED_INITS = (True, False, "gaussian")

# LoRA options that change what a rank is, or how it is initialised, in ways the gate/slot
# bookkeeping of ALoRA does not model. Each maps to the value that means "off".
_UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": False,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "use_qalora": False,
    "lora_bias": False,
    "layer_replication": None,
    "megatron_config": None,
    "target_parameters": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
}

StepOrFraction = Union[int, float]


def _check_step_or_fraction(name: str, value, allow_none: bool = False) -> None:
    """A schedule point: optimizer steps (int >= 1: a round needs training before it) or a fraction."""
    if value is None and allow_none:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and isinstance(value, numbers.Integral):
        ok = value >= 1
    elif ok:
        ok = 0.0 < float(value) <= 1.0
    if not ok:
        raise ValueError(
            f"ALoRAConfig.{name}={value!r}: give a number of optimizer steps (int >= 1) or a fraction "
            "of the run's total optimizer steps (float in (0, 1])."
        )


@dataclass
class ALoRAConfig(LoraConfig):
    """Configuration of an ALoRA (Allocating LoRA) adapter.

    Every targeted module starts with ``r`` active ranks and holds up to ``max_r`` rank slots. The
    per-rank scale is fixed at ``lora_alpha / r`` for the whole run, so moving ranks between
    modules never rescales the ranks that stay. The allocation fields describe the schedule run
    by :class:`peft_alora.ALoRACallback`; points are optimizer steps (int) or fractions of the
    run's total optimizer steps (float in (0, 1]).
    """

    max_r: Optional[int] = field(
        default=None,
        metadata={"help": "Rank slots per module (capacity), > r. Default (None): 2 * r, following r."},
    )
    allocation_start: StepOrFraction = field(
        default=0.1, metadata={"help": "Optimizer step (int) or fraction of the run (float) of the first round."}
    )
    allocation_end: Optional[StepOrFraction] = field(
        default=0.4,
        metadata={"help": "Step or fraction of the last round; rounds are spread evenly from start to end."},
    )
    allocation_interval: Optional[StepOrFraction] = field(
        default=None,
        metadata={"help": "Steps (or fraction) between rounds; set allocation_end=None when you use it."},
    )
    allocation_rounds: int = field(default=8, metadata={"help": "Number of prune-and-regrow rounds (paper: 8)."})
    ranks_per_round: Optional[int] = field(
        default=None,
        metadata={"help": "Ranks pruned (and regrown) per round. Default: number of distinct target module types."},
    )
    scoring_examples: int = field(default=32, metadata={"help": "Size of the fixed scoring set (paper: 32)."})
    scoring_batch_size: int = field(default=8, metadata={"help": "Micro-batch size of the scoring forward passes."})
    scorer: str = field(
        default="fast",
        metadata={"help": f"Importance scorer, one of {SCORERS}: 'fast' estimates both AB-LoRA terms from gradient "
                          "passes (first order), 'exact' runs 2 scoring passes per rank (the reference)."},
    )
    scoring_refine: Optional[int] = field(
        default=None,
        metadata={"help": "With scorer='fast': at most this many ranks get the 'without rank' term taken exactly "
                          "(about half a scoring pass each), lowest first among those first order cannot place on "
                          "either side of the pruning threshold, stopping once the ranks to prune are settled; a rank "
                          "grown by a round is always re-scored before it is pruned. None: twice ranks_per_round. "
                          "0: first order only."},
    )
    regrow_init: str = field(
        default="gradient",
        metadata={"help": "A row of a regrown rank: 'gradient' (leading singular direction of the module's loss "
                          "gradient on the scoring set, outside its active rows; measured better, beyond the paper) or "
                          "'random' (drawn as LoRA draws it: the paper)."},
    )

    def __post_init__(self):
        self._check_unsupported_lora_options()
        super().__post_init__()
        # the enum member, not its string: transformers' load_adapter reads `peft_type.value`
        self.peft_type = add_peft_type_member()
        self._check_allocation_fields()

    def _check_unsupported_lora_options(self) -> None:
        for name, off in _UNSUPPORTED_LORA_OPTIONS.items():
            value = getattr(self, name, off)
            if value != off and value is not None and value is not False:
                raise ValueError(
                    f"ALoRAConfig.{name}={value!r} is not supported by ALoRA: leave it at {off!r} "
                    "(use peft.LoraConfig for that LoRA variant)."
                )
        if self.init_lora_weights not in SUPPORTED_INITS:
            raise ValueError(
                f"ALoRAConfig.init_lora_weights={self.init_lora_weights!r} is not supported: use one of "
                f"{SUPPORTED_INITS} (data-dependent inits do not fit ranks that are re-initialised during training)."
            )
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError(
                "ALoRAConfig.rank_pattern / alpha_pattern must stay empty: ALoRA starts every module at rank `r` "
                "and moves ranks itself. Use `r` and `max_r` instead."
            )

    def to_dict(self):
        """What ``save_pretrained`` writes: ``max_r`` resolved, so the file states the slot count it was saved with."""
        data = super().to_dict()
        data["max_r"] = self.capacity
        return data

    @property
    def capacity(self) -> int:
        """Rank slots per module: ``max_r``, or ``2 * r`` when ``max_r`` is None."""
        return self.max_r if self.max_r is not None else 2 * self.r

    def _check_schedule_order(self) -> None:
        """``allocation_end`` before ``allocation_start`` is refused whenever both are the same kind (steps or
        fractions); mixed kinds are compared once the run's length is known."""
        start, end = self.allocation_start, self.allocation_end
        if end is None or isinstance(start, numbers.Integral) != isinstance(end, numbers.Integral):
            return
        if end < start:
            raise ValueError(
                f"ALoRAConfig.allocation_end={end!r} is before allocation_start={start!r}: the rounds run from start "
                "to end, so set allocation_end >= allocation_start (or allocation_end=None with allocation_rounds=1)."
            )

    def _check_allocation_fields(self) -> None:
        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ALoRAConfig.{name}={value!r}: must be a positive integer.")

        positive_int("r", self.r)
        positive_int("max_r", self.max_r, allow_none=True)
        # max_r stays None when not given, so that dataclasses.replace(config, r=...) moves the capacity too
        if self.max_r is not None and self.max_r <= self.r:
            raise ValueError(
                f"ALoRAConfig.max_r={self.max_r} must be above the initial rank r={self.r}: freed ranks may only "
                "go to modules that lost none in the same round, and with max_r <= r those are all full, so every "
                "round would shrink the rank budget. Raise max_r (default 2 * r), e.g. max_r=2 * r."
            )
        positive_int("allocation_rounds", self.allocation_rounds)
        positive_int("ranks_per_round", self.ranks_per_round, allow_none=True)
        positive_int("scoring_examples", self.scoring_examples)
        positive_int("scoring_batch_size", self.scoring_batch_size)
        if self.scoring_refine is not None and (isinstance(self.scoring_refine, bool) or not isinstance(
                self.scoring_refine, numbers.Integral) or self.scoring_refine < 0):
            raise ValueError(f"ALoRAConfig.scoring_refine={self.scoring_refine!r}: must be an integer >= 0, or None "
                             "(twice ranks_per_round).")
        _check_step_or_fraction("allocation_start", self.allocation_start)
        _check_step_or_fraction("allocation_end", self.allocation_end, allow_none=True)
        _check_step_or_fraction("allocation_interval", self.allocation_interval, allow_none=True)
        if self.allocation_interval is not None and self.allocation_end is not None:
            raise ValueError(
                "ALoRAConfig: set either allocation_end or allocation_interval, not both "
                "(pass allocation_end=None to use allocation_interval)."
            )
        if self.allocation_interval is None and self.allocation_end is None and self.allocation_rounds > 1:
            raise ValueError(
                "ALoRAConfig: with allocation_rounds > 1, set allocation_end or allocation_interval."
            )
        self._check_schedule_order()
        if self.regrow_init not in REGROW_INITS:
            raise ValueError(f"ALoRAConfig.regrow_init={self.regrow_init!r}: choose one of {REGROW_INITS}.")
        if self.scorer not in SCORERS:
            raise ValueError(f"ALoRAConfig.scorer={self.scorer!r}: choose one of {SCORERS}.")
        if self.lora_dropout < 0 or self.lora_dropout >= 1:
            raise ValueError(f"ALoRAConfig.lora_dropout={self.lora_dropout!r}: must be in [0, 1).")


def alora_config_of(model, adapter_name: Optional[str], caller: str, if_not_alora: str) -> ALoRAConfig:
    """The ``ALoRAConfig`` of ``adapter_name`` in ``model`` (default: its active adapter), or an error that names
    ``caller`` and says what the model holds instead; ``if_not_alora`` says what to do with another PEFT adapter."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise TypeError(
            f"{caller}: the model ({type(model).__name__}) holds no PEFT adapter: wrap it with "
            "get_peft_model(model, ALoRAConfig(...)) or pass peft_config=ALoRAConfig(...) to SFTTrainer."
        )
    name = adapter_name or getattr(model, "active_adapter", None) or sorted(configs)[0]
    if isinstance(name, list):
        name = name[0]
    if name not in configs:
        raise ValueError(f"{caller}(adapter_name={name!r}): the model's adapters are {sorted(configs)}.")
    if not isinstance(configs[name], ALoRAConfig):
        raise TypeError(f"{caller}: adapter {name!r} is a {type(configs[name]).__name__}, not ALoRA: {if_not_alora}")
    return configs[name]

"""The ALoRA schedule: when to score, prune and regrow, and applying those decisions to a model.

Works with any training loop: call :meth:`RankAllocator.step` after every optimizer step
(``ALoRACallback`` does this inside ``transformers.Trainer`` / TRL's ``SFTTrainer``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from typing import Callable, Mapping, Optional

import torch

from .allocation import RoundPlan, ScheduleError, plan_round, resolve_steps, schedule_steps
from .distributed import check_engine, release_gathered
from .model import ALoRAModel
from .optim_state import reset_slots
from .regrowth import gradient_directions
from .report import split_module_name
from .scoring import SCORERS, ScoringSet, eval_mode, scoring_loss

STATE_VERSION = 2
logger = logging.getLogger(__name__)


def loud_warning(message: str) -> None:
    """Loud on purpose: in the log and as a Python warning (a budget loss must not pass unnoticed)."""
    logger.warning(message)
    warnings.warn(message, stacklevel=3)


def resolve_schedule(config, total_steps: int) -> list[int]:
    """Optimizer steps after which the rounds run, from the config's steps or fractions."""
    start = resolve_steps(config.allocation_start, total_steps, "ALoRAConfig.allocation_start")
    if start < 1:
        raise ValueError("ALoRAConfig.allocation_start must be at least 1 optimizer step (train before scoring).")
    rounds = config.allocation_rounds
    end = None
    if config.allocation_interval is None and config.allocation_end is not None:
        end = resolve_steps(config.allocation_end, total_steps, "ALoRAConfig.allocation_end")
        if end < start:
            raise ScheduleError(
                f"ALoRAConfig.allocation_end ({config.allocation_end!r} = step {end}) is before allocation_start "
                f"({config.allocation_start!r} = step {start}) in a {total_steps}-step run: set allocation_end >= "
                "allocation_start."
            )
    if config.allocation_interval is not None or rounds == 1:
        interval = 1 if config.allocation_interval is None else resolve_steps(
            config.allocation_interval, total_steps, "ALoRAConfig.allocation_interval")
        return schedule_steps(start, interval, rounds, total_steps, start_name="ALoRAConfig.allocation_start",
                              interval_name="ALoRAConfig.allocation_interval",
                              rounds_name="ALoRAConfig.allocation_rounds")
    if end - start < rounds - 1:
        raise ScheduleError(
            f"ALoRAConfig: {rounds} rounds do not fit between step {start} (allocation_start) and step {end} "
            f"(allocation_end) of a {total_steps}-step run: lower allocation_rounds, widen start/end, or train longer."
        )
    steps = [start + math.floor((end - start) * i / (rounds - 1) + 0.5) for i in range(rounds)]
    if steps[-1] >= total_steps:
        raise ScheduleError(
            f"ALoRAConfig.allocation_end: the last round (after step {steps[-1]}) leaves no training in a "
            f"{total_steps}-step run: lower allocation_end or train longer."
        )
    return steps


def scoring_fingerprint(scoring: ScoringSet) -> str:
    """SHA-256 of the scoring set's tensors (token ids, labels, masks): a changed eval set changes it."""
    digest = hashlib.sha256()
    for batch in scoring.batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unwrap_tuner(model) -> ALoRAModel:
    tuner = getattr(model, "base_model", None)
    if isinstance(model, ALoRAModel):
        return model
    if isinstance(tuner, ALoRAModel):
        return tuner
    raise TypeError(
        f"ALoRA allocation needs a model wrapped with ALoRAConfig (get_peft_model or SFTTrainer's peft_config); "
        f"got {type(model).__name__} holding {type(tuner).__name__ if tuner is not None else 'no PEFT adapter'}."
    )


def as_scoring_set(scoring) -> ScoringSet:
    """A ``ScoringSet`` from what a custom loop may hand over: the set itself, collated batches (a list, a
    DataLoader) or one batch (a dict). Checked here, not at the first round after steps of training."""
    if isinstance(scoring, ScoringSet):
        return scoring
    if isinstance(scoring, Mapping):
        return ScoringSet([dict(scoring)])
    return ScoringSet(list(scoring) if scoring is not None else [])


class RankAllocator:
    """Runs the rounds of docs/algorithm.md on ``model`` (a PeftModel holding an ALoRA adapter).

    ``scoring``: a ``ScoringSet``, or the collated scoring batches (dicts with ``labels``).
    ``step(global_step, optimizer)`` after each optimizer step; it returns the round's record
    (a dict, also appended to ``history``) when a round ran. ``state_dict()`` /
    ``load_state_dict()`` give a JSON-serialisable state for checkpoints.

    ``budget_initial`` is ``r`` x the number of gated modules; ``budget`` is what the run can still
    hold: a round whose freed ranks do not all fit lowers it (with a warning), and it never rises.
    """

    def __init__(
        self,
        model,
        scoring,
        total_steps: int,
        adapter_name: Optional[str] = None,
        seed: int = 0,
        progress: Optional[Callable] = None,
    ):
        self.model = model
        self.tuner = _unwrap_tuner(model)
        self.adapter = adapter_name or self.tuner.active_adapters[0]
        if self.adapter not in self.tuner.peft_config:
            raise ValueError(f"RankAllocator: no adapter named {self.adapter!r}; the model holds "
                             f"{sorted(self.tuner.peft_config)}.")
        self.config = self.tuner.peft_config[self.adapter]
        self.layers = dict(self.tuner.gated_layers(self.adapter))
        if not self.layers:
            raise ValueError(f"adapter {self.adapter!r} has no gated ALoRA layer")
        self.scoring = as_scoring_set(scoring)
        self.total_steps = total_steps
        self.schedule = resolve_schedule(self.config, total_steps)
        self.ranks_per_round = self.config.ranks_per_round or len({split_module_name(n)[1] for n in self.layers})
        self.budget_initial = self.config.r * len(self.layers)
        if self.ranks_per_round >= self.budget_initial:
            source = "" if self.config.ranks_per_round else " (the default: one per target module type)"
            raise ValueError(
                f"ALoRAConfig.ranks_per_round={self.ranks_per_round}{source} would prune all "
                f"{self.budget_initial} ranks of this model (r={self.config.r} x {len(self.layers)} modules) in the "
                f"first round: set ranks_per_round below {self.budget_initial}, or raise r."
            )
        self.budget = self.budget_initial
        self.seed = seed
        self.progress = progress
        self.rounds_done = 0
        self.warned_no_optimizer = False
        self.history: list[dict] = [self._record(round_index=0, step=0, plan=RoundPlan(), seconds=0.0)]
        self.tuner.stop_watching_for_allocator()  # rounds will run: no "trains as plain LoRA" warning

    # ---- state --------------------------------------------------------------------------------

    def active_slots(self) -> dict[str, list[int]]:
        return {name: layer.active_slots(self.adapter) for name, layer in self.layers.items()}

    def _record(self, round_index, step, plan: RoundPlan, seconds, loss=None, grown_slots=None) -> dict:
        active = {name: layer.num_active(self.adapter) for name, layer in self.layers.items()}
        return {
            "round": round_index,
            "step": step,
            "pruned": [[m, s] for m, s in plan.pruned],
            "grown": dict(plan.grown),
            "grown_slots": [[m, s] for m, s in (grown_slots or [])],
            "active": active,
            "active_total": sum(active.values()),
            "budget": self.budget,
            "budget_initial": self.budget_initial,
            "trainable_params": self.tuner.count_active_parameters(self.adapter),
            "scoring_seconds": seconds,
            "scoring_loss": loss,
        }

    def decision_settings(self) -> dict:
        """Everything that shapes this run's decisions; a resume must match it (see load_state_dict)."""
        config = self.config
        return {
            "r": config.r, "max_r": config.capacity, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
            "ranks_per_round": self.ranks_per_round, "scoring_examples": config.scoring_examples,
            "scoring_batch_size": config.scoring_batch_size, "scorer": config.scorer,
            "scoring_refine": config.scoring_refine,
            "allocation_start": config.allocation_start, "allocation_end": config.allocation_end,
            "allocation_interval": config.allocation_interval, "allocation_rounds": config.allocation_rounds,
            "init_lora_weights": config.init_lora_weights, "modules": sorted(self.layers), "seed": self.seed,
            "total_steps": self.total_steps, "scoring_set": scoring_fingerprint(self.scoring),
        }

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "schedule": self.schedule, "rounds_done": self.rounds_done,
                "budget": self.budget, "settings": self.decision_settings(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state; refuses one taken with other decision settings (listed)."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"unknown ALoRA allocator state version {version!r}")
        if version == 1:
            loud_warning("ALoRA: this checkpoint predates the settings check (state version 1): only its "
                         "schedule is compared with this run's.")
        else:
            ours = json.loads(json.dumps(self.decision_settings()))  # JSON-normalised like the saved one
            saved = state["settings"]
            differ = [f"{key} (checkpoint {saved.get(key)!r}, now {ours.get(key)!r})"
                      for key in sorted(set(saved) | set(ours)) if saved.get(key) != ours.get(key)]
            if differ:
                raise ValueError(
                    "this run's ALoRA settings differ from the checkpoint's: " + "; ".join(differ) + ". Resume "
                    "with the same ALoRAConfig, seed, scoring data and number of training steps, or start a new run."
                )
        if state["schedule"] != self.schedule:
            raise ValueError(
                f"the checkpoint's ALoRA schedule {state['schedule']} differs from this run's {self.schedule}: "
                "resume with the same ALoRAConfig and the same number of training steps."
            )
        self.history = list(state["history"])
        self.rounds_done = int(state.get("rounds_done", len(self.history) - 1))
        self.budget = int(state.get("budget", self.history[-1].get("budget", self.budget_initial)))
        if self.history[-1]["active"] != {n: len(s) for n, s in self.active_slots().items()}:
            raise ValueError("the model's gates do not match the checkpoint's allocation history: "
                             "load the adapter weights of the same checkpoint.")

    def restore_position(self, global_step: int) -> None:
        """Resume without saved allocator state: the rounds scheduled at or before ``global_step`` count as
        done (so later rounds keep their index and their seeded draws) and the gates are taken as loaded."""
        self.rounds_done = sum(1 for step in self.schedule if step <= global_step)
        active_total = sum(layer.num_active(self.adapter) for layer in self.layers.values())
        self.budget = min(self.budget_initial, active_total) if self.rounds_done else self.budget_initial
        record = self._record(round_index=self.rounds_done, step=global_step, plan=RoundPlan(), seconds=0.0)
        record["restored"] = True
        self.history = [record]

    # ---- rounds -------------------------------------------------------------------------------

    def due(self, global_step: int) -> bool:
        return self.rounds_done < len(self.schedule) and global_step >= self.schedule[self.rounds_done]

    def step(self, global_step: int, optimizer=None) -> Optional[dict]:
        """Run the next round if ``global_step`` (optimizer steps done) has reached it."""
        if not self.due(global_step):
            return None
        return self.run_round(global_step, optimizer)

    def check_ready(self, optimizer=None) -> None:
        """Refuse to score when the scores would be meaningless: adapter not the one active, merged, disabled,
        or a multi-process engine whose rounds are not supported."""
        check_engine(self.model, optimizer)
        active = list(self.tuner.active_adapters)
        if active != [self.adapter]:
            raise ValueError(
                f"ALoRA scores adapter {self.adapter!r} with the model's forward, but the active adapter(s) are "
                f"{active}: call model.set_adapter({self.adapter!r}) before training/allocating."
            )
        if any(layer.merged for layer in self.layers.values()):
            raise ValueError("ALoRA cannot score a merged adapter (its ranks no longer have gates in the forward): "
                             "call model.unmerge_adapter() before training/allocating.")
        if any(layer.disable_adapters for layer in self.layers.values()):
            raise ValueError("ALoRA cannot score while the adapters are disabled (disable_adapter()): "
                             "leave that context before training/allocating.")

    def score(self) -> dict:
        active = self.active_slots()
        ranks = [(name, slot) for name in sorted(active) for slot in active[name]]
        scorer = SCORERS[self.config.scorer]
        return scorer(self.model, self.layers, self.adapter, self.scoring, ranks, progress=self.progress, config=self.config,
                      n_prune=self.ranks_per_round, grown=self.grown_ranks())

    def grown_ranks(self) -> Optional[set]:
        """Ranks grown by the rounds so far (None: not known, after a resume without the allocator's state)."""
        if any(record.get("restored") or (record.get("grown") and "grown_slots" not in record) for record in self.history):
            return None  # restored without history, or a checkpoint that predates the record of grown slots
        return {(module, slot) for record in self.history for module, slot in record.get("grown_slots", [])}

    def run_round(self, global_step: int, optimizer=None) -> dict:
        self.check_ready(optimizer)
        started = time.perf_counter()
        scores = self.score()
        release_gathered(self.model)
        seconds = time.perf_counter() - started
        active = self.active_slots()
        capacity = {name: layer.capacity(self.adapter) for name, layer in self.layers.items()}
        round_index = self.rounds_done + 1
        n = min(self.ranks_per_round, len(scores) - 1)  # never prune the last active rank
        if n < self.ranks_per_round:
            loud_warning(f"ALoRA round {round_index} (step {global_step}): only {len(scores)} ranks are active, "
                         f"so it prunes {max(n, 0)} instead of ranks_per_round={self.ranks_per_round}.")
        plan = plan_round(scores, active, capacity, max(n, 0))
        if plan.n_grown < plan.n_pruned:
            budget = self.budget - (plan.n_pruned - plan.n_grown)
            loud_warning(f"ALoRA round {round_index} (step {global_step}): pruned {plan.n_pruned} ranks but only "
                         f"{plan.n_grown} fit in modules that lost none this round (max_r={self.config.capacity}); "
                         f"the rank budget drops from {self.budget} to {budget}. Raise max_r or lower "
                         "ranks_per_round to keep it.")
            self.budget = budget
        grown_slots, loss = self.apply(plan, optimizer, round_index=round_index)
        if loss is None:  # not measured by the regrowth pass
            with eval_mode(self.model):
                loss = scoring_loss(self.model, self.scoring)
        release_gathered(self.model)
        self.rounds_done = round_index
        record = self._record(round_index, global_step, plan, seconds, loss, grown_slots)
        record["scores"] = {f"{m}:{s}": v for (m, s), v in sorted(scores.items())}
        self.history.append(record)
        return record

    def apply(self, plan: RoundPlan, optimizer=None, round_index: int = 0) -> tuple[list[tuple[str, int]], Optional[float]]:
        """Switch pruned slots off; switch the lowest free slots of growing modules on, freshly
        initialised from a generator seeded by (seed, round), so every process draws the same.

        Returns the grown slots and, when gradient regrowth ran its pass over the scoring set, the
        scoring loss after the round (the new ranks do not change the output)."""
        if optimizer is None and plan.grown and not self.warned_no_optimizer:
            self.warned_no_optimizer = True
            warnings.warn(
                "ALoRA: this round regrows ranks but got no optimizer, so their slots keep the optimizer moments "
                "(e.g. Adam's) from before they were pruned and the new ranks start with stale steps: pass it, "
                "allocator.step(step, optimizer). (Optimizers without per-parameter state can ignore this.)",
                stacklevel=4)
        pruned = set(plan.pruned)
        for module, slot in plan.pruned:
            self.layers[module].deactivate_slot(self.adapter, slot)
        directions, loss = {}, None
        if self.config.regrow_init == "gradient" and plan.grown:
            directions, loss = gradient_directions(self.model, self.layers, self.adapter, plan.grown, self.scoring)
            release_gathered(self.model)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        grown = []
        for module in sorted(plan.grown):
            layer = self.layers[module]
            active = set(layer.active_slots(self.adapter))
            free = [s for s in range(layer.capacity(self.adapter)) if s not in active and (module, s) not in pruned]
            rows = directions.get(module)
            for i, slot in enumerate(free[: plan.grown[module]]):
                direction = rows[i] if rows is not None and i < len(rows) else None
                layer.activate_slot(self.adapter, slot, generator=generator, direction=direction)
                reset_slots(optimizer, layer, self.adapter, slot)
                grown.append((module, slot))
        return grown, loss

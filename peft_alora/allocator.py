"""The ALoRA schedule: when to score, prune and regrow, and applying those decisions to a model.

Works with any training loop: call :meth:`RankAllocator.step` after every optimizer step
(``ALoRACallback`` does this inside ``transformers.Trainer`` / TRL's ``SFTTrainer``).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from .allocation import RoundPlan, plan_round, resolve_steps, schedule_steps
from .model import ALoRAModel
from .optim_state import reset_slots
from .regrowth import gradient_directions
from .report import split_module_name
from .scoring import SCORERS, ScoringSet, eval_mode, scoring_loss

STATE_VERSION = 1


def resolve_schedule(config, total_steps: int) -> list[int]:
    """Optimizer steps after which the rounds run, from the config's steps or fractions."""
    start = resolve_steps(config.allocation_start, total_steps, "ALoRAConfig.allocation_start")
    if start < 1:
        raise ValueError("ALoRAConfig.allocation_start must be at least 1 optimizer step (train before scoring).")
    rounds = config.allocation_rounds
    if config.allocation_interval is not None or rounds == 1:
        interval = 1 if config.allocation_interval is None else resolve_steps(
            config.allocation_interval, total_steps, "ALoRAConfig.allocation_interval")
        return schedule_steps(start, interval, rounds, total_steps, start_name="ALoRAConfig.allocation_start",
                              interval_name="ALoRAConfig.allocation_interval",
                              rounds_name="ALoRAConfig.allocation_rounds")
    end = resolve_steps(config.allocation_end, total_steps, "ALoRAConfig.allocation_end")
    if end - start < rounds - 1:
        raise ValueError(
            f"ALoRAConfig: {rounds} rounds do not fit between step {start} (allocation_start) and step {end} "
            f"(allocation_end) of a {total_steps}-step run: lower allocation_rounds, widen start/end, or train longer."
        )
    steps = [start + math.floor((end - start) * i / (rounds - 1) + 0.5) for i in range(rounds)]
    if steps[-1] >= total_steps:
        raise ValueError(
            f"ALoRAConfig.allocation_end: the last round (after step {steps[-1]}) leaves no training in a "
            f"{total_steps}-step run: lower allocation_end or train longer."
        )
    return steps


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


class RankAllocator:
    """Runs the rounds of ALGORITHM.md §4 on ``model`` (a PeftModel holding an ALoRA adapter).

    ``step(global_step, optimizer)`` after each optimizer step; it returns the round's record
    (a dict, also appended to ``history``) when a round ran. ``state_dict()`` /
    ``load_state_dict()`` give a JSON-serialisable state for checkpoints.
    """

    def __init__(
        self,
        model,
        scoring: ScoringSet,
        total_steps: int,
        adapter_name: Optional[str] = None,
        seed: int = 0,
        progress: Optional[Callable] = None,
    ):
        self.model = model
        self.tuner = _unwrap_tuner(model)
        self.adapter = adapter_name or self.tuner.active_adapters[0]
        self.config = self.tuner.peft_config[self.adapter]
        self.layers = dict(self.tuner.gated_layers(self.adapter))
        if not self.layers:
            raise ValueError(f"adapter {self.adapter!r} has no gated ALoRA layer")
        self.scoring = scoring
        self.total_steps = total_steps
        self.schedule = resolve_schedule(self.config, total_steps)
        self.ranks_per_round = self.config.ranks_per_round or len({split_module_name(n)[1] for n in self.layers})
        self.budget = self.config.r * len(self.layers)
        self.seed = seed
        self.progress = progress
        self.history: list[dict] = [self._record(round_index=0, step=0, plan=RoundPlan(), seconds=0.0)]

    # ---- state --------------------------------------------------------------------------------

    def active_slots(self) -> dict[str, list[int]]:
        return {name: layer.active_slots(self.adapter) for name, layer in self.layers.items()}

    @property
    def rounds_done(self) -> int:
        return len(self.history) - 1

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
            "trainable_params": self.tuner.count_active_parameters(self.adapter),
            "scoring_seconds": seconds,
            "scoring_loss": loss,
        }

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "schedule": self.schedule, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown ALoRA allocator state version {state.get('version')!r}")
        if state["schedule"] != self.schedule:
            raise ValueError(
                f"the checkpoint's ALoRA schedule {state['schedule']} differs from this run's {self.schedule}: "
                "resume with the same ALoRAConfig and the same number of training steps."
            )
        self.history = list(state["history"])
        if self.history[-1]["active"] != {n: len(s) for n, s in self.active_slots().items()}:
            raise ValueError("the model's gates do not match the checkpoint's allocation history: "
                             "load the adapter weights of the same checkpoint.")

    # ---- rounds -------------------------------------------------------------------------------

    def due(self, global_step: int) -> bool:
        return self.rounds_done < len(self.schedule) and global_step >= self.schedule[self.rounds_done]

    def step(self, global_step: int, optimizer=None) -> Optional[dict]:
        """Run the next round if ``global_step`` (optimizer steps done) has reached it."""
        if not self.due(global_step):
            return None
        return self.run_round(global_step, optimizer)

    def score(self) -> dict:
        active = self.active_slots()
        ranks = [(name, slot) for name in sorted(active) for slot in active[name]]
        scorer = SCORERS[self.config.scorer]
        return scorer(self.model, self.layers, self.adapter, self.scoring, ranks, progress=self.progress, config=self.config)

    def run_round(self, global_step: int, optimizer=None) -> dict:
        started = time.perf_counter()
        scores = self.score()
        seconds = time.perf_counter() - started
        active = self.active_slots()
        capacity = {name: layer.capacity(self.adapter) for name, layer in self.layers.items()}
        plan = plan_round(scores, active, capacity, min(self.ranks_per_round, len(scores)))
        grown_slots = self.apply(plan, optimizer, round_index=self.rounds_done + 1)
        with eval_mode(self.model):
            loss = scoring_loss(self.model, self.scoring)
        record = self._record(self.rounds_done + 1, global_step, plan, seconds, loss, grown_slots)
        record["scores"] = {f"{m}:{s}": v for (m, s), v in sorted(scores.items())}
        self.history.append(record)
        return record

    def apply(self, plan: RoundPlan, optimizer=None, round_index: int = 0) -> list[tuple[str, int]]:
        """Switch pruned slots off; switch the lowest free slots of growing modules on, freshly
        initialised from a generator seeded by (seed, round), so every process draws the same."""
        pruned = set(plan.pruned)
        for module, slot in plan.pruned:
            self.layers[module].deactivate_slot(self.adapter, slot)
        directions = {}
        if self.config.regrow_init == "gradient" and plan.grown:
            directions = gradient_directions(self.model, self.layers, self.adapter, plan.grown, self.scoring)
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
        return grown

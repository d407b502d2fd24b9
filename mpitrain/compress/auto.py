"""--compressor auto: dense or greedylore, whichever this job's own steps show to be faster.

The job runs dense first and times its steps (the time from one exchange's end to the next's: data,
forward, backward, optimizer and the exchange, as the loop runs them); then greedylore refreshes its
basis and runs a few compressed steps, timed the same way after the first two (cold); the ranks
agree on the slowest rank's medians (one 16-byte Allreduce each time) and every rank takes the same
choice for the rest of the run. On shared memory a dense exchange is a memory copy and dense wins; on a slow network the
compressed step wins by what its bytes save (`bench network` measures both).

Choosing dense after the trial flushes greedylore's error-feedback residuals into that step's
update (one dense Allreduce of them), so nothing it held back is lost. The choice and its figures
are in `stats["compressor_choice"]` on the step that decided, and in the checkpoint, so a resumed
run keeps it; a run resumed before the choice measures again.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from .base import Compressor, register
from .dense import Dense
from .lowrank import GreedyLore

DENSE_SAMPLES = 4  # timed dense steps (at least; all the warm-up's are used)
TRIAL_SKIP = 2  # greedylore's first compressed steps after its refresh run cold (2-3x the later ones)
TRIAL_SAMPLES = 3  # timed greedylore steps after those: a median of three outlasts one evaluation
FASTER = 0.9  # greedylore must save a tenth of the step: compression costs some progress per step
DENSE, TRIAL, CHOSEN = 0, 1, 2


@register
class Auto(Compressor):
    name = "auto"
    on_device = True  # both of its choices are

    def __init__(self, layout, world, cfg):
        super().__init__(layout, world, cfg)
        self.dense = Dense(layout, world, dataclasses.replace(cfg, compressor="dense"))
        self.greedylore = GreedyLore(layout, world, dataclasses.replace(cfg, compressor="greedylore"))
        self.linear, self.reshardable = self.greedylore.linear, self.greedylore.reshardable
        self.error_feedback = self.greedylore.error_feedback
        # phase, then the agreed figures: dense step, dense exchange, greedylore step, greedylore exchange
        self.agreed = np.array([DENSE, 0.0, 0.0, 0.0, 0.0])
        self.choice = None
        self._samples: list[tuple[float, float]] = []  # (step, exchange) seconds in the current phase
        self._last_end, self._began = None, None
        self._untimed = 1 + TRIAL_SKIP  # greedylore's refresh, then its cold steps
        self.next_step = None

    @property
    def phase(self) -> int:
        return int(self.agreed[0])

    def active(self) -> Compressor:
        if self.phase == CHOSEN:
            return self.greedylore if self.choice == "greedylore" else self.dense
        return self.dense if self.phase == DENSE else self.greedylore

    # -- overlap: the compressor that will run the step takes backward's hooks --------------
    @property
    def overlaps(self) -> bool:
        return self.dense.overlaps or self.greedylore.overlaps

    @property
    def in_flight(self) -> bool:
        return self._began is not None and self._began.in_flight

    def begin(self):
        # the first step after a start or resume runs after backward: its compressor is known only then
        self._began = self.active() if self.next_step is not None else None
        if self._began is not None:
            self._began.begin()

    def ready(self, slot):
        if self._began is not None:
            self._began.ready(slot)

    # -- a step ----------------------------------------------------------------------------
    def aggregate(self, step: int) -> None:
        started = time.perf_counter()
        compressor = self.active()
        compressor.aggregate(step)
        ended = time.perf_counter()
        self.stats = dict(compressor.stats)
        self._began, self.next_step = None, step + 1
        cold = compressor is self.greedylore and self._untimed > 0
        self._untimed -= cold
        if self._last_end is not None and self.phase != CHOSEN and not cold:
            self._samples.append((ended - self._last_end, ended - started))
        if self.phase == DENSE and len(self._samples) >= DENSE_SAMPLES and step >= self.cfg.start_compress_step - 2:
            self._agree(1)
            self.agreed[0] = TRIAL
        elif self.phase == TRIAL and len(self._samples) >= TRIAL_SAMPLES:
            self._agree(3)
            self._decide(step)
        self._last_end = time.perf_counter()

    def _agree(self, at: int):
        """The slowest rank's medians of this phase's (step, exchange) times: the same on every rank."""
        medians = np.median(np.array(self._samples), axis=0)
        self.world.allreduce_(medians, op="max")
        self.agreed[at:at + 2] = medians
        self._samples = []

    def _decide(self, step: int):
        dense_s, dense_x, lore_s, lore_x = self.agreed[1:]
        self.agreed[0] = CHOSEN
        self.choice = "greedylore" if lore_s < FASTER * dense_s else "dense"
        if self.choice == "dense" and self.greedylore.error_feedback:
            # what greedylore held back joins this step's update: sent + 0 == g + e, exactly
            feedback = self.greedylore.feedback
            self.world.allreduce_(feedback.array(copy=False))
            self.greedylore.add_residuals()
            feedback.reset()
        ring = 2 * (self.world.size - 1) / self.world.size  # bytes a ring Allreduce moves per byte held
        self.stats["compressor_choice"] = {
            "step": step + 1, "choice": self.choice, "dense_step_s": dense_s, "dense_exchange_s": dense_x,
            "greedylore_step_s": lore_s, "greedylore_exchange_s": lore_x,
            "dense_bytes": self.layout.dense_bytes,
            "achieved_gbps": ring * self.layout.dense_bytes * 8 / dense_x / 1e9 if self.world.size > 1 else None}

    # -- checkpoints: greedylore's state, and the choice --------------------------------------
    def state_dict(self, copy: bool = True) -> dict:
        state = self.greedylore.state_dict(copy)
        code = 0 if self.choice is None else {"dense": 1, "greedylore": 2}[self.choice]
        state["shared"]["auto"] = np.concatenate([self.agreed, [code]])
        return state

    def state_layout(self) -> dict:
        return self.greedylore.state_layout()

    def load_state_dict(self, state: dict) -> None:
        shared = dict(state["shared"])
        saved = np.asarray(shared.pop("auto"), dtype=np.float64)
        self.greedylore.load_state_dict({**state, "shared": shared})
        self.agreed[...] = saved[:5]
        self.choice = {0: None, 1: "dense", 2: "greedylore"}[int(saved[5])]
        self._untimed = TRIAL_SKIP if self.greedylore.basis.refreshed_at >= 0 else 1 + TRIAL_SKIP
        self._samples, self._last_end = [], None

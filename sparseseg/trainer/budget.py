"""The time budget: how many iterations fit in the minutes a user gives.

The trainer measures its own step time over the first steps (the first one, which pays for
oneDNN/cuDNN kernel selection, is left out), plans the count so that the whole run fits, and
re-plans as it goes, so validations, a slower machine or a busy one move the plan rather than
the end time. The time kept for prediction (timed once, before training) grows by the factor
the steps have slowed since their fastest measure: load that arrives while training slows the
prediction after it too. The learning-rate schedule follows the planned count. Nothing here
touches torch: the loop hands in step numbers and clock readings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from sparseseg.errors import SparsesegError

log = logging.getLogger("sparseseg.train")

PROBE_STEPS = 5          # steps timed (after the first) before the first plan
REPLAN_SHARE = 0.05      # re-plan after every 5% of the planned count
FEW_ITERATIONS = 50      # below this a plan is worth a warning: the network will be undertrained
PROVISIONAL = 10_000     # the count the schedule assumes until the first plan (poly: lr ~ base)


@dataclass
class Plan:
    """What the budget bought; recorded in the checkpoint and the run's result."""
    minutes: float
    reserve_seconds: float       # kept for what follows training (densify's prediction), as last scaled
    planned: int                 # iterations the run aims at (final once the run ends)
    step_seconds: float          # measured seconds per iteration, validations included
    ran: int = 0
    seconds: float = 0.0         # training seconds spent when the run ended
    stopped_at_budget: bool = False
    reserve_timed_seconds: float = 0.0   # the reserve as timed before training, unscaled

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class Budget:
    """Plans and re-plans the iteration count of one run from its measured step time."""

    def __init__(self, minutes: float, reserve_seconds: float = 0.0, start: int = 0,
                 clock=time.monotonic, began: float | None = None):
        self.budget_s = float(minutes) * 60.0
        if self.budget_s - float(reserve_seconds) <= 0:
            raise SparsesegError(f"--time-budget {minutes:g} min leaves no time to train: prediction alone "
                                 f"needs ~{reserve_seconds:.0f} s; give more minutes")
        self.clock = clock
        self.began = clock() if began is None else began
        self.start = start
        self.plan = Plan(float(minutes), float(reserve_seconds), PROVISIONAL, 0.0,
                         reserve_timed_seconds=float(reserve_seconds))
        self.planned_once = False
        self._fastest = None      # the lowest step rate measured at a plan: the unloaded reference
        self._marks: list[tuple[int, float]] = []    # (iterations done, clock) after each step
        self._next_plan = start + 1 + PROBE_STEPS

    @property
    def deadline_s(self) -> float:
        """Training seconds the budget allows: all of it less the (scaled) prediction reserve."""
        return self.budget_s - self.plan.reserve_seconds

    @property
    def total(self) -> int:
        return self.plan.planned

    def elapsed(self) -> float:
        return self.clock() - self.began

    def after_step(self, done: int) -> bool:
        """Record that `done` iterations are done; re-plan when due. True: stop now (the plan
        is reached, or the next step would overrun the budget)."""
        now = self.clock()
        self._marks.append((done, now))
        if done == self.start + 1:
            self._check_first_step(now)
        if done >= self._next_plan:
            self._replan(done, now)
        left = self.deadline_s - (now - self.began)
        rate = self._rate()
        # One step alone (it carries kernel selection) is no measure of the next.
        if len(self._marks) >= 2 and left < rate and done < self.plan.planned:
            self.plan.planned, self.plan.stopped_at_budget = done, True
            log.info("stopping at iteration %d: the time budget is spent", done)
        return done >= self.plan.planned

    def finish(self, done: int) -> Plan:
        self.plan.ran, self.plan.seconds = done - self.start, round(self.elapsed(), 2)
        self.plan.planned, self.plan.step_seconds = done, round(self._rate(), 4)
        return self.plan

    # ------------------------------------------------------------------ internals

    def _check_first_step(self, now: float) -> None:
        """A budget too small for one step is an error, not a run of one step."""
        first = now - self.began
        if first > self.deadline_s:
            raise SparsesegError(
                f"--time-budget {self.plan.minutes:g} min is too small: preparing and one step took {first:.1f} s"
                + (f" (plus ~{self.plan.reserve_seconds:.0f} s for prediction)" if self.plan.reserve_seconds else "")
                + "; give more minutes or --iterations")

    def _rate(self) -> float:
        """Seconds per iteration over the last (up to) 200 steps after the first, validations
        included; the first step alone (with the preparation) until a second is done."""
        if len(self._marks) < 2:
            return (self._marks[-1][1] - self.began) if self._marks else 0.0
        (d0, t0), (d1, t1) = self._marks[max(0, len(self._marks) - 201)], self._marks[-1]
        return (t1 - t0) / (d1 - d0)

    def _scale_reserve(self, rate: float) -> None:
        """Scale the timed reserve by how much slower the steps now are than their fastest
        measure (never below the timed figure)."""
        timed = self.plan.reserve_timed_seconds
        if rate <= 0 or not timed:
            return
        self._fastest = rate if self._fastest is None else min(self._fastest, rate)
        self.plan.reserve_seconds = round(timed * max(1.0, rate / self._fastest), 2)

    def _replan(self, done: int, now: float) -> None:
        rate = self._rate()
        before = self.plan.reserve_seconds
        self._scale_reserve(rate)
        if self.plan.reserve_seconds > 1.5 * before:
            log.info("steps slowed to %.2f s: keeping %.0f s for prediction (timed %.0f s)", rate,
                     self.plan.reserve_seconds, self.plan.reserve_timed_seconds)
        left = self.deadline_s - (now - self.began)
        planned = max(done, done + int(left / rate)) if rate > 0 else done
        first = not self.planned_once
        self.plan.planned, self.plan.step_seconds, self.planned_once = planned, round(rate, 4), True
        self._next_plan = done + max(1, int(planned * REPLAN_SHARE))
        if first:
            eta = time.strftime("%H:%M", time.localtime(time.time() + left))
            log.info("plan: ~%d iterations at %.2f s in %g min%s, ETA %s", planned, rate, self.plan.minutes,
                     f" ({self.plan.reserve_seconds:.0f} s kept for prediction)" if self.plan.reserve_seconds else "",
                     eta)
            if planned - self.start < FEW_ITERATIONS:
                log.warning("the budget buys only %d iterations at %.2f s each: the network will be undertrained; "
                            "give more --time-budget minutes", planned - self.start, rate)

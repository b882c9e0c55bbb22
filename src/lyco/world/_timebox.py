"""Fit a training loop into a time box by fixing its number of steps early.

A learning-rate schedule needs the total number of steps up front, but a time-boxed stage only
knows its seconds. :class:`StepPlan` times steps ``[a, b)`` (after the first ``a``, which carry
allocator warm-up and kernel autotuning) and then sets the total to what fits the remaining time,
never more than the requested maximum. With ``fixed=True`` the requested steps are kept (for an
exact re-run of a recorded recipe) and the time box only stops a run that overshoots it badly.
"""

from __future__ import annotations

import time
from typing import Callable


class StepPlan:
    def __init__(self, max_steps: int, time_limit: float | None, *, fixed: bool = False,
                 sync: Callable[[], None] = lambda: None, a: int = 10, b: int = 40,
                 log: Callable[[str], None] | None = None, name: str = ""):
        self.total = int(max_steps)
        self.max_steps = int(max_steps)
        self.time_limit = time_limit
        self.fixed = fixed
        self.sync = sync
        self.a, self.b = a, b
        self.log = log
        self.name = name
        self.t0 = time.perf_counter()
        self._ta = None
        self.ms_per_step: float | None = None
        self.stopped_early = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def after(self, step: int) -> bool:
        """Call after finishing step number ``step`` (1-based count of finished steps). Returns
        False when the loop must stop now (time box overshot)."""
        if self.time_limit is None:
            return True
        if step in (self.a, self.b) and self.total > self.b:
            self.sync()
            now = self.elapsed()
            if step == self.a:
                self._ta = now
            elif self._ta is not None:
                per = (now - self._ta) / (self.b - self.a)
                self.ms_per_step = per * 1000
                if not self.fixed:
                    fit = self.b + int(max(0.0, self.time_limit - now) / per)
                    self.total = max(self.b, min(self.max_steps, fit))
                if self.log:
                    self.log(f"{self.name}: {per * 1000:.1f} ms/step -> {self.total} steps "
                             f"(time box {self.time_limit:.0f}s)")
        if self.elapsed() > self.time_limit * 1.15 + 5:
            self.stopped_early = True
            if self.log:
                self.log(f"{self.name}: stopped by the time box after {step} steps")
            return False
        return True

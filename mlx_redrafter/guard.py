"""The never-slower guard: draft only while drafting beats plain one-token steps, measured.

A shape that pays on one machine, model or prompt can cost more than it saves on another (a
wide tree on a CPU, a busy machine, text the drafter cannot guess). The guard times each
decode step (the step ends in a host sync, so the wall clock covers its work) and keeps the
seconds per emitted token of the last few drafting steps and of the last few plain steps
(a tree of g0 alone: no draft, one-token verification). After a short warm-up in each mode it
uses the cheaper one and, every `probe_every` steps, spends `probe_steps` steps in the other,
so that drafting comes back when the text turns predictable again.

Greedy output never depends on the mode (every step is lossless). Sampled output does, since
the tree decides how the randomness is spent: the engine turns the guard off when a sampling
run has an explicit seed, so a seed reproduces its tokens (see `generate_step`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from statistics import median


class SpeedGuard:
    """Chooses drafting or plain steps from measured seconds per token."""

    def __init__(
        self,
        *,
        window: int = 6,
        warmup: int = 6,
        probe_every: int = 48,
        probe_steps: int = 4,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.clock = clock
        self.warmup, self.probe_every, self.probe_steps = warmup, probe_every, probe_steps
        self.costs = {True: deque(maxlen=window), False: deque(maxlen=window)}
        self.steps = 0
        self._since_switch = 0
        self._current = True
        self._started: float | None = None

    def drafting(self) -> bool:
        """Whether the next step drafts; starts that step's clock."""
        draft, plain = self.costs[True], self.costs[False]
        if len(draft) < self.warmup:
            choice = True
        elif len(plain) < min(self.warmup, self.probe_steps):
            choice = False
        else:
            better = median(draft) <= median(plain)
            probing = self.steps % self.probe_every >= self.probe_every - self.probe_steps
            choice = (not better) if probing else better
        if choice != self._current:
            self._since_switch = 0
        self._current = choice
        self._started = self.clock()
        return choice

    def record(self, tokens: int) -> None:
        """The step that `drafting` started emitted `tokens`; the first step after a switch is
        not timed (it pays for graph changes that later steps do not)."""
        if self._started is None:
            return
        elapsed = self.clock() - self._started
        if self._since_switch > 0 and tokens > 0:
            self.costs[self._current].append(elapsed / tokens)
        self._since_switch += 1
        self.steps += 1
        self._started = None

    @property
    def seconds_per_token(self) -> dict[str, float | None]:
        """The current medians, for profiling and tests."""
        return {
            ("draft" if mode else "plain"): (median(c) if c else None)
            for mode, c in self.costs.items()
        }

"""Instrumented decode steps: what a profiler passes to `generate_step(probe=...)`.

MLX is lazy: a phase's time is only visible with a host sync after it, and the engine syncs
twice a step (or once, at greedy W=1). A probe sees the loop at its phase boundaries (draft,
pack, verify, accept, commit) and may evaluate the arrays each phase produced, so its timings
come from the one decode loop rather than from a copy of it. The extra syncs cost time: timed
runs pass no probe, and the loop then only tests `probe is not None` at each boundary.

A probe also needs the step-by-step loop: with a probe and no draft source (`drafter=None`,
no prompt lookup) the engine runs plain one-token tree steps (its guard's plain mode) instead
of its pipelined autoregressive path, whose phases overlap and cannot be told apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import mlx.core as mx

PHASES = ("draft", "pack", "verify", "accept", "commit")


class StepProbe(Protocol):
    """What the decode loop calls on a probe, in this order, once per verification step."""

    def begin(self) -> None:
        """A step starts (before its draft)."""

    def phase(self, name: str, *arrays: mx.array | list | None) -> None:
        """Phase `name` (one of PHASES) has been queued; `arrays` are its lazy outputs."""

    def accept(self, best: int, n: int, most: int) -> tuple[int, int]:
        """The step's decision (beam, drafted tokens kept) on the host; what the loop uses.
        `most` is the longest run the step's tree holds."""


class PhaseTimer:
    """Seconds per phase summed over steps, each phase evaluated before its clock stops.

    `sync=False` adds no sync (only the engine's own remain), so phase times are then not
    meaningful, only the steps' total. `forced_accept` replaces each step's accepted length
    with a drawn one (beam 0; the step still pays for every phase): end-to-end cost at a chosen
    acceptance distribution, on models whose outputs mean nothing. Output tokens are then not
    the LLM's.
    """

    def __init__(self, sync: bool = True, forced_accept: Callable[[], int] | None = None):
        self.sync = sync
        self.forced_accept = forced_accept
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._mark = 0.0

    def begin(self) -> None:
        self.steps += 1
        self._mark = time.perf_counter()

    def phase(self, name: str, *arrays: mx.array | list | None) -> None:
        if self.sync:
            pending = [a for a in arrays if a is not None]
            if pending:
                mx.eval(pending)
        now = time.perf_counter()
        self.seconds[name] += now - self._mark
        self._mark = now

    def accept(self, best: int, n: int, most: int) -> tuple[int, int]:
        if self.forced_accept is None:
            return best, n
        return 0, max(0, min(int(self.forced_accept()), most))

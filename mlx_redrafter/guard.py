"""The never-slower guard: each step runs the cheapest way of drafting, measured.

A setting that pays on one machine, model or prompt can cost more than it saves on another (a
wide tree on a CPU, a busy machine, text the drafter cannot guess). The guard chooses, before
each step, among ways of running it, from the most speculation to none: the full tree (RNN
beams and the lookup's copy), smaller ones (the copy alone), and a plain step (a tree of g0
alone: no draft, one-token verification). It times each step (the step ends in a host sync,
so the wall clock covers its work) and keeps, per mode, the seconds and tokens of its last few
steps; a mode's cost is their total seconds over their total tokens (a median of per-step
ratios would overrate the steps that accept little). After a warm-up in each mode it runs the
cheapest and, every `probe_every` steps, spends `probe_steps` steps in another mode (in turn),
so that drafting comes back when the text turns predictable again.

The guard keeps its measurements per context known before the step (`GuardByContext`: the
length of the prompt lookup's match), so that the copy runs where it pays.

What the guard has measured carries over to the next generation with the same model and
settings in the same process (`guard_for`): a chat turn, a server request or a benchmark prompt
starts from the costs the previous one measured instead of warming up every mode again.

Off by default (`generate_step(guard=True)`, `--guard`): against settings the tuner already
confirmed online it measured slower than no guard, since a drafting mode's yield per step is
noisy and a mode that looked bad in its window of recent steps is only probed now and then
(README, "The guard"). The batch's guard (`batch.py`) sums the yield of all rows per step.

Greedy output never depends on the mode (every step is lossless). Sampled output does, since
the tree decides how the randomness is spent: the engine turns the guard off when a sampling
run has an explicit seed, so a seed reproduces its tokens (see `generate_step`).
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable

import numpy as np

# A step this many times slower than its mode's median step is a stall, not a cost. Well above
# what tree size alone spreads within one mode (a copy of up to N tokens or none at all).
OUTLIER = 5.0


class SpeedGuard:
    """Chooses one of `modes` ways to run each step (0: the most speculation) from measured
    seconds per emitted token."""

    def __init__(
        self,
        modes: int = 2,
        *,
        window: int = 8,
        warmup: int = 6,
        probe_every: int = 48,
        probe_steps: int = 3,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if modes < 1:
            raise ValueError(f"a guard needs at least one mode, got {modes}")
        self.modes = modes
        self.clock = clock
        self.warmup, self.probe_every, self.probe_steps = warmup, probe_every, probe_steps
        self.samples = [deque(maxlen=window) for _ in range(modes)]
        self.steps = 0
        self._probes = 0
        self._current = 0
        self._since_switch = 0
        self._started: float | None = None

    def cost(self, mode: int) -> float | None:
        """Seconds per token over the mode's recent steps (None before any).

        A step that took over `OUTLIER` times the window's median step is left out: a stall of
        the machine (a busy neighbour, a throttled VM) is not the mode's cost, and a mode that
        is only probed now and then would carry it for hundreds of steps.
        """
        samples = list(self.samples[mode])
        if len(samples) >= 3:
            limit = OUTLIER * float(np.median([s for s, _ in samples]))
            samples = [(s, t) for s, t in samples if s <= limit]
        tokens = sum(t for _, t in samples)
        return sum(s for s, _ in samples) / tokens if tokens else None

    def choose(self) -> int:
        """The mode of the next step; starts that step's clock."""
        needed = [self.warmup] + [self.probe_steps] * (self.modes - 1)
        unwarmed = [m for m in range(self.modes) if len(self.samples[m]) < needed[m]]
        if unwarmed:
            mode = unwarmed[0]
        else:
            best = min(range(self.modes), key=lambda m: self.cost(m))
            others = [m for m in range(self.modes) if m != best]
            probing = self.steps % self.probe_every >= self.probe_every - self.probe_steps
            if probing and others:
                if self.steps % self.probe_every == self.probe_every - self.probe_steps:
                    self._probes += 1
                mode = others[self._probes % len(others)]
            else:
                mode = best
        if mode != self._current:
            self._since_switch = 0
        self._current = mode
        self._started = self.clock()
        return mode

    def drafting(self) -> bool:
        """Two-mode form: whether the next step drafts (mode 0) or runs plain."""
        return self.choose() == 0

    def record(self, tokens: int) -> None:
        """The step that `choose` started emitted `tokens`; the first step after a switch is
        not timed (it pays for graph changes that later steps do not)."""
        if self._started is None:
            return
        elapsed = self.clock() - self._started
        if self._since_switch > 0 and tokens > 0:
            self.samples[self._current].append((elapsed, tokens))
        self._since_switch += 1
        self.steps += 1
        self._started = None


class GuardByContext:
    """One `SpeedGuard` per context a step is known to be in before it runs: the length of the
    n-gram the prompt lookup matched (0: no copy to propose). A copy behind a long match is
    accepted far more often than one behind a single token, and a step with no copy at all has
    nothing to gain from the copy, so one average over all steps would run the same tree for
    all three; per context the guard can run the copy where it pays and leave it out where it
    does not. Without prompt lookup there is one context."""

    def __init__(self, modes: int, **guard_options):
        self.modes = modes
        self.guard_options = guard_options
        self.guards: dict[int, SpeedGuard] = {}
        self._active: SpeedGuard | None = None

    def for_context(self, context: int = 0) -> SpeedGuard:
        """The context's guard, created on first use."""
        if context not in self.guards:
            self.guards[context] = SpeedGuard(self.modes, **self.guard_options)
        return self.guards[context]

    def choose(self, context: int = 0) -> int:
        """The mode of the next step in this context; starts that step's clock."""
        self._active = self.for_context(context)
        return self._active.choose()

    def record(self, tokens: int) -> None:
        """The step that `choose` started emitted `tokens`."""
        if self._active is not None:
            self._active.record(tokens)
            self._active = None

    def start_generation(self) -> None:
        """A new generation: no step is running, and each context's first step pays for its
        new graph (not timed)."""
        self._active = None
        for guard in self.guards.values():
            guard._started = None
            guard._since_switch = 0


_GUARDS: dict[tuple, tuple[list, GuardByContext]] = {}


def _same_objects(refs: list, objects: tuple) -> bool:
    return all(
        (r is None and o is None) or (r is not None and r() is o)
        for r, o in zip(refs, objects, strict=True)
    )


def guard_for(objects: tuple, settings: tuple, modes: int, **guard_options) -> GuardByContext:
    """The process's guard for these objects (model, drafter) and settings, created on first
    use, so a generation starts from what the previous one with the same key measured. Objects
    are held by weak reference: a new model that reuses a freed one's id gets a fresh guard.
    `guard_options` (`SpeedGuard`'s) apply to a guard created here; put any that must differ
    between guards into `settings`."""
    key = (tuple(id(o) for o in objects), settings, modes)
    entry = _GUARDS.get(key)
    if entry is None or not _same_objects(entry[0], objects):
        refs = [None if o is None else weakref.ref(o) for o in objects]
        entry = _GUARDS[key] = (refs, GuardByContext(modes, **guard_options))
    guard = entry[1]
    guard.start_generation()
    return guard

"""The never-slower guard: drafting is switched off while it costs more than it saves, and back
on when it pays again; output stays lossless; a seeded sampling run is not guarded."""

from __future__ import annotations

import importlib
import time

import mlx.core as mx
from test_lossless import model_for, reference

from mlx_redrafter import generate_step
from mlx_redrafter.benchmarks.tiny import VOCAB, OracleDrafter, make_drafter
from mlx_redrafter.guard import SpeedGuard

# the module (the package re-exports a function of the same name)
engine = importlib.import_module("mlx_redrafter.generate")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(guard: SpeedGuard, clock: FakeClock, cost, steps: int) -> list[bool]:
    """Run `steps` guarded steps; cost(drafting, step) -> (seconds, tokens)."""
    modes = []
    for i in range(steps):
        drafting = guard.drafting()
        seconds, tokens = cost(drafting, i)
        clock.now += seconds
        guard.record(tokens)
        modes.append(drafting)
    return modes


def test_guard_keeps_the_cheaper_mode_and_probes_the_other():
    clock = FakeClock()
    guard = SpeedGuard(clock=clock, probe_every=20, probe_steps=3)
    # drafting: 3 tokens for 0.05 s (60 tok/s); plain: 1 token for 0.02 s (50 tok/s)
    modes = drive(guard, clock, lambda d, i: (0.05, 3) if d else (0.02, 1), 200)
    late = modes[40:]
    assert sum(late) / len(late) > 0.8  # mostly drafting
    assert not all(late)  # but plain steps are probed now and then


def test_guard_turns_drafting_off_and_back_on():
    clock = FakeClock()
    guard = SpeedGuard(clock=clock, probe_every=16, probe_steps=3)

    def cost(drafting, i):
        if not drafting:
            return 0.02, 1
        slow = i < 100  # drafting costs 0.1 s a step at first, then 0.03 s
        return (0.1 if slow else 0.03), 2

    modes = drive(guard, clock, cost, 280)
    assert sum(modes[30:100]) / 70 < 0.25  # drafting mostly off while it does not pay
    assert sum(modes[200:]) / 80 > 0.75  # and back on once it does


def test_guard_shrinks_the_tree_to_the_cheapest_of_three_modes():
    """Full tree slow, the copy alone fast, plain in between: the copy alone wins, and each
    per-mode cost is total seconds over total tokens, not a median of per-step ratios."""
    clock = FakeClock()
    guard = SpeedGuard(3, clock=clock, probe_every=24, probe_steps=3)
    chosen = []
    for i in range(240):
        mode = guard.choose()
        # the copy alone: mostly 1 token for 0.012 s, every 4th step 6 tokens (a repeat):
        # 0.0075 s/token in total, while its per-step median is 0.012
        seconds, tokens = {0: (0.09, 3), 1: (0.012, 6 if i % 4 == 0 else 1), 2: (0.01, 1)}[mode]
        clock.now += seconds
        guard.record(tokens)
        chosen.append(mode)
    late = chosen[60:]
    assert late.count(1) / len(late) > 0.7, late
    assert {0, 2} <= set(late)  # the others are still probed


def test_one_stall_of_the_machine_does_not_switch_drafting_off():
    """A step that stalls (the VM paused for 3 s) is not the mode's cost: the guard keeps
    drafting, which pays, instead of running plain until probes flush the stall out."""
    clock = FakeClock()
    guard = SpeedGuard(clock=clock, probe_every=48, probe_steps=3)

    def cost(drafting, i):
        seconds = 0.05 if drafting else 0.02
        if drafting and i == 30:
            seconds = 3.0
        return (seconds, 3) if drafting else (seconds, 1)

    modes = drive(guard, clock, cost, 150)
    after = modes[31:]
    assert sum(after) / len(after) > 0.85, after


def test_the_guard_chooses_apart_for_each_length_of_the_lookup_match():
    """Behind a 3-gram match the full tree pays (the copy is accepted); with no match the
    copy is empty and the RNN's beams do not pay: one guard per context runs each its way."""
    from mlx_redrafter.guard import GuardByContext

    clock = FakeClock()
    guard = GuardByContext(3, clock=clock, probe_every=24, probe_steps=3)
    chosen = {0: [], 3: []}
    for i in range(400):
        context = 3 if i % 2 else 0
        mode = guard.choose(context)
        if context == 3:  # full tree 5 tokens / 0.05 s; copy alone 4 / 0.04; plain 1 / 0.02
            seconds, tokens = {0: (0.05, 5), 1: (0.045, 3), 2: (0.02, 1)}[mode]
        else:  # no copy: full tree (RNN alone) 1.2 tokens / 0.04 s; copy alone = plain
            seconds, tokens = {0: (0.04, 1.2), 1: (0.02, 1), 2: (0.02, 1)}[mode]
        clock.now += seconds
        guard.record(tokens)
        chosen[context].append(mode)
    late_match, late_none = chosen[3][60:], chosen[0][60:]
    assert late_match.count(0) / len(late_match) > 0.8, late_match
    assert late_none.count(0) / len(late_none) < 0.2, late_none


def test_slow_verification_turns_drafting_off_in_the_engine(monkeypatch):
    """Inject a slow tree verification (sleep per verified token beyond the first): the engine
    runs most steps plain, and the output is still mlx-lm's greedy output."""
    model = model_for("llama")
    prompt = [5, 17, 33, 2, 9, 41, 8]
    expected = reference("llama", tuple(prompt), 60)
    real_verify = engine.verify_tree

    def slow_verify(model, cache, tree, tree_tokens):
        hidden, logits = real_verify(model, cache, tree, tree_tokens)
        mx.eval(hidden, logits)
        time.sleep(0.02 * (tree.size - 1))
        return hidden, logits

    monkeypatch.setattr(engine, "verify_tree", slow_verify)
    drafter = make_drafter(model)  # random: accepts almost nothing, so a tree never pays
    out, sizes = [], []
    for tokens, stats in generate_step(
        mx.array(prompt), model, drafter, max_tokens=60, beam_width=4, beam_length=4, guard=True
    ):
        out += tokens
        sizes.append(stats.tree_size)
    assert out == expected
    late = sizes[20:]
    assert sum(s == 1 for s in late) / len(late) > 0.6, sizes


def test_seeded_sampling_is_reproducible_with_the_guard_on(monkeypatch):
    """With a seed, the tree never depends on timing: two runs, one with a slow verification
    injected, give the same tokens."""
    model = model_for("llama")
    prompt = [5, 17, 33, 2, 9]
    expected = reference("llama", tuple(prompt), 40)
    drafter = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=0)
    kw = dict(max_tokens=40, temp=0.8, seed=7, beam_width=2, beam_length=4, prompt_lookup=4)
    kw["guard"] = True
    first = [t for toks, _ in generate_step(mx.array(prompt), model, drafter, **kw) for t in toks]
    real_verify = engine.verify_tree

    def slow_verify(*args):
        out = real_verify(*args)
        mx.eval(*out)
        time.sleep(0.005 * (args[2].size - 1))
        return out

    monkeypatch.setattr(engine, "verify_tree", slow_verify)
    drafter = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=0)
    again = [t for toks, _ in generate_step(mx.array(prompt), model, drafter, **kw) for t in toks]
    assert first == again


def test_a_guard_carries_its_costs_to_the_next_generation_with_the_same_objects():
    """Same model, drafter and settings: the second generation starts warmed up; another
    drafter object (even one that reuses a freed id) starts fresh."""
    from mlx_redrafter.guard import guard_for

    class Thing:
        pass

    model, drafter = Thing(), Thing()
    first = guard_for((model, drafter), (4, 5, 8), 3)
    first.for_context(2).samples[0].append((0.1, 2))
    again = guard_for((model, drafter), (4, 5, 8), 3)
    assert again is first and again.for_context(2).cost(0) == 0.05
    assert guard_for((model, drafter), (4, 5, 0), 2) is not first
    assert guard_for((model, None), (4, 5, 8), 3) is not first
    del drafter
    other = Thing()
    fresh = guard_for((model, other), (4, 5, 8), 3)
    assert fresh is not first and fresh.for_context(2).cost(0) is None

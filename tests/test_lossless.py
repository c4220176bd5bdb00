"""Greedy ReDrafter emits exactly what mlx-lm's greedy decoding emits (float32).

Every architecture and tree shape is run with an oracle drafter (true continuation in some
beams, noise in others: long acceptances, shared prefixes and rejected branches) and with a
random drafter (almost nothing accepted). A mismatch passes only when its first position is a
checked floating-point near-tie (docs/DESIGN.md section 5).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter import generate_step, make_prompt_cache, stream_generate
from mlx_redrafter.benchmarks.tiny import (
    CONFIGS,
    VOCAB,
    OracleDrafter,
    engine_tokens,
    first_divergence_is_tie,
    make_drafter,
    make_model,
    make_tokenizer,
    reference_greedy,
)

ARCHS = list(CONFIGS) + ["llama_q4"]
WIDTHS = (1, 2, 4, 8)
LENGTHS = (2, 3, 5)
MAX_TOKENS = 40


@functools.cache
def model_for(name: str):
    return make_model(name)


def prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in (1, 13)]


@functools.cache
def reference(name: str, prompt: tuple[int, ...], max_tokens: int = MAX_TOKENS) -> list[int]:
    return reference_greedy(model_for(name), list(prompt), max_tokens)


def run(model, drafter, prompt, width, length, max_tokens=MAX_TOKENS):
    # guard off: the counts the tests check are the drafter's, not the speed guard's choices
    kw = dict(beam_width=width, beam_length=length, guard=False)
    return engine_tokens(model, drafter, prompt, max_tokens, **kw)


def assert_lossless(model, prompt, expected, got):
    ok, diff, gap = first_divergence_is_tie(model, prompt, expected, got)
    assert ok, (
        f"output differs from greedy decoding at token {diff} (relative top-2 gap {gap:.2e}, "
        f"not a near-tie)\nexpected {expected}\ngot      {got}"
    )


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ARCHS)
def test_greedy_matches_autoregressive(name, width, length):
    model = model_for(name)
    accepted_any_long = False
    for i, prompt in enumerate(prompts(seed=width * 10 + length)):
        expected = reference(name, tuple(prompt))
        oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=i)
        got, stats = run(model, oracle, prompt, width, length)
        assert len(got) == MAX_TOKENS
        assert_lossless(model, prompt, expected, got)
        accepted_any_long |= any(s.accepted == length - 1 for s in stats)
        if i == 0:
            got, _ = run(model, make_drafter(model, seed=width + length), prompt, width, length)
            assert_lossless(model, prompt, expected, got)
    # the oracle must have exercised full-length acceptance (the bonus after a whole beam)
    assert accepted_any_long


def test_no_drafter_matches_autoregressive():
    for name in ARCHS:
        model = model_for(name)
        for prompt in prompts(seed=3):
            expected = reference(name, tuple(prompt))
            got, stats = run(model, None, prompt, 1, 1)
            assert_lossless(model, prompt, expected, got)
            assert all(s.accepted == 0 for s in stats)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 7, 11, 12, 13])
def test_max_tokens_inside_an_accepted_run(max_tokens):
    model = model_for("llama")
    prompt = prompts(seed=5)[1]
    expected = reference("llama", tuple(prompt))
    oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=1)
    got, _ = run(model, oracle, prompt, 4, 5, max_tokens=max_tokens)
    assert got == expected[:max_tokens]


def test_eos_inside_an_accepted_run():
    model = model_for("llama")
    prompt = prompts(seed=6)[1]
    expected = reference("llama", tuple(prompt))
    # every position of the reference output, used as EOS, must stop exactly there
    for stop_at in range(1, 20):
        eos = expected[stop_at]
        if eos in expected[:stop_at]:
            continue
        tokenizer = make_tokenizer(eos=eos)
        oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=stop_at)
        responses = list(
            stream_generate(
                model,
                tokenizer,
                prompt,
                drafter=oracle,
                max_tokens=MAX_TOKENS,
                beam_width=4,
                beam_length=5,
                prompt_lookup=0,
            )
        )
        tokens = [t for r in responses for t in r.tokens]
        assert tokens == expected[:stop_at]
        assert responses[-1].finish_reason == "stop"
        assert all(r.finish_reason is None for r in responses[:-1])
        assert "".join(r.text for r in responses).split() == [f"t{t}" for t in tokens]


def test_step_tokens_say_what_the_cache_holds_past_eos():
    """A step that hits EOS may have committed tokens after it: `step_tokens` lists them, and
    the cache holds the prompt and every step token but the last."""
    model = model_for("llama")
    prompt = prompts(seed=6)[1]
    expected = reference("llama", tuple(prompt))
    past_eos = False
    for stop_at in range(2, 12):
        eos = expected[stop_at]
        if eos in expected[:stop_at]:
            continue
        oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=stop_at)
        cache = make_prompt_cache(model)
        responses = list(
            stream_generate(model, make_tokenizer(eos=eos), prompt, drafter=oracle,
                            max_tokens=MAX_TOKENS, beam_width=4, beam_length=5, prompt_lookup=0,
                            prompt_cache=cache, guard=False)
        )  # fmt: skip
        emitted = [t for r in responses for t in r.step_tokens]
        assert emitted == expected[: len(emitted)] and len(emitted) > stop_at
        assert all(layer.offset == len(prompt) + len(emitted) - 1 for layer in cache)
        past_eos |= len(emitted) > stop_at + 1
    assert past_eos


def test_stream_generate_reports_lengths_and_acceptance():
    model = model_for("qwen3")
    prompt = prompts(seed=7)[1]
    expected = reference("qwen3", tuple(prompt), 30)
    oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=2)
    tokenizer = make_tokenizer(eos=0)
    responses = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            drafter=oracle,
            max_tokens=30,
            beam_width=4,
            beam_length=4,
            prompt_lookup=0,
            guard=False,
        )
    )
    tokens = [t for r in responses for t in r.tokens]
    assert tokens == expected
    last = responses[-1]
    assert last.finish_reason == "length"
    assert last.generation_tokens == 30 == sum(len(r.tokens) for r in responses)
    verify_steps = len(responses) - 1  # the first response is the prefill's token
    assert last.mean_accepted == pytest.approx(29 / verify_steps)
    assert last.mean_accepted > 1.5  # the oracle is accepted often
    assert [r.generation_tokens for r in responses] == list(
        np.cumsum([len(r.tokens) for r in responses])
    )
    assert last.prompt_tokens == len(prompt)


def test_stop_string_ends_at_its_token():
    model = model_for("llama")
    prompt = prompts(seed=8)[1]
    expected = reference("llama", tuple(prompt))
    tokenizer = make_tokenizer(eos=0)
    stop = f"t{expected[6]} t{expected[7]}"
    oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=3)
    responses = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            drafter=oracle,
            stop_strings=[stop],
            beam_width=4,
            beam_length=5,
            prompt_lookup=0,
        )
    )
    text = "".join(r.text for r in responses)
    full = " ".join(f"t{t}" for t in expected)
    assert text == full[: full.index(stop)]
    assert responses[-1].finish_reason == "stop"
    # no token after the one that completed the stop string was emitted
    emitted = [t for r in responses for t in r.tokens]
    completed = " ".join(f"t{t}" for t in emitted)
    assert stop in completed and stop not in " ".join(f"t{t}" for t in emitted[:-1])


def test_cache_after_steps_equals_autoregressive_cache():
    for name in ("llama", "gemma3_text", "qwen3"):
        model = model_for(name)
        prompt = prompts(seed=9)[1]
        expected = reference(name, tuple(prompt))
        oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=4)
        cache = make_prompt_cache(model)
        got = []
        for tokens, _ in generate_step(
            mx.array(prompt), model, oracle, max_tokens=25, prompt_cache=cache
        ):
            got += tokens
        assert got == expected[:25]
        # the last token is not in the cache yet: it is the next step's g0
        ar_cache = make_prompt_cache(model)
        model(mx.array(prompt + got[:-1])[None], cache=ar_cache)
        for ours, theirs in zip(cache, ar_cache, strict=True):
            assert ours.offset == theirs.offset == len(prompt) + len(got) - 1
            k1, v1 = ours.keys[..., : ours.offset, :], ours.values[..., : ours.offset, :]
            k2, v2 = theirs.keys[..., : theirs.offset, :], theirs.values[..., : theirs.offset, :]
            assert mx.allclose(k1, k2, atol=1e-4, rtol=1e-4).item()
            assert mx.allclose(v1, v2, atol=1e-4, rtol=1e-4).item()


def test_prompt_cache_continues_a_conversation():
    """Generating in two calls over one cache equals generating over the joined context."""
    model = model_for("llama")
    first, second = prompts(seed=10)
    cache = make_prompt_cache(model)
    out1 = [
        t
        for toks, _ in generate_step(mx.array(first), model, None, max_tokens=5, prompt_cache=cache)
        for t in toks
    ]
    # the last generated token is not cached yet: the next call's prompt starts with it
    context = first + out1
    drafter = make_drafter(model)
    out2 = [
        t
        for toks, _ in generate_step(
            mx.array([out1[-1]] + second), model, drafter, max_tokens=10, prompt_cache=cache
        )
        for t in toks
    ]
    assert out2 == reference("llama", tuple(context + second), 10)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 9, 25])
def test_no_drafter_cache_after_an_early_stop(stop_after):
    """drafter=None queues each forward before its token reaches the host (pipelined): a consumer
    that stops early must still find the cache holding everything but the last token."""
    model = model_for("llama")
    prompt = prompts(seed=11)[1]
    expected = reference("llama", tuple(prompt))
    cache = make_prompt_cache(model)
    steps = generate_step(mx.array(prompt), model, None, max_tokens=25, prompt_cache=cache)
    got = []
    for tokens, _ in steps:
        got += tokens
        if len(got) == stop_after:
            break
    steps.close()
    assert got == expected[:stop_after]
    ar_cache = make_prompt_cache(model)
    model(mx.array(prompt + got[:-1])[None], cache=ar_cache)
    for ours, theirs in zip(cache, ar_cache, strict=True):
        assert ours.offset == theirs.offset == len(prompt) + len(got) - 1
        k1, k2 = ours.keys[..., : ours.offset, :], theirs.keys[..., : theirs.offset, :]
        assert mx.allclose(k1, k2, atol=1e-4, rtol=1e-4).item()
    # and the conversation continues from there as if nothing had been queued
    more = [
        t
        for toks, _ in generate_step(
            mx.array(got[-1:]), model, None, max_tokens=5, prompt_cache=cache
        )
        for t in toks
    ]
    assert more == expected[stop_after : stop_after + 5]

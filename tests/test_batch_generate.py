"""Batched greedy ReDrafter (mlx_redrafter/batch.py) is lossless per row.

Each row's tokens must equal that prompt's own greedy decoding (mlx-lm's, which the
single-sequence engine equals: tests/test_lossless.py), for several batch sizes, mixed prompt
lengths, rows that end at different steps, rows that join or leave a running batch, with an
oracle drafter (long acceptances, rejected branches, trees of different sizes in one step), a
random drafter (little accepted) and prompt lookup, on llama, qwen3 and gemma3_text (sliding
window shorter than the context). A mismatch passes only at a checked float near-tie
(docs/DESIGN.md section 5), as in the single-sequence tests.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter import make_prompt_cache, stream_generate
from mlx_redrafter.batch import (
    PLAIN,
    BatchGenerator,
    batch_generate,
    batch_greedy_accept,
    pad_trees,
)
from mlx_redrafter.batch_cache import batch_verification_mask
from mlx_redrafter.benchmarks.tiny import (
    VOCAB,
    BatchOracleDrafter,
    engine_tokens,
    first_divergence_is_tie,
    make_drafter,
    make_model,
    make_tokenizer,
    reference_greedy,
)
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import PAD, pack_tree
from mlx_redrafter.verify import prepare_model

LENGTHS = (1, 13, 5, 9, 2, 17, 7, 3)  # mixed prompt lengths, one per row (up to B = 8)
MAX_TOKENS = (24, 30, 11, 19, 27, 16, 30, 8)  # rows end at different steps


@functools.cache
def model_for(name: str):
    model = make_model(name)
    prepare_model(model)
    return model


def prompts_for(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in LENGTHS[:batch]]


@functools.cache
def reference(name: str, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return reference_greedy(model_for(name), list(prompt), max_tokens)


def assert_lossless(name, prompt, expected, got):
    ok, diff, gap = first_divergence_is_tie(model_for(name), prompt, expected, got)
    assert ok, (
        f"row differs from greedy decoding at token {diff} (relative top-2 gap {gap:.2e}, "
        f"not a near-tie)\nexpected {expected}\ngot      {got}"
    )


def oracle_for(name, prompts, max_tokens, seed=0):
    sequences = [p + reference(name, tuple(p), m) for p, m in zip(prompts, max_tokens, strict=True)]
    return BatchOracleDrafter(model_for(name), sequences, VOCAB, seed=seed)


def no_eos():
    return make_tokenizer(eos=1)  # prompts never hold it (ids from 3); outputs seldom do


def check_rows(name, prompts, max_tokens, response):
    for prompt, m, got, reason in zip(
        prompts, max_tokens, response.token_ids, response.finish_reasons, strict=True
    ):
        expected = reference(name, tuple(prompt), m)
        if 1 in expected:  # the EOS of `no_eos` ends the row there, unshown
            expected = expected[: expected.index(1)]
            assert reason == "stop" and len(got) == len(expected)
        else:
            assert reason == "length" and len(got) == m
        assert_lossless(name, prompt, expected, got)


@pytest.mark.parametrize("shape", [(1, 2), (4, 5)])
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])
def test_rows_equal_their_own_greedy_decoding(name, shape):
    width, length = shape
    prompts, max_tokens = prompts_for(3), list(MAX_TOKENS[:3])
    model = model_for(name)
    for drafter in (oracle_for(name, prompts, max_tokens), make_drafter(model, seed=3)):
        response = batch_generate(
            model, no_eos(), prompts, drafter, max_tokens=max_tokens,
            beam_width=width, beam_length=length, guard=False,  # forwards of the shape itself
        )  # fmt: skip
        check_rows(name, prompts, max_tokens, response)
        # every decode step is one forward for the whole batch
        assert response.forwards < max(max_tokens)
        if isinstance(drafter, BatchOracleDrafter):
            # the oracle is accepted: well under one forward per token of the longest row
            assert response.forwards < 0.8 * max(max_tokens)


@pytest.mark.parametrize(
    "name, batch",
    [("llama", 1), ("llama", 2), ("llama", 3), ("llama", 8), ("qwen3", 8), ("gemma3_text", 8)]
    + [("llama_q4", 3)],  # 4-bit weights
)
def test_batch_sizes(name, batch):
    prompts, max_tokens = prompts_for(batch, seed=batch), list(MAX_TOKENS[:batch])
    drafter = oracle_for(name, prompts, max_tokens, seed=batch)
    response = batch_generate(
        model_for(name), no_eos(), prompts, drafter, max_tokens=max_tokens,
        beam_width=4, beam_length=5,
    )  # fmt: skip
    check_rows(name, prompts, max_tokens, response)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_prompt_lookup_with_and_without_the_drafter(name):
    rng = np.random.default_rng(7)
    # repeated stretches give the lookup something to copy
    base = [rng.integers(3, VOCAB, size=n).tolist() for n in (6, 4, 9)]
    prompts = [b * 3 for b in base]
    max_tokens = [20, 26, 14]
    model = model_for(name)
    for drafter in (None, make_drafter(model, seed=5)):
        response = batch_generate(
            model, no_eos(), prompts, drafter, max_tokens=max_tokens,
            beam_width=2, beam_length=3, prompt_lookup=5,
        )  # fmt: skip
        check_rows(name, prompts, max_tokens, response)


def test_plain_batched_decoding_without_any_draft():
    prompts, max_tokens = prompts_for(3, seed=4), [9, 14, 6]
    response = batch_generate(model_for("qwen3"), no_eos(), prompts, None, max_tokens=max_tokens)
    check_rows("qwen3", prompts, max_tokens, response)
    assert response.forwards == max(max_tokens) - 1  # one token a step after the prefill's


def test_equal_to_the_single_sequence_engine():
    prompts = prompts_for(3, seed=9)
    model = model_for("gemma3_text")
    drafter = make_drafter(model, seed=2)
    response = batch_generate(
        model, no_eos(), prompts, drafter, max_tokens=18, beam_width=4, beam_length=3
    )
    for prompt, got in zip(prompts, response.token_ids, strict=True):
        single, _ = engine_tokens(
            model, drafter, prompt, 18, beam_width=4, beam_length=3, guard=False
        )
        stop = single.index(1) if 1 in single else None  # the batch stops at the EOS
        assert got == single[:stop]


def test_rows_end_at_eos_on_different_steps():
    prompts = prompts_for(3, seed=11)
    expected = [reference("llama", tuple(p), 30) for p in prompts]
    # an EOS that ends row 1 early (its first occurrence there, past 3 tokens); the other
    # rows end where it first appears in theirs, or at max_tokens
    row = expected[1]
    eos, at = next((t, i) for i, t in enumerate(row) if i >= 3 and t not in row[:i])
    tokenizer = make_tokenizer(eos=eos)
    drafter = oracle_for("llama", prompts, [30] * 3, seed=3)
    response = batch_generate(
        model_for("llama"), tokenizer, prompts, drafter, max_tokens=30,
        beam_width=4, beam_length=5,
    )  # fmt: skip
    ended_early = 0
    for exp, got, reason in zip(expected, response.token_ids, response.finish_reasons, strict=True):
        stop = exp.index(eos) if eos in exp else None
        assert got == exp[:stop]  # EOS itself is not shown
        assert reason == ("stop" if stop is not None else "length")
        ended_early += stop is not None
    assert ended_early >= 1 and response.texts[1] == " ".join(f"t{t}" for t in row[:at])


class ForwardCounter:
    """Counts the LLM's forwards (calls of the inner model) and their token shapes."""

    def __init__(self, monkeypatch, model):
        self.shapes: list[tuple[int, ...]] = []
        inner = type(model.model)
        original = inner.__call__

        def counted(module, inputs, *args, **kwargs):
            self.shapes.append(tuple(inputs.shape))
            return original(module, inputs, *args, **kwargs)

        monkeypatch.setattr(inner, "__call__", counted)

    def take(self) -> list[tuple[int, ...]]:
        shapes, self.shapes = self.shapes, []
        return shapes


def test_one_forward_per_step_and_a_row_joining_mid_generation(monkeypatch):
    name = "gemma3_text"
    model = model_for(name)
    prompts = prompts_for(3, seed=13)
    max_tokens = [30, 12, 25]
    drafter = oracle_for(name, prompts, max_tokens, seed=5)
    counter = ForwardCounter(monkeypatch, model)
    gen = BatchGenerator(model, drafter, beam_width=4, beam_length=4, guard=False)
    got: dict[int, list[int]] = {}
    uids = gen.insert(prompts[:2], max_tokens[:2])
    # one batched prefill forward, right-padded to the longer prompt
    assert counter.take() == [(2, max(len(prompts[0]), len(prompts[1])))]
    steps = 0
    while gen.active:
        if steps == 3:  # a row joins a running batch: prefilled alone...
            uids += gen.insert(prompts[2:], max_tokens[2:])
            assert counter.take() == [(1, len(prompts[2]))]
            active = gen.active
        else:
            active = gen.active
        responses = gen.next()
        steps += 1
        shapes = counter.take()
        # ...then it shares the next step's single forward with the running rows
        assert len(shapes) == 1 and shapes[0][0] == active
        for r in responses:
            got.setdefault(r.uid, []).extend(r.tokens)
            if steps == 4 and r.uid == uids[2]:
                assert len(r.tokens) >= 2  # its prefill token and its first step's tokens
    assert gen.forwards == steps
    for prompt, m, uid in zip(prompts, max_tokens, uids, strict=True):
        assert_lossless(name, prompt, reference(name, tuple(prompt), m), got[uid])
        assert len(got[uid]) == m


def test_removing_a_row_leaves_the_others_unchanged():
    prompts, max_tokens = prompts_for(3, seed=17), [20, 20, 20]
    gen = BatchGenerator(model_for("qwen3"), make_drafter(model_for("qwen3")), beam_width=2)
    uids = gen.insert(prompts, max_tokens)
    got = {uid: [] for uid in uids}
    for step in range(100):
        if step == 2:
            gen.remove([uids[1]])
        for r in gen.next():
            got[r.uid] += r.tokens
        if not gen.active:
            break
    for i in (0, 2):
        assert got[uids[i]] == reference("qwen3", tuple(prompts[i]), 20)
    assert len(got[uids[1]]) < 20


def test_more_prompts_than_the_batch_limit_are_queued():
    prompts, max_tokens = prompts_for(5, seed=19), list(MAX_TOKENS[:5])
    response = batch_generate(
        model_for("llama"), no_eos(), prompts, make_drafter(model_for("llama")),
        max_tokens=max_tokens, beam_width=2, beam_length=3, completion_batch_size=2,
    )  # fmt: skip
    check_rows("llama", prompts, max_tokens, response)


def test_bad_input_is_named():
    model = model_for("llama")
    with pytest.raises(ValueError, match="prompts is empty"):
        batch_generate(model, no_eos(), [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        batch_generate(model, no_eos(), [[5], []])
    with pytest.raises(ValueError, match="prompt 0 has 513 tokens, more than the model's context"):
        batch_generate(model, no_eos(), [[5] * 513])
    gen = BatchGenerator(model, None, completion_batch_size=2)
    gen.insert([[5], [6]], 4)
    with pytest.raises(ValueError, match="exceed completion_batch_size=2"):
        gen.insert([[7]], 4)
    with pytest.raises(ValueError, match="completion_batch_size must be >= 1"):
        BatchGenerator(model, None, completion_batch_size=0)
    with pytest.raises(ValueError, match="beam_width"):
        BatchGenerator(model, make_drafter(model), beam_width=0)
    with pytest.raises(ValueError, match="'auto' speculation shape needs the tokenizer"):
        BatchGenerator(model, make_drafter(model), beam_width="auto")
    with pytest.raises(ValueError, match="W=2 at B=4: no drafter"):
        BatchGenerator(model, None, shape_table={1: (0, 0, 3), 4: (2, 3, 0)})
    with pytest.raises(ValueError, match="shape_table has batch size 0"):
        BatchGenerator(model, make_drafter(model), shape_table={0: (1, 2, 0)})
    with pytest.raises(ValueError, match="shape_table is empty"):
        BatchGenerator(model, make_drafter(model), shape_table={})
    with pytest.raises(ValueError, match="2 max_tokens for 1 prompts"):
        batch_generate(model, no_eos(), [[5]], max_tokens=[3, 4])


# ---------------------------------------------------------------------------- the pieces
def test_mask_hides_holes_and_padding_and_keeps_windows():
    trees = [pack_tree(np.array([[5, 6, 7], [5, 8, PAD]])), pack_tree(np.array([[9]]))]
    padded = pad_trees(trees, [np.array([[5, 6, 7], [5, 8, PAD]]), np.array([[9]])])
    lengths = np.array([4, 2])
    mask = np.array(batch_verification_mask(padded.masks, padded.depths, lengths, padded.sizes, 4))
    assert mask.shape == (2, 1, 4, 8)
    # row 0: the whole prefix, then its tree
    assert mask[0, 0, :, :4].all() and (mask[0, 0, :, 4:] == trees[0].mask).all()
    # row 1: its 2 prefix tokens, not its hole [2, 4); its single node sees itself; its pad
    # nodes see only themselves, and the real node sees no pad
    assert (mask[1, 0, 0] == [1, 1, 0, 0, 1, 0, 0, 0]).all()
    for pad in (1, 2, 3):
        assert mask[1, 0, pad].tolist() == [k == 4 + pad for k in range(8)]
    windowed = np.array(
        batch_verification_mask(padded.masks, padded.depths, lengths, padded.sizes, 4, 2)
    )
    # row 0, depth 2 node (position 6) with window 2: no prefix key, only its parent and itself
    deep = int(np.flatnonzero(padded.depths[0] == 2)[0])
    assert not windowed[0, 0, deep, :4].any() and windowed[0, 0, deep, 4:].sum() == 2


def test_greedy_accept_per_row_ignores_padded_branches():
    branches = mx.array([[[5, 6, 7], [5, 8, PAD]], [[9, PAD, PAD], [PAD, PAD, PAD]]])
    # row 0 packed: 5 6 7 8 -> argmax says after 5: 8, after 8: 3; row 1: after 9: 4
    unpacker = mx.array([[[0, 1, 2], [0, 3, 0]], [[0, 0, 0], [0, 0, 0]]])
    logits = mx.zeros((2, 4, 10))
    picks = [[8, 0, 0, 3], [4, 0, 0, 0]]
    for r, row in enumerate(picks):
        for node, token in enumerate(row):
            logits[r, node, token] = 1.0
    best, accepted, next_token = batch_greedy_accept(branches, unpacker, logits)
    assert best.tolist() == [1, 0] and accepted.tolist() == [1, 0]
    assert next_token.tolist() == [3, 4]


def test_cache_rows_equal_an_autoregressive_cache():
    """After batched steps each row's cache holds exactly what a plain forward over its prompt
    and output gives (the commit moved each accepted path into place)."""
    name = "gemma3_text"
    model = model_for(name)
    prompts, max_tokens = prompts_for(3, seed=23), [40, 40, 40]
    drafter = oracle_for(name, prompts, max_tokens, seed=1)
    gen = BatchGenerator(model, drafter, beam_width=4, beam_length=5)
    uids = gen.insert(prompts, max_tokens)
    got = {uid: [] for uid in uids}
    for _ in range(4):
        for r in gen.next():
            got[r.uid] += r.tokens
    for row, (uid, prompt) in enumerate(zip(uids, prompts, strict=True)):
        context = prompt + got[uid][:-1]  # the last token is the next g0, not cached yet
        assert int(gen.cache[0].lengths[row]) == len(context)
        plain = make_prompt_cache(model)
        model(mx.array(context)[None], cache=plain)
        for ours, theirs in zip(gen.cache, plain, strict=True):
            k, v = ours.row(row)
            assert mx.allclose(k, theirs.keys[..., : theirs.offset, :], atol=1e-4).item()
            assert mx.allclose(v, theirs.values[..., : theirs.offset, :], atol=1e-4).item()


@pytest.mark.slow  # the real 135M model: three answers, each decoded twice
def test_default_model_rows_equal_their_own_greedy_decoding():
    from mlx_redrafter import load

    model, tokenizer, drafter = load()
    questions = ("What is the capital of France?", "Write a haiku about the sea.", "Hi!")
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in questions
    ]
    response = batch_generate(
        model, tokenizer, prompts, drafter, max_tokens=[24, 32, 16],
        beam_width=4, beam_length=5, prompt_lookup=4,
    )  # fmt: skip
    eos = set(tokenizer.eos_token_ids)
    for prompt, m, got in zip(prompts, [24, 32, 16], response.token_ids, strict=True):
        expected = reference_greedy(model, prompt, m)
        stop = next((i for i, t in enumerate(expected) if t in eos), None)
        ok, diff, gap = first_divergence_is_tie(model, prompt, expected[:stop], got)
        assert ok, f"diverged at {diff} (gap {gap:.2e})"


# ---------------------------------------------------------------------------- sampling per row
def test_sampled_rows_reproduce_the_single_engine_with_their_seeds():
    """A sampled row's seed fixes its tokens whatever else is in the batch: its exact-rule walk
    runs on its own tree (pads never enter it) with its own random stream, as generate_step."""
    model = model_for("llama")
    drafter = make_drafter(model)
    prompts = prompts_for(3, seed=29)
    hot, greedy = SamplingParams(temp=1.0, top_p=0.9), SamplingParams()
    gen = BatchGenerator(model, drafter, beam_width=4, beam_length=3)
    uids = gen.insert(prompts, 20, [hot, greedy, hot], seeds=[5, None, 7])
    got = {uid: [] for uid in uids}
    padded = 0
    while gen.active:
        for r in gen.next():
            got[r.uid] += r.tokens
            padded += r.tree_size < r.padded_size
    assert padded > 0  # some rows' trees were padded to another row's larger tree
    for prompt, uid, seed in zip(prompts, uids, [5, None, 7], strict=True):
        kw = dict(temp=1.0, top_p=0.9, seed=seed) if seed is not None else {}
        single, _ = engine_tokens(
            model, drafter, prompt, 20, beam_width=4, beam_length=3, guard=False, **kw
        )
        assert got[uid] == single


def test_a_sampled_row_inside_a_batch_samples_exactly():
    """Chi-square: (t1, t2) and (t2, t3) of sampled rows that share batches with a greedy row
    of another length (so their trees are padded in some steps) follow autoregressive
    sampling's exact law."""
    from test_exact_sampling import ALPHA, PROMPT, chi_square_pvalue, probs, small_model

    model = small_model()
    prepare_model(model)
    drafter = make_drafter(model)
    params = SamplingParams(temp=1.0, top_p=0.95)
    # the exact law of the first three tokens: one forward over all 16 x 16 contexts
    first = probs(model(mx.array(PROMPT)[None])[0, -1], params)
    second = probs(model(mx.array([PROMPT + [t] for t in range(16)]))[:, -1], params)
    third = probs(
        model(mx.array([PROMPT + [a, b] for a in range(16) for b in range(16)]))[:, -1], params
    ).reshape(16, 16, 16)
    law = first[:, None, None] * second[:, :, None] * third
    counts = np.zeros((16, 16, 16), np.int64)
    padded = accepted = 0
    rows, batches = 16, 80
    for batch in range(batches):
        gen = BatchGenerator(model, drafter, beam_width=4, beam_length=3)
        uids = gen.insert(
            [PROMPT] * rows + [[5, 9, 1, 3, 7, 12, 8]],
            [3] * (rows + 1),
            [params] * rows + [SamplingParams()],
            seeds=[batch * rows + i for i in range(rows)] + [None],
        )
        got = {uid: [] for uid in uids}
        while gen.active:
            for r in gen.next():
                got[r.uid] += r.tokens
                if r.uid in uids[:rows] and r.tree_size:
                    padded += r.tree_size < r.padded_size
                    accepted += r.accepted
        for uid in uids[:rows]:
            counts[tuple(got[uid])] += 1
    samples = rows * batches
    assert padded > samples // 4 and accepted > samples // 10  # padded trees, walked trees
    for axes, marginal in (((2,), "t1, t2"), ((0,), "t2, t3")):
        p = chi_square_pvalue(counts.sum(axis=axes), law.sum(axis=axes))
        assert p >= ALPHA, (marginal, p)


def test_batch_generate_takes_sampling_and_seeds_per_prompt():
    model = model_for("qwen3")
    prompts = prompts_for(2, seed=31)
    hot = SamplingParams(temp=0.9)
    kw = dict(max_tokens=12, beam_width=2, beam_length=3)
    drafter = make_drafter(model)
    first = batch_generate(
        model, no_eos(), prompts, drafter, sampling=[hot, None], seeds=[3, 0], **kw
    )
    again = batch_generate(
        model, no_eos(), prompts, drafter, sampling=[hot, None], seeds=[3, 0], **kw
    )
    other = batch_generate(
        model, no_eos(), prompts, drafter, sampling=[hot, None], seeds=[4, 0], **kw
    )
    assert first.token_ids == again.token_ids
    assert first.token_ids[0] != other.token_ids[0]
    single, _ = engine_tokens(model, drafter, prompts[0], 12, temp=0.9, seed=3, beam_width=2,
                              beam_length=3, guard=False)  # fmt: skip
    assert first.token_ids[0] == single[: len(first.token_ids[0])]
    # the greedy row is the same in all three
    greedy = reference("qwen3", tuple(prompts[1]), 12)
    greedy = greedy[: greedy.index(1)] if 1 in greedy else greedy  # no_eos's EOS ends it
    assert first.token_ids[1] == other.token_ids[1] == greedy
    with pytest.raises(ValueError, match="1 sampling for 2 prompts"):
        batch_generate(model, no_eos(), prompts, drafter, sampling=[hot], **kw)


def test_prompt_caches_in_and_out():
    """A row may start from a cache holding an earlier context (left as it was), and a
    finished row's cache carries its conversation on with the single-sequence engine."""
    name = "llama"
    model = model_for(name)
    earlier, prompts = prompts_for(2, seed=37), prompts_for(3, seed=41)
    cache = make_prompt_cache(model)
    model(mx.array(earlier[1])[None], cache=cache)
    kept = mx.array(cache[0].keys[..., : cache[0].offset, :])
    response = batch_generate(
        model, no_eos(), prompts, make_drafter(model), max_tokens=[10, 14, 6],
        beam_width=4, beam_length=3, prompt_caches=[None, cache, None],
        return_prompt_caches=True,
    )  # fmt: skip
    contexts = [prompts[0], earlier[1] + prompts[1], prompts[2]]
    for context, m, got in zip(contexts, [10, 14, 6], response.token_ids, strict=True):
        assert got == reference(name, tuple(context), m)
    # the caller's cache is as it was
    assert cache[0].offset == len(earlier[1])
    assert mx.array_equal(cache[0].keys[..., : cache[0].offset, :], kept).item()
    # row 1's cache holds its context and its output but the last token: continue from there
    out = response.token_ids[1]
    final = response.caches[1]
    assert final[0].offset == len(contexts[1]) + len(out) - 1
    more, _ = engine_tokens(model, None, [out[-1], *prompts[2]], 8, prompt_cache=final)
    assert more == reference(name, tuple(contexts[1] + out + prompts[2]), 8)


def test_stop_strings_end_rows_as_stream_generate_ends_them():
    name = "llama"
    model = model_for(name)
    prompts = prompts_for(3, seed=43)
    expected = reference(name, tuple(prompts[1]), 30)
    stops = [f"t{expected[6]} t{expected[7]}", "no such text"]
    tokenizer = no_eos()
    kw = dict(beam_width=4, beam_length=5, prompt_lookup=0)
    drafter = oracle_for(name, prompts, [30] * 3, seed=7)
    response = batch_generate(
        model, tokenizer, prompts, drafter, max_tokens=30, stop_strings=stops, **kw
    )
    assert response.finish_reasons[1] == "stop"
    for prompt, text, ids, reason in zip(
        prompts, response.texts, response.token_ids, response.finish_reasons, strict=True
    ):
        alone = list(
            stream_generate(
                model, tokenizer, prompt, drafter=make_drafter(model), max_tokens=30,
                stop_strings=stops, guard=False, **kw,
            )
        )  # fmt: skip
        assert text == "".join(r.text for r in alone)
        assert ids == [t for r in alone for t in r.tokens]
        assert reason == alone[-1].finish_reason


def test_logits_processors_per_row_as_generate_step_applies_them():
    from mlx_lm.sample_utils import make_logits_processors

    model = model_for("qwen3")
    drafter = make_drafter(model, seed=4)
    prompts = prompts_for(3, seed=47)
    banned = reference("qwen3", tuple(prompts[2]), 5)[1]

    def ban(history: mx.array, logits: mx.array) -> mx.array:
        return mx.where(mx.arange(logits.shape[-1]) == banned, -mx.inf, logits)

    processors = [make_logits_processors(repetition_penalty=1.5), None, [ban]]
    sampling = [None, None, SamplingParams(temp=0.8)]
    kw = dict(beam_width=4, beam_length=3)
    response = batch_generate(
        model, no_eos(), prompts, drafter, max_tokens=16, sampling=sampling, seeds=[0, 0, 9],
        logits_processors=processors, **kw,
    )  # fmt: skip
    for prompt, procs, params, seed, got in zip(
        prompts, processors, sampling, [0, 0, 9], response.token_ids, strict=True
    ):
        extra = dict(temp=params.temp, seed=seed) if params is not None else {}
        single, _ = engine_tokens(
            model, drafter, prompt, 16, logits_processors=procs, guard=False, **kw, **extra
        )
        stop = single.index(1) if 1 in single else None  # no_eos's EOS ends a batch row
        assert got == single[:stop]
    assert banned not in response.token_ids[2]
    assert response.token_ids[0] != reference("qwen3", tuple(prompts[0]), 16)  # it acted


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_batched_prefill_in_chunks_fills_each_row_as_a_plain_forward(name, monkeypatch):
    """Prompts prefilled together, right-padded, in chunks of 4 columns (rows ending inside a
    chunk, on its boundary, or chunks before): each row's cache equals a plain forward's, its
    first token is its greedy one, and a group costs one forward per chunk."""
    model = model_for(name)
    rng = np.random.default_rng(53)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (1, 8, 11, 4, 14)]
    counter = ForwardCounter(monkeypatch, model)
    gen = BatchGenerator(model, None, prefill_step_size=4, prefill_batch_size=3)
    uids = gen.insert(prompts, 6)
    # groups of 3 and 2 prompts: ceil(11 / 4) + ceil(14 / 4) chunk forwards
    assert counter.take() == [(3, 4)] * 2 + [(3, 3)] + [(2, 4)] * 3 + [(2, 2)]
    for row, prompt in enumerate(prompts):
        plain = make_prompt_cache(model)
        model(mx.array(prompt)[None], cache=plain)
        for ours, theirs in zip(gen.cache, plain, strict=True):
            k, v = ours.row(row)
            assert int(ours.lengths[row]) == len(prompt) == theirs.offset
            assert mx.allclose(k, theirs.keys[..., : theirs.offset, :], atol=1e-4).item()
            assert mx.allclose(v, theirs.values[..., : theirs.offset, :], atol=1e-4).item()
    got = {uid: [] for uid in uids}
    while gen.busy:
        for r in gen.next():
            got[r.uid] += r.tokens
    for prompt, uid in zip(prompts, uids, strict=True):
        assert_lossless(name, prompt, reference(name, tuple(prompt), 6), got[uid])


def test_a_row_stops_where_the_context_is_full():
    """A row near the model's context (512 tokens) ends with "length" where generate_step
    ends; the other rows go on."""
    model = model_for("llama")
    drafter = make_drafter(model)
    rng = np.random.default_rng(59)
    long, short = rng.integers(3, VOCAB, size=500).tolist(), [7, 8, 9]
    kw = dict(beam_width=2, beam_length=4)
    response = batch_generate(model, no_eos(), [long, short], drafter, max_tokens=[-1, 20], **kw)
    alone, _ = engine_tokens(model, drafter, long, -1, guard=False, **kw)
    assert 500 + len(alone) + 3 > 512  # it ran to the end of the context
    stop = alone.index(1) if 1 in alone else None
    assert response.token_ids[0] == alone[:stop]
    assert response.finish_reasons[0] == ("length" if stop is None else "stop")
    assert response.token_ids[1] == reference("llama", (7, 8, 9), 20)


def test_an_mlx_lm_sampler_per_row_uses_the_match_rule():
    """A row with an mlx-lm sampler gets one sampler draw per tree node (the match rule): an
    argmax sampler (temp 0) must then give greedy decoding, beside a greedy row."""
    from mlx_lm.sample_utils import make_sampler

    model = model_for("gemma3_text")
    prompts = prompts_for(2, seed=61)
    oracle = oracle_for("gemma3_text", prompts, [18, 18], seed=2)
    response = batch_generate(
        model, no_eos(), prompts, oracle, max_tokens=18, beam_width=4, beam_length=4,
        sampling=[SamplingParams(sampler=make_sampler(temp=0.0)), None],
    )  # fmt: skip
    check_rows("gemma3_text", prompts, [18, 18], response)
    assert response.forwards < 14  # the oracle's drafts were matched and kept

    def always_42(logprobs: mx.array) -> mx.array:  # the sampler decides every token
        return mx.full(logprobs.shape[:-1], 42, mx.int32)

    response = batch_generate(
        model, no_eos(), prompts, oracle, max_tokens=9, beam_width=4, beam_length=4,
        sampling=[None, SamplingParams(sampler=always_42)],
    )  # fmt: skip
    assert response.token_ids[1] == [42] * 9
    assert response.token_ids[0] == reference("gemma3_text", tuple(prompts[0]), 9)
    with pytest.raises(ValueError, match="give either a sampler or temp"):
        both = SamplingParams(temp=0.5, sampler=make_sampler(temp=0.5))
        batch_generate(model, no_eos(), prompts, oracle, max_tokens=4, sampling=both)


class StepClock:
    """A fake clock the batch's guard reads; each step advances it by cost(option of the
    step), so the guard sees the seconds we choose."""

    def __init__(self, gen: BatchGenerator, cost):
        self.now = 0.0
        step = gen._step

        def timed():
            self.now += cost(gen.shape)
            return step()

        gen._step = timed

    def __call__(self) -> float:
        return self.now


def guarded_run(prompts, max_tokens, cost, **insert_kw):
    """Rows decoded by a guarded generator whose steps cost cost(option) fake seconds: the
    rows' tokens and the option of every step."""
    model = model_for("llama")
    clock_box = []
    gen = BatchGenerator(
        model, make_drafter(model, seed=3), beam_width=4, beam_length=3, guard=True,
        clock=lambda: clock_box[0](),
    )  # fmt: skip
    clock_box.append(StepClock(gen, cost))
    uids = gen.insert(prompts, max_tokens, **insert_kw)
    got, options = {u: [] for u in uids}, []
    while gen.busy:
        responses = gen.next()
        options.append(gen.shape)
        for r in responses:
            got[r.uid] += r.tokens
    return [got[u] for u in uids], options


@pytest.mark.parametrize("drafting_costs", [5.0, 0.01])
def test_the_batch_guard_decodes_plain_where_drafting_costs_more(drafting_costs):
    """A drafting step that costs far more than a plain one: after its warm-up the guard runs
    plain steps (probing the option now and then); a cheap one: it keeps drafting. Rows stay
    lossless either way."""
    prompts, max_tokens = prompts_for(3, seed=41), [60, 60, 60]
    got, options = guarded_run(prompts, max_tokens, lambda o: drafting_costs if o != PLAIN else 0.1)
    for prompt, m, tokens in zip(prompts, max_tokens, got, strict=True):
        assert_lossless("llama", prompt, reference("llama", tuple(prompt), m), tokens)
    late = options[12:]
    plain = sum(o == PLAIN for o in late) / len(late)
    assert options[0] != PLAIN and PLAIN in options  # both modes measured
    assert plain > 0.7 if drafting_costs > 1 else plain < 0.3


def test_the_batch_guard_leaves_a_seeded_sampled_row_to_the_table():
    """A sampled row with an explicit seed: every step runs the table's option (the guard's
    timing-dependent choice would change which tokens the seed gives)."""
    prompts = prompts_for(2, seed=43)
    hot = SamplingParams(temp=1.0)
    _, options = guarded_run(
        prompts, [30, 30], lambda o: 5.0 if o != PLAIN else 0.1,
        sampling=[hot, SamplingParams()], seeds=[3, None],
    )  # fmt: skip
    assert PLAIN not in options

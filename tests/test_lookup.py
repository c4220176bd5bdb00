"""Prompt lookup and hybrid trees (RNN beams + a copied branch of another length).

1. The incremental index proposes what a brute-force scan of the whole text proposes.
2. Trees of branches of different lengths pack like a brute-force prefix tree.
3. Greedy decoding with lookup (alone, with a random drafter, with an oracle) equals mlx-lm's
   greedy output on every architecture, on prompts built with repeats; the tests assert that
   lookup branches were proposed and accepted.
4. Exact sampling on trees holding copied branches: the walk's probes on padded trees, and the
   chi-square check of seeded engine runs against the autoregressive law.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_exact_sampling import (
    ALPHA,
    SMALL_VOCAB,
    TargetTable,
    autoregressive_first_two,
    autoregressive_law,
    check_against_autoregressive,
    children_of,
    generated_law,
    max_difference,
    sample_first_two,
    small_model,
)
from test_lossless import ARCHS, assert_lossless, model_for, reference

from mlx_redrafter import generate_step
from mlx_redrafter.accept import exact_accept_from_uniforms
from mlx_redrafter.benchmarks.tiny import VOCAB, OracleDrafter, engine_tokens, make_drafter
from mlx_redrafter.generate import candidate_branches
from mlx_redrafter.lookup import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, PromptLookup, has_repeat
from mlx_redrafter.sampling import SamplingParams
from mlx_redrafter.tree import PAD, pack_tree


# ---------------------------------------------------------------------------- 1. the index
def brute_force_proposal(tokens, max_draft, ngram_max, ngram_min):
    for n in range(ngram_max, ngram_min - 1, -1):
        if len(tokens) < n:
            continue
        suffix = tokens[-n:]
        for end in range(len(tokens) - 1, n - 1, -1):  # latest earlier occurrence first
            if tokens[end - n : end] == suffix:
                draft = []
                for j in range(max_draft):  # periodic past the end
                    pos = end + j
                    draft.append(
                        tokens[pos] if pos < len(tokens) else draft[j - (len(tokens) - end)]
                    )
                return draft
    return []


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 5), min_size=0, max_size=40),
    split=st.integers(0, 40),
    max_draft=st.integers(1, 8),
    sizes=st.tuples(st.integers(1, 4), st.integers(0, 2)),
)
def test_incremental_index_equals_a_scan_of_the_whole_text(tokens, split, max_draft, sizes):
    ngram_min, extra = sizes
    lookup = PromptLookup(tokens[:split], max_draft, ngram_min + extra, ngram_min)
    for t in tokens[split:]:  # grown token by token, as decoding grows it
        lookup.extend([t])
    expected = brute_force_proposal(tokens, max_draft, ngram_min + extra, ngram_min)
    assert lookup.propose() == expected


def test_lookup_prefers_the_longest_suffix_and_the_latest_occurrence():
    lookup = PromptLookup([1, 2, 3, 9, 5, 2, 3, 7, 4, 3], 2, ngram_max=2, ngram_min=1)
    assert lookup.propose() == [7, 4]  # "3" last followed by 7 (n=1: "2 3" never ends the text)
    lookup.extend([2, 3])
    assert lookup.propose() == [7, 4]  # "2 3": latest occurrence, followed by 7 4
    lookup = PromptLookup([8, 1, 2, 1, 2], 5, ngram_max=1, ngram_min=1)
    assert lookup.propose() == [1, 2, 1, 2, 1]  # a loop continues with its period


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(prompt_lookup=-1), "prompt_lookup"),
        (dict(prompt_lookup=4, lookup_ngram_min=0), "n-gram"),
        (dict(prompt_lookup=4, lookup_ngram_max=1, lookup_ngram_min=2), "maximum"),
        (dict(prompt_lookup=4, temp=1.0, accept="reference"), "reference"),
    ],
)
def test_bad_lookup_settings_are_named(kw, message):
    model = model_for("llama")
    with pytest.raises(ValueError, match=message):
        next(generate_step(mx.array([3, 4, 5]), model, make_drafter(model), **kw))


# ---------------------------------------------------------------------------- 2. packing
def brute_force_tree(branches):
    """Nodes are distinct prefixes (in order of first appearance, row-major)."""
    nodes: list[tuple[int, ...]] = []
    for row in branches.tolist():
        row = [t for t in row if t != PAD]
        for j in range(1, len(row) + 1):
            if tuple(row[:j]) not in nodes:
                nodes.append(tuple(row[:j]))
    return nodes


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_padded_branches_pack_into_their_prefix_tree(data):
    rows = data.draw(st.integers(1, 5))
    g0 = data.draw(st.integers(0, 3))
    branches = [
        [g0] + data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=6)) for _ in range(rows)
    ]
    padded = np.full((rows, max(map(len, branches))), PAD, np.int32)
    for i, row in enumerate(branches):
        padded[i, : len(row)] = row
    tree = pack_tree(padded)
    nodes = brute_force_tree(padded)
    assert [nodes[i][-1] for i in range(len(nodes))] == tree.tokens.tolist()
    assert tree.depths.tolist() == [len(n) - 1 for n in nodes]
    for p, node in enumerate(nodes):  # ancestors: exactly the node's proper prefixes and itself
        expected = [q for q, other in enumerate(nodes) if node[: len(other)] == other]
        assert np.flatnonzero(tree.mask[p]).tolist() == expected
    for b, row in enumerate(branches):  # each branch's path through the packed tokens
        assert tree.tokens[tree.path(b, len(row))].tolist() == row


def test_candidate_branches_put_the_copy_after_the_beams():
    beams = np.array([[7, 1, 2], [7, 1, 3]], np.int32)
    got = candidate_branches(7, beams, [1, 2, 5, 6])
    assert got.tolist() == [[7, 1, 2, PAD, PAD], [7, 1, 3, PAD, PAD], [7, 1, 2, 5, 6]]
    assert candidate_branches(7, beams, []).tolist() == beams.tolist()
    assert candidate_branches(7, None, []).tolist() == [[7]]
    tree = pack_tree(got)
    assert tree.size == 6  # the copy's first two tokens merged into the first beam's


def test_ragged_rows_are_refused():
    with pytest.raises(ValueError, match="padding"):
        pack_tree(np.array([[1, PAD, 3]], np.int32))


# ---------------------------------------------------------------------------- 3. lossless
def repeated_prompts(name: str, count: int = 2) -> list[list[int]]:
    """Prompts built with repeats (a phrase several times) on which copying pays: the first
    `count` candidates where the lookup, replayed along mlx-lm's greedy output, would have a
    first token right at least twice (a tiny model may or may not continue a pattern)."""
    chosen = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        phrase = rng.integers(3, VOCAB, size=int(rng.integers(3, 8))).tolist()
        other = rng.integers(3, VOCAB, size=4).tolist()
        prompt = other + phrase * int(rng.integers(2, 5)) + phrase[: int(rng.integers(0, 3))]
        text = prompt + reference(name, tuple(prompt))
        hits = sum(
            brute_force_proposal(text[:t], 1, DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN)[:1] == [text[t]]
            for t in range(len(prompt) + 1, len(text))
        )
        if hits >= 2:
            chosen.append(prompt)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"no prompt with repeats that the lookup could copy for {name}")


def run(model, drafter, prompt, max_tokens=40, **kw):
    return engine_tokens(model, drafter, prompt, max_tokens, guard=False, **kw)


@pytest.mark.parametrize("name", ARCHS)
def test_hybrid_trees_are_lossless(name):
    model = model_for(name)
    lookup_accepted = proposed = 0
    for i, prompt in enumerate(repeated_prompts(name)):
        expected = reference(name, tuple(prompt))
        drafters = {
            "lookup alone": (None, 1, 2),
            "random W4 L3": (make_drafter(model, seed=i), 4, 3),
            "oracle W2 L5": (OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=i), 2, 5),
            "random W1 L2": (make_drafter(model, seed=i + 7), 1, 2),
        }
        for label, (drafter, width, length) in drafters.items():
            for n in (3, 8):
                got, stats = run(
                    model, drafter, prompt, prompt_lookup=n, beam_width=width, beam_length=length
                )
                assert len(got) == 40, label
                assert_lossless(model, prompt, expected, got)
                lookup_accepted += sum(s.lookup_accepted for s in stats)
                proposed += sum(s.tree_size > (width * (length - 1) + 1) for s in stats[1:])
    assert proposed > 0 and lookup_accepted > 0, (proposed, lookup_accepted)


def test_lookup_with_logits_processors_and_max_tokens_is_lossless():
    model = model_for("llama")
    prompt = repeated_prompts("llama")[1]
    expected = reference("llama", tuple(prompt))
    identity = lambda history, logits: logits  # forces the host-synced path
    for max_tokens in (1, 5, 17):
        got, _ = run(
            model,
            make_drafter(model),
            prompt,
            max_tokens=max_tokens,
            prompt_lookup=6,
            beam_width=1,
            beam_length=3,
            logits_processors=[identity],
        )
        assert got == expected[:max_tokens]


# ---------------------------------------------------------------------------- 4. sampling
def random_branches(seed, context, target):
    """Like test_exact_sampling.random_beams, plus a copied branch of another length that often
    repeats a beam's prefix (merged siblings)."""
    rng = np.random.default_rng([seed, 13, *context])
    width, length = int(rng.integers(1, 4)), int(rng.integers(2, 4))
    rows = []
    for _ in range(width):
        row = [context[-1]]
        for _ in range(1, length):
            p = target(tuple(context) + tuple(row[1:]))
            row.append(
                int(rng.choice(target.vocab, p=p))
                if rng.random() < 0.6
                else int(rng.integers(target.vocab))
            )
        rows.append(row)
    copy = rows[0][: int(rng.integers(1, length + 1))] if rng.random() < 0.5 else [context[-1]]
    while len(copy) < length + 2:
        copy.append(int(rng.integers(target.vocab)))
    branches = np.full((width + 1, length + 2), PAD, np.int32)
    for i, row in enumerate(rows + [copy]):
        branches[i, : len(row)] = row
    return branches


@pytest.mark.parametrize("case", range(20))
def test_enumerated_walk_on_hybrid_trees_is_autoregressive_sampling(case):
    target = TargetTable(seed=500 + case)
    context = (int(case % SMALL_VOCAB),)

    def draft(ctx):
        return random_branches(case, ctx, target)

    for m in (1, 2, 3):
        law = generated_law(target, draft, context, m)
        assert max_difference(law, autoregressive_law(target, context, m)) < 1e-9, m


@pytest.mark.parametrize("case", range(15))
def test_injected_uniforms_walk_padded_trees(case):
    """The implementation's walk on a tree with a longer copied branch ends where the injected
    uniforms say, with the count the rule prescribes."""
    target = TargetTable(seed=700 + case)
    context = (int(case % SMALL_VOCAB),)
    branches = random_branches(case, context, target)
    tree = pack_tree(branches)
    length = branches.shape[1]
    owners = [(int(i) // length, int(i) % length) for i in tree.flat_indices]
    rows = np.stack([target(context + tuple(branches[b, 1 : d + 1].tolist())) for b, d in owners])
    with np.errstate(divide="ignore"):
        log_p = mx.array(np.log(rows).astype(np.float32))
    children = children_of(branches)
    # always accept the first child: the walk follows first children to a leaf
    path: tuple[int, ...] = ()
    while children.get(path):
        path = path + (children[path][0],)
    accept_first = []
    for node in range(tree.size):
        b, d = owners[node]
        p = target(context + tuple(branches[b, 1 : d + 1].tolist()))
        kids = children.get(tuple(branches[b, 1 : d + 1].tolist()), [])
        accept_first.append(p[kids[0]] / 2 if kids else 0.5)
    feasible = all(target(context + path[:d])[path[d]] > 1e-4 for d in range(len(path)))
    best, accepted, _ = exact_accept_from_uniforms(
        tree, log_p, mx.array(np.array(accept_first, np.float32)), mx.random.key(case)
    ).to_host()
    if feasible:
        assert accepted == len(path)
        assert tuple(branches[best, 1 : accepted + 1].tolist()) == path


def test_exact_rule_with_lookup_matches_autoregressive_sampling():
    """Seeded engine runs where the prompt makes the lookup copy a branch after the forced
    token: the law of the next two tokens is the autoregressive one, and copied tokens were
    really accepted."""
    model = small_model()
    params = SamplingParams(temp=1.0)
    prompt = [6, 3, 9, 2, 11, 4]  # after the forced 6, the lookup proposes 3 9 2 11 ...
    log: list[int] = []
    counts, mean_accepted = sample_first_two(
        model,
        make_drafter(model),
        params,
        "exact",
        80_000,
        runs=1500,
        prompt=prompt,
        prompt_lookup=4,
        lookup_ngram_min=1,  # the copy follows a 1-gram match of the forced token
        lookup_accepted=log,
    )
    first, joint, tv = check_against_autoregressive(
        counts, autoregressive_first_two(model, params, prompt=prompt)
    )
    assert first >= ALPHA and joint >= ALPHA, (first, joint, tv)
    assert sum(1 for n in log if n > 0) > 20, sum(log)


def test_has_repeat_finds_a_verbatim_run_of_exactly_n_tokens():
    assert has_repeat([1, 2, 3, 4, 1, 2, 3], 3)
    assert not has_repeat([1, 2, 3, 4, 1, 2, 3], 4)
    assert not has_repeat([5] * 16)  # one window of the default 16 tokens
    assert has_repeat([5] * 17)  # two overlapping windows, the same run

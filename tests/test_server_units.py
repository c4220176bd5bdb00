"""The server's pieces on their own: the prompt-cache LRU, the tool-call splitter, option
parsing. (The server end to end: test_server.py.)"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import pytest

from mlx_redrafter.benchmarks.tiny import make_model
from mlx_redrafter.cache import cache_nbytes, make_tree_cache
from mlx_redrafter.generate import prefill
from mlx_redrafter.server.cli import size_arg
from mlx_redrafter.server.prompt_lru import PromptCacheLRU
from mlx_redrafter.server.tool_calls import ToolCallSplitter
from mlx_redrafter.verify import prepare_model


@pytest.fixture(scope="module")
def model():
    model = make_model("llama")
    prepare_model(model)  # what the server's load does before it builds caches
    return model


def filled(model, tokens):
    cache = make_tree_cache(model)
    prefill(model, cache, mx.array(tokens), 2048)
    return cache


def lru(model, entries=10, nbytes=10**9):
    return PromptCacheLRU(lambda: make_tree_cache(model), entries, nbytes)


def test_a_prompt_extending_an_entry_takes_it_over(model):
    pool = lru(model)
    pool.insert([5, 6, 7, 8], filled(model, [5, 6, 7, 8]))
    cache, reused = pool.fetch([5, 6, 7, 8, 9, 10])
    assert reused == 4 and cache[0].offset == 4 and pool.entries == 0 and pool.nbytes == 0


def test_a_partial_match_copies_and_keeps_the_entry(model):
    pool = lru(model)
    original = filled(model, [5, 6, 7, 8])
    pool.insert([5, 6, 7, 8], original)
    cache, reused = pool.fetch([5, 6, 30])
    assert reused == 2 and cache[0].offset == 2 and pool.entries == 1
    assert original[0].offset == 4
    # the copy's keys are the original's first two positions
    assert mx.array_equal(cache[0].keys[..., :2, :], original[0].keys[..., :2, :])
    # and extending the copy leaves the original untouched
    before = mx.array(original[0].keys[..., :4, :])
    prefill(model, cache, mx.array([30, 31]), 2048)
    assert mx.array_equal(original[0].keys[..., :4, :], before)


def test_one_prompt_token_is_always_left_to_prefill(model):
    pool = lru(model)
    pool.insert([5, 6, 7], filled(model, [5, 6, 7]))
    cache, reused = pool.fetch([5, 6, 7])
    assert reused == 2 and cache[0].offset == 2
    fresh, none = pool.fetch([40, 41])
    assert none == 0 and fresh[0].offset == 0


def test_bounds_evict_the_least_recently_used(model):
    one = filled(model, [5, 6])
    size = cache_nbytes(one)
    pool = lru(model, entries=2, nbytes=10 * size)
    for start in (10, 20, 30):
        pool.insert([start, start + 1], filled(model, [start, start + 1]))
    assert pool.entries == 2 and pool.nbytes == 2 * size
    assert pool.fetch([10, 11, 12])[1] == 0  # the oldest went first
    by_bytes = lru(model, entries=10, nbytes=size)
    by_bytes.insert([1, 3], filled(model, [1, 3]))
    by_bytes.insert([4, 3], filled(model, [4, 3]))
    assert by_bytes.entries == 1 and by_bytes.nbytes <= size
    too_big = lru(model, entries=10, nbytes=size - 1)
    too_big.insert([1, 3], filled(model, [1, 3]))
    assert too_big.entries == 0


def test_an_entry_extended_by_a_new_one_is_dropped(model):
    pool = lru(model)
    pool.insert([5, 6], filled(model, [5, 6]))
    pool.insert([5, 6, 7, 8], filled(model, [5, 6, 7, 8]))
    assert pool.entries == 1
    assert pool.fetch([5, 6, 7, 8, 9])[1] == 4


def json_tools_parser(text, tools):
    return json.loads(text.strip())


def splitter():
    return ToolCallSplitter("<tool_call>", "</tool_call>", json_tools_parser, None)


def test_the_splitter_streams_content_and_holds_calls_back():
    split = splitter()
    pieces = [split.feed(t) for t in ("Sure, ", "<tool", "_call>", '{"name": "f", ')]
    pieces.append(split.feed('"arguments": {"x": 1}}</tool_call> done'))
    assert pieces == ["Sure, ", "", "", "", ""]
    content, calls = split.finish()
    assert content == " done"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"x": 1})
    ]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_a_call_the_parser_rejects_stays_content():
    split = splitter()
    assert split.feed("a <tool_call>{broken") == "a "
    content, calls = split.finish()
    assert calls == [] and content == "<tool_call>{broken"


def test_sizes_parse_as_mlx_lm_reads_them():
    assert [size_arg(s) for s in ("1000", "2KB", "500MB", "1.5G", "3gb")] == [
        1000,
        2000,
        500 * 10**6,
        1_500_000_000,
        3 * 10**9,
    ]
    for bad in ("", "ten", "-5MB", "5TB"):
        with pytest.raises(argparse.ArgumentTypeError):
            size_arg(bad)


def test_an_auto_shape_batches_with_the_tuned_table_and_the_confirmed_single_choice(monkeypatch):
    """'auto' on a batching server: the batched tuner's option per batch size, except at one
    row, where the single-sequence choice (confirmed online) stands; the tuner simulates the
    lookup with the server's n-gram sizes."""
    import mlx_redrafter.batch as batch
    from mlx_redrafter.server import cli

    asked = {}

    def fake_table(model, drafter, tokenizer, requested, limit, tune):
        asked.update(requested=requested, limit=limit, ngrams=tune["lookup_ngrams"])
        return {1: (2, 3, 0), 4: (0, 0, 4), 8: (0, 0, 0)}

    monkeypatch.setattr(batch, "tuned_shape_table", fake_table)
    chosen = {"beam_width": 1, "beam_length": 4, "prompt_lookup": 8}
    chosen |= {"lookup_ngram_max": 5, "lookup_ngram_min": 3}
    table = cli.batch_shape_table(None, object(), None, ("auto", 4, "auto"), 8, chosen)
    assert table == {1: (0, 4, 8), 4: (0, 0, 4), 8: (0, 0, 0)}  # no drafter: W = 0
    assert asked == {"requested": ("auto", 4, "auto"), "limit": 8, "ngrams": (5, 3)}
    table = cli.batch_shape_table(None, object(), object(), ("auto", 4, "auto"), 8, chosen)
    assert table[1] == (1, 4, 8)

"""Tree verification equals causal forwards of each beam, on every supported architecture."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter.benchmarks.tiny import CONFIGS, VOCAB, make_model
from mlx_redrafter.cache import commit, make_tree_cache
from mlx_redrafter.tree import pack_tree
from mlx_redrafter.verify import TreeRoPE, lm_head, prepare_model, prepared_context, verify_tree

ARCHS = list(CONFIGS) + ["llama_q4"]


def beams_with_shared_prefixes(rng, width, length, g0):
    beams = rng.integers(3, 6, size=(width, length))  # small alphabet: prefixes collide
    beams[:, 0] = g0
    return beams


@pytest.mark.parametrize("name", ARCHS)
def test_head_and_hidden_reproduce_model_logits(name):
    model = make_model(name)
    tokens = mx.array([[5, 9, 13, 2, 7]])
    expected = model(tokens)
    got = lm_head(model)(model.model(tokens))
    assert mx.allclose(expected, got, atol=1e-5).item()


@pytest.mark.parametrize("name", ARCHS)
def test_tree_logits_equal_each_beams_causal_logits(name):
    model = make_model(name)
    prepare_model(model)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, VOCAB, size=9).tolist()  # longer than gemma's window of 6
    for width, length in [(1, 2), (3, 4), (6, 5)]:
        beams = beams_with_shared_prefixes(rng, width, length, g0=4)
        tree = pack_tree(beams)
        cache = make_tree_cache(model)
        model.model(mx.array(prefix)[None], cache=cache)
        hidden, logits = verify_tree(model, cache, tree, mx.array(tree.tokens))
        assert cache[0].offset == len(prefix) + tree.size
        for b in range(width):
            ref = model(mx.array(prefix + beams[b].tolist())[None])[0, len(prefix) :]
            got = logits[mx.array(tree.unpacker[b])]
            assert mx.allclose(got, ref, atol=1e-4, rtol=1e-4).item(), (name, width, length, b)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "mistral"])
def test_commit_keeps_exactly_the_accepted_path(name):
    model = make_model(name)
    prepare_model(model)
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, VOCAB, size=8).tolist()
    beams = np.array([[4, 3, 3, 5], [4, 3, 5, 5], [4, 5, 3, 3]])
    tree = pack_tree(beams)
    for beam, keep in [(0, 4), (1, 3), (2, 4), (2, 1)]:
        cache = make_tree_cache(model)
        model.model(mx.array(prefix)[None], cache=cache)
        verify_tree(model, cache, tree, mx.array(tree.tokens))
        commit(cache, len(prefix), tree.path(beam, keep))
        ref_cache = make_tree_cache(model)
        model.model(mx.array(prefix + beams[beam, :keep].tolist())[None], cache=ref_cache)
        for ours, ref in zip(cache, ref_cache, strict=True):
            assert ours.offset == ref.offset == len(prefix) + keep
            n = ours.offset
            assert mx.allclose(ours.keys[..., :n, :], ref.keys[..., :n, :], atol=1e-5).item()
            assert mx.allclose(ours.values[..., :n, :], ref.values[..., :n, :], atol=1e-5).item()
        # and the next forward after the commit matches the causal one
        nxt = mx.array([[7]])
        assert mx.allclose(model(nxt, cache=cache), model(nxt, cache=ref_cache), atol=1e-4).item()


def test_prepare_model_wraps_rope_once_and_keeps_parameters():
    model = make_model("llama")
    before = sorted(k for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    ctx1 = prepare_model(model)
    ctx2 = prepare_model(model)
    assert ctx1 is ctx2
    assert all(isinstance(layer.self_attn.rope, TreeRoPE) for layer in model.layers)
    assert not isinstance(model.layers[0].self_attn.rope.rope, TreeRoPE)
    after = sorted(k for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    assert before == after


def test_only_a_prepared_model_gets_tree_caches():
    """Preparing is one explicit step: making a cache never wraps RoPE on the side."""
    model = make_model("llama")
    with pytest.raises(ValueError, match="not prepared for tree verification"):
        make_tree_cache(model)
    assert not isinstance(model.layers[0].self_attn.rope, TreeRoPE)
    context = prepare_model(model)
    assert prepared_context(model) is context
    assert all(c.tree_context is context for c in make_tree_cache(model))


def test_the_public_doors_prepare_a_caller_built_model():
    from mlx_redrafter import generate_step, make_prompt_cache

    built = make_model("llama")
    make_prompt_cache(built)
    assert isinstance(built.layers[0].self_attn.rope, TreeRoPE)
    other = make_model("llama")
    next(generate_step(mx.array([5, 9]), other, None, max_tokens=1))
    assert isinstance(other.layers[0].self_attn.rope, TreeRoPE)


def test_unsupported_architecture_is_named():
    from mlx_lm.utils import _get_classes

    config = dict(CONFIGS["llama"], model_type="starcoder2", norm_epsilon=1e-5)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    with pytest.raises(ValueError, match="starcoder2"):
        prepare_model(model)

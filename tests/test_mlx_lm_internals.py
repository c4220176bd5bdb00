"""The mlx-lm internals the engine relies on. If one of these fails after an mlx-lm upgrade,
the verification seams in mlx_redrafter/verify.py must be revisited before widening the pin."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import mlx.core as mx
import mlx_lm
from mlx_lm.models import base, cache

from mlx_redrafter.benchmarks.tiny import CONFIGS, make_model


def test_pinned_minor_version():
    major, minor = (int(x) for x in version("mlx-lm").split(".")[:2])
    assert (major, minor) == (0, 32), "mlx-lm minor changed: re-check verify.py's seams"
    assert mlx_lm.__version__.startswith("0.32")


def test_kv_cache_contract():
    c = cache.KVCache()
    assert c.offset == 0
    k = mx.zeros((1, 2, 3, 4))
    keys, values = c.update_and_fetch(k, k)
    assert c.offset == 3 and keys.shape == (1, 2, 3, 4)
    params = inspect.signature(cache.KVCache.make_mask).parameters
    assert "args" in params or "N" in params
    # a cache subclass supplies masks: create_attention_mask defers to cache.make_mask
    src = inspect.getsource(base.create_attention_mask)
    assert "make_mask" in src


def test_attention_calls_rope_with_cache_offset_and_masks_through_the_cache():
    for name in CONFIGS:
        model = make_model(name)
        attn = model.layers[0].self_attn
        assert "rope" in attn, name
        src = inspect.getsource(type(attn).__call__)
        assert "self.rope(queries, offset=cache.offset)" in src, name
        assert src.index("self.rope(keys") < src.index("update_and_fetch"), name
        inner = inspect.getsource(type(model.model).__call__)
        assert "create_attention_mask" in inner, name


def test_fast_rope_accepts_one_offset_per_batch_row():
    x = mx.random.normal((3, 2, 1, 8))
    offsets = mx.array([0, 5, 9])
    together = mx.fast.rope(x, 8, traditional=False, base=1e4, scale=1.0, offset=offsets)
    for i in range(3):
        alone = mx.fast.rope(
            x[i : i + 1], 8, traditional=False, base=1e4, scale=1.0, offset=i * 0 + int(offsets[i])
        )
        assert mx.allclose(together[i : i + 1], alone, atol=1e-6).item()


def test_window_mask_semantics_of_full_caches():
    # gemma3's sliding layers: a full KVCache with window_size gives a windowed causal mask
    c = cache.KVCache()
    c.update_and_fetch(mx.zeros((1, 1, 10, 4)), mx.zeros((1, 1, 10, 4)))
    mask = c.make_mask(2, return_array=True, window_size=4)
    assert mask.shape == (2, 12)
    assert mask[1].tolist() == [False] * 8 + [True] * 4

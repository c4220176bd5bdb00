"""train --states-cache: states read back equal states computed, and only new or changed
(model, top-k, tokens) are computed again."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_redrafter.benchmarks.tiny import make_model
from mlx_redrafter.train import states_cache
from mlx_redrafter.train.llm_states import llm_states


def sequences(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, size=int(rng.integers(5, 40))).tolist() for _ in range(n)]


def counting(monkeypatch):
    """Count the sequences that really go through the LLM."""
    seen = []

    def spy(model, seqs, top_k=0, **kw):
        seen.extend(len(s) for s in seqs)
        return llm_states(model, seqs, top_k, **kw)

    monkeypatch.setattr(states_cache, "llm_states", spy)
    return seen


def assert_states_close(a, b, top_k):
    """Equal up to float16 rounding of float32 results that differ in their last bits.

    A top-k id may differ only where its logit ties (within that tolerance) with a neighbour's
    or sits last, where it may tie with the unseen (k+1)-th.
    """
    tol = dict(rtol=2e-3, atol=2e-3)  # two float16 steps at the magnitudes here
    np.testing.assert_allclose(a.hidden.astype(np.float32), b.hidden.astype(np.float32), **tol)
    if not top_k:
        return
    la, lb = a.top_logits.astype(np.float32), b.top_logits.astype(np.float32)
    np.testing.assert_allclose(la, lb, **tol)
    tied = np.abs(np.diff(la, axis=-1)) <= tol["atol"] + tol["rtol"] * np.abs(la[..., 1:])
    near = np.zeros(la.shape, dtype=bool)
    near[..., :-1] |= tied
    near[..., 1:] |= tied
    near[..., -1] = True
    differ = a.top_ids != b.top_ids
    assert not (differ & ~near).any(), "top-k ids differ where the logits are not tied"


@pytest.mark.parametrize("top_k", [0, 3])
def test_second_run_reads_everything_back(tmp_path, monkeypatch, top_k):
    model = make_model("llama")
    seqs = sequences(70)  # more than one write chunk
    plain = llm_states(model, seqs, top_k, progress=False)
    seen = counting(monkeypatch)
    first = states_cache.cached_llm_states(model, seqs, tmp_path, top_k, progress=False)
    assert len(seen) == 70
    seen.clear()
    second = states_cache.cached_llm_states(model, seqs, tmp_path, top_k, progress=False)
    assert seen == []
    for a, b, c in zip(plain, first, second, strict=True):
        # what was written is what is read back, bit for bit
        assert np.array_equal(b.hidden, c.hidden)
        if top_k:
            assert np.array_equal(b.top_ids, c.top_ids)
            assert np.array_equal(b.top_logits, c.top_logits)
        else:
            assert b.top_ids is None and c.top_ids is None
        # the cache computes in chunks, `plain` in one call: other matrix shapes, so BLAS may
        # sum in another order (OpenBLAS picks kernels by CPU and cache size)
        assert_states_close(a, c, top_k)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz"] * 70  # no temporaries


def test_new_data_other_top_k_other_weights_and_broken_files_are_computed(tmp_path, monkeypatch):
    model = make_model("llama")
    seqs = sequences(10)
    states_cache.cached_llm_states(model, seqs, tmp_path, 0, progress=False)
    seen = counting(monkeypatch)
    grown = seqs + sequences(3, seed=1)
    states_cache.cached_llm_states(model, grown, tmp_path, 0, progress=False)
    assert sorted(seen) == sorted(len(s) for s in grown[10:])

    seen.clear()
    states_cache.cached_llm_states(model, seqs, tmp_path, 2, progress=False)
    assert len(seen) == 10  # a teacher was not stored before

    seen.clear()
    other = make_model("llama", seed=1)
    assert states_cache.model_fingerprint(other) != states_cache.model_fingerprint(model)
    got = states_cache.cached_llm_states(other, seqs[:2], tmp_path, 0, progress=False)
    assert len(seen) == 2
    ref = llm_states(other, seqs[:2], 0, progress=False)
    assert np.array_equal(got[0].hidden, ref[0].hidden)

    seen.clear()
    key = states_cache.sequence_key(states_cache.model_fingerprint(model), seqs[4], 0)
    path = tmp_path / f"{key}.npz"
    path.write_bytes(path.read_bytes()[:50])  # truncated
    states_cache.cached_llm_states(model, seqs, tmp_path, 0, progress=False)
    assert seen == [len(seqs[4])]

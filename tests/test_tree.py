"""Tree packing (dynamic tree attention): golden vectors of docs/DESIGN.md section 2 and properties.

The properties are checked against independent brute-force computations over Python tuples of
prefixes, not against the vectorised code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_redrafter.tree import pack_tree, prefix_tree, verification_mask

# ---------------------------------------------------------- golden vectors (docs/DESIGN.md 2)
GOLDEN_1 = dict(
    beams=[[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]],
    prefix_tree=[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]],
    tokens=[91, 92, 93, 95, 94, 96, 97],
    flat_indices=[0, 1, 2, 3, 6, 7, 11],
    depths=[0, 1, 2, 3, 2, 3, 3],
    unpacker=[[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 2, 6]],
)
GOLDEN_2 = dict(
    beams=[[93, 94, 95, 92], [93, 95, 96, 93], [93, 94, 97, 96]],
    tokens=[93, 94, 95, 92, 95, 96, 93, 97, 96],
    unpacker=[[0, 1, 2, 3], [0, 4, 5, 6], [0, 1, 7, 8]],
)


def test_golden_first_sequence():
    beams = np.array(GOLDEN_1["beams"])
    np.testing.assert_array_equal(prefix_tree(beams), GOLDEN_1["prefix_tree"])
    tree = pack_tree(beams)
    np.testing.assert_array_equal(tree.tokens, GOLDEN_1["tokens"])
    np.testing.assert_array_equal(tree.flat_indices, GOLDEN_1["flat_indices"])
    np.testing.assert_array_equal(tree.depths, GOLDEN_1["depths"])
    np.testing.assert_array_equal(tree.unpacker, GOLDEN_1["unpacker"])
    assert tree.size == 7
    # Mask written out by hand: packed 0..6 = 91, 92, 93(b0), 95, 94(b1), 96, 97(b2).
    expected_mask = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 0],
            [1, 1, 1, 0, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(tree.mask, expected_mask)


def test_golden_second_sequence():
    beams = np.array(GOLDEN_2["beams"])
    tree = pack_tree(beams)
    np.testing.assert_array_equal(tree.tokens, GOLDEN_2["tokens"])
    np.testing.assert_array_equal(tree.unpacker, GOLDEN_2["unpacker"])
    np.testing.assert_array_equal(tree.flat_indices, [0, 1, 2, 3, 5, 6, 7, 10, 11])
    np.testing.assert_array_equal(tree.depths, [0, 1, 2, 3, 1, 2, 3, 2, 3])
    np.testing.assert_array_equal(prefix_tree(beams), [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 2, 2]])
    np.testing.assert_array_equal(tree.tokens[tree.unpacker], beams)


def test_path_on_golden():
    tree = pack_tree(np.array(GOLDEN_1["beams"]))
    np.testing.assert_array_equal(tree.path(1, 3), [0, 1, 4])
    np.testing.assert_array_equal(tree.path(2, 4), [0, 1, 2, 6])
    assert tree.path(0, 0).shape == (0,)


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        pack_tree(np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        pack_tree(np.zeros((3, 0), dtype=np.int64))


def test_identical_beams_pack_to_one_beam():
    beams = np.array([[5, 6, 7]] * 4)
    tree = pack_tree(beams)
    np.testing.assert_array_equal(tree.tokens, [5, 6, 7])
    np.testing.assert_array_equal(tree.unpacker, [[0, 1, 2]] * 4)


def test_all_distinct_after_root_packs_to_one_plus_w_times_l_minus_one():
    beams = np.array([[1, 10, 11], [1, 20, 21], [1, 30, 31]])
    tree = pack_tree(beams)
    assert tree.size == 1 + 3 * 2
    np.testing.assert_array_equal(tree.tokens, [1, 10, 11, 20, 21, 30, 31])


# ------------------------------------------------------------------ independent brute force
def brute_force(beams: np.ndarray):
    """Distinct prefixes, their packed order (by first flat index), mask, from tuples only."""
    width, length = beams.shape
    first_flat: dict[tuple[int, ...], int] = {}
    for b in range(width):
        for j in range(length):
            prefix = tuple(int(t) for t in beams[b, : j + 1])
            first_flat.setdefault(prefix, b * length + j)
    # Row-major order of first occurrence == the packed order.
    prefixes = sorted(first_flat, key=first_flat.__getitem__)
    flat = [first_flat[p] for p in prefixes]
    n = len(prefixes)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(prefixes):
        for k, q in enumerate(prefixes):
            mask[i, k] = len(q) <= len(p) and p[: len(q)] == q
    return prefixes, np.array(flat), mask


@st.composite
def beam_arrays(draw, shared_root: bool):
    width = draw(st.integers(1, 8))
    length = draw(st.integers(1, 6))
    tokens = st.integers(0, 3)
    rows = draw(
        st.lists(st.lists(tokens, min_size=length, max_size=length), min_size=width, max_size=width)
    )
    beams = np.array(rows, dtype=np.int64).reshape(width, length)
    if shared_root:
        beams[:, 0] = draw(tokens)
    return beams


def check_tree_properties(beams: np.ndarray) -> None:
    width, length = beams.shape
    tree = pack_tree(beams)
    prefixes, flat, mask = brute_force(beams)
    n = len(prefixes)

    # sizes and dtypes
    assert tree.size == n
    assert tree.tokens.shape == (n,) and tree.depths.shape == (n,)
    assert tree.unpacker.shape == (width, length)
    assert tree.mask.shape == (n, n) and tree.mask.dtype == bool
    assert n <= width * length
    if np.all(beams[:, 0] == beams[0, 0]):
        assert n <= 1 + width * (length - 1)

    # packed tokens, order, flat indices, depths
    np.testing.assert_array_equal(tree.flat_indices, flat)
    np.testing.assert_array_equal(tree.tokens, [p[-1] for p in prefixes])
    np.testing.assert_array_equal(tree.depths, [len(p) - 1 for p in prefixes])
    np.testing.assert_array_equal(tree.depths, tree.flat_indices % length)
    np.testing.assert_array_equal(beams.reshape(-1)[tree.flat_indices], tree.tokens)

    # unpacker: tokens round-trip, and each beam token maps to the packed node of its prefix
    np.testing.assert_array_equal(tree.tokens[tree.unpacker], beams)
    for b in range(width):
        for j in range(length):
            assert prefixes[tree.unpacker[b, j]] == tuple(int(t) for t in beams[b, : j + 1])

    # prefix_tree: smallest beam holding the same prefix
    owner = prefix_tree(beams)
    for b in range(width):
        for j in range(length):
            same = [c for c in range(width) if np.array_equal(beams[c, : j + 1], beams[b, : j + 1])]
            assert owner[b, j] == min(same)

    # mask: ancestors-or-self exactly; ancestors precede descendants
    np.testing.assert_array_equal(tree.mask, mask)
    assert not np.any(np.triu(tree.mask, k=1))
    assert np.all(np.diag(tree.mask))

    # paths are strictly increasing, start at the root, and have the beam's tokens
    for b in range(width):
        for m in range(1, length + 1):
            path = tree.path(b, m)
            assert path.shape == (m,)
            assert np.all(np.diff(path) > 0)
            np.testing.assert_array_equal(tree.tokens[path], beams[b, :m])
            # the path is exactly the ancestors-or-self of its last node
            np.testing.assert_array_equal(np.flatnonzero(tree.mask[path[-1]]), path)


@settings(max_examples=300, deadline=None)
@given(beam_arrays(shared_root=True))
def test_tree_properties_shared_root(beams):
    check_tree_properties(beams)


@settings(max_examples=300, deadline=None)
@given(beam_arrays(shared_root=False))
def test_tree_properties_any_beams(beams):
    check_tree_properties(beams)


# ------------------------------------------------------------------ verification mask
def brute_verification_mask(tree_mask, depths, cache_len, window):
    n = len(depths)
    out = np.zeros((n, cache_len + n), dtype=bool)
    for p in range(n):
        qpos = cache_len + int(depths[p])
        for k in range(cache_len + n):
            if k < cache_len:
                kpos, allowed = k, True
            else:
                q = k - cache_len
                kpos, allowed = cache_len + int(depths[q]), bool(tree_mask[p, q])
            if window is not None and not qpos - kpos < window:
                allowed = False
            out[p, k] = allowed
    return out


def test_verification_mask_no_window_golden():
    tree = pack_tree(np.array(GOLDEN_1["beams"]))
    m = verification_mask(tree.mask, tree.depths, cache_len=5)
    assert m.shape == (7, 12) and m.dtype == bool
    assert m[:, :5].all()
    np.testing.assert_array_equal(m[:, 5:], tree.mask)


def test_verification_mask_window_golden():
    # depths [0,1,2,3,2,3,3], cache 5, window 3: query at depth d (position 5+d) sees keys at
    # positions > 5 + d - 3, i.e. cache positions 3.. for d=0, 4.. for d=1, none for d>=2.
    tree = pack_tree(np.array(GOLDEN_1["beams"]))
    m = verification_mask(tree.mask, tree.depths, cache_len=5, window=3)
    np.testing.assert_array_equal(m[0, :5], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(m[1, :5], [0, 0, 0, 0, 1])
    assert not m[2:, :5].any()
    # packed 3 (depth 3, beam 0) sees its ancestors at depths 1, 2 and itself, not the root.
    np.testing.assert_array_equal(m[3, 5:], [0, 1, 1, 1, 0, 0, 0])


def test_verification_mask_does_not_modify_input():
    tree = pack_tree(np.array(GOLDEN_1["beams"]))
    before = tree.mask.copy()
    verification_mask(tree.mask, tree.depths, cache_len=2, window=1)
    np.testing.assert_array_equal(tree.mask, before)


@settings(max_examples=200, deadline=None)
@given(
    beam_arrays(shared_root=True),
    st.integers(0, 10),
    st.one_of(st.none(), st.integers(1, 12)),
)
def test_verification_mask_matches_brute_force(beams, cache_len, window):
    tree = pack_tree(beams)
    got = verification_mask(tree.mask, tree.depths, cache_len, window)
    n = tree.size
    assert got.shape == (n, cache_len + n)
    assert got.dtype == bool
    if window is None:
        assert got[:, :cache_len].all()
        np.testing.assert_array_equal(got[:, cache_len:], tree.mask)
    np.testing.assert_array_equal(
        got, brute_verification_mask(tree.mask, tree.depths, cache_len, window)
    )

"""Dynamic tree attention: pack W beams into their distinct prefixes.

Beams from one beam search share prefixes (all share the first token g0). Verifying W*L tokens
would recompute the shared ones, so the beams are packed into the tokens of the prefix tree and
the LLM attends each packed token to its ancestors only. Everything here is a pure NumPy function
over small integer arrays (W*L <= a few hundred): it runs on the host after the beams' one sync
per step, in microseconds, with no Python loop over beams or tokens.

Branches may have different lengths (RNN beams of L tokens beside a prompt-lookup draft of up
to N + 1): they are stored as one (W, L) array padded on the right with `PAD` (-1, never a
token id), and a padded position belongs to no node. Identical prefixes from different sources
merge like those of two beams, so siblings in the packed tree are always distinct tokens.

Vocabulary, for beams of shape (W, L):
- prefix tree: for each beam token, the first beam holding the same prefix up to that token;
- packed tokens: the tokens whose prefix first appears in their own beam, in row-major order;
- unpacker: for each beam token, its index in the packed sequence (`packed[unpacker] == beams`);
- depth: position in the beam (RoPE position is cache length + depth).
Ancestors always precede descendants in the packed order, so an accepted path's packed indices
are increasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1  # right padding of branches shorter than the longest


@dataclass(frozen=True)
class PackedTree:
    tokens: np.ndarray  # (N,) packed token ids
    flat_indices: np.ndarray  # (N,) index of each packed token in beams.reshape(-1)
    depths: np.ndarray  # (N,) depth of each packed token (0 for g0)
    unpacker: np.ndarray  # (W, L) packed index of each beam token (0 at padded positions)
    mask: np.ndarray  # (N, N) bool: row attends column (ancestor-or-self)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def path(self, beam: int, length: int) -> np.ndarray:
        """Packed indices of the first `length` tokens of `beam`."""
        return self.unpacker[beam, :length]


def prefix_tree(beams: np.ndarray) -> np.ndarray:
    """For each token (b, j): the smallest b' with beams[b', :j+1] == beams[b, :j+1]."""
    beams = np.asarray(beams)
    same_prefix = np.cumprod(beams[:, None, :] == beams[None, :, :], axis=2).astype(bool)
    return np.argmax(same_prefix, axis=1)  # first True over b' (b' == b is always True)


def pack_tree(beams: np.ndarray) -> PackedTree:
    """Pack beams (W, L) into the prefix tree's tokens, with unpacker and attention mask.

    Rows may end early with `PAD` on the right (branches of different lengths); every row
    holds at least its first token, and all rows share it (g0).
    """
    beams = np.asarray(beams)
    if beams.ndim != 2 or beams.shape[1] < 1:
        raise ValueError(f"beams must have shape (W, L), got {beams.shape}")
    width, length = beams.shape
    valid = beams != PAD
    if not valid[:, 0].all() or (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("each branch needs a first token and padding only on its right")
    # a padded position never equals a token, so it never joins a real token's prefix
    owner = prefix_tree(beams)
    is_new = (owner == np.arange(width)[:, None]) & valid
    flat_is_new = is_new.reshape(-1)
    flat_indices = np.flatnonzero(flat_is_new)
    packed_index_of_flat = np.cumsum(flat_is_new) - 1
    columns = np.broadcast_to(np.arange(length), (width, length))
    unpacker = np.where(valid, packed_index_of_flat[owner * length + columns], 0)
    depths = flat_indices % length
    return PackedTree(
        tokens=beams.reshape(-1)[flat_indices],
        flat_indices=flat_indices,
        depths=depths,
        unpacker=unpacker,
        mask=ancestor_mask(unpacker, flat_indices // length, depths),
    )


def ancestor_mask(unpacker: np.ndarray, beam_of: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """mask[p, q]: packed token q is p itself or an ancestor of p.

    The ancestors of p (in beam b at depth d) are unpacker[b, :d]: q qualifies exactly when it
    sits at a depth <= d and is what beam b holds at q's depth.
    """
    n = depths.shape[0]
    at_depth_of_q = unpacker[beam_of][:, depths]  # (N, N): p's beam token at q's depth
    return (depths[None, :] <= depths[:, None]) & (at_depth_of_q == np.arange(n)[None, :])


def tree_parents(tree: PackedTree) -> np.ndarray:
    """(N,) int32 packed index of each packed token's parent, -1 for the root g0.

    The compact form of `tree.mask` that the attention kernel takes (`kernels.seam.TreeMask`);
    acceptance also walks it. Callers that gather with it clamp the root's -1 themselves.
    """
    length = tree.unpacker.shape[1]
    beam_of = tree.flat_indices // length
    # a non-root token's parent is what its own beam holds one position earlier
    above = np.maximum(tree.depths - 1, 0)
    parents = np.where(tree.depths > 0, tree.unpacker[beam_of, above], -1)
    return parents.astype(np.int32)


def verification_mask(
    tree_mask: np.ndarray, depths: np.ndarray, cache_len: int, window: int | None = None
) -> np.ndarray:
    """(N, cache_len + N) bool mask: the cached prefix, then the tree's ancestors.

    With a sliding window, a query at position cache_len + d sees keys at most window - 1
    positions back, as mlx-lm's causal window mask does.
    """
    n = depths.shape[0]
    prefix = np.ones((n, cache_len), dtype=bool)
    tree = tree_mask.copy()
    if window is not None:
        query_pos = cache_len + depths
        prefix &= (query_pos[:, None] - np.arange(cache_len)[None, :]) < window
        tree &= (depths[:, None] - depths[None, :]) < window
    return np.concatenate([prefix, tree], axis=1)

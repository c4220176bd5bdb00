"""The batched tree cache: B rows of different lengths in one buffer, verified in one forward.

Layout. Each layer keeps one (B, H, capacity, D) buffer per keys and values. Row r is
left-aligned: its valid entries are [0, len_r), so a cached key's index is its position (no
left padding, no per-row position offset). `lengths` lives on the host (a small int array: the
engine knows every row's accepted count after its one acceptance sync).

A step. Every row's padded tree (N tokens, the step's largest tree) is written at one common
index W = max_r len_r, as one contiguous slice update (what mlx-lm's KVCache does). A shorter
row then has a hole [len_r, W) between its prefix and its tree; the mask hides it. Why the
common index and not a scatter at each row's own len_r: a slice update is what mlx-lm's caches
already do (in place when the buffer is not shared), while a per-row scatter of B x N entries
buys nothing at verification time: the keys every query scans are [0, W + N) either way (SDPA
on a rectangular batch), and the hole's only cost is that scan, bounded by the rows' length
spread, the same cost that left padding has in mlx-lm's BatchKVCache.

The mask (B, 1, N, W + N), per row: the row's prefix [0, len_r) (by its own positions within a
sliding window), nothing in the hole, and in the tree block the row's ancestor mask. Pad nodes
(a row's tree smaller than the step's) attend to themselves only and no real node attends to
them: every query sees at least one key (a fully masked row gives NaN in SDPA, and a NaN in a
masked-out value would reach the output through 0 * NaN), and padding never reaches a real
token. Holes and pads hold finite values (zeros, or keys of earlier steps).

The commit. Row r keeps its accepted path (packed indices p_0 < ... < p_{n-1}, n <= L + 1): one
gather of entries W + p_j and one scatter to len_r + j for all rows at once, then len_r += n.
Data moved per step: B x (L + 1) keys and values per layer, never the cache (a realignment of
the whole cache per step would cost O(B x S) at long contexts). Rows joining or leaving copy
the buffers once (a concatenation or a row gather along the batch axis): per event, not per
step.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .verify import TreeContext

STEP = 256  # capacity grows in these chunks, as mlx-lm's KVCache does


def batch_verification_mask(
    tree_masks: np.ndarray,
    depths: np.ndarray,
    lengths: np.ndarray,
    sizes: np.ndarray,
    write_at: int,
    window: int | None = None,
) -> mx.array:
    """(B, 1, N, write_at + N) bool mask for B padded trees written at `write_at`.

    tree_masks (B, N, N): each row's ancestor-or-self mask, pad nodes seeing only themselves;
    depths (B, N): node depths (pads 0); lengths (B,): each row's cached length (<= write_at);
    sizes (B,): each row's real nodes (the first sizes[r]; the rest are pads, which see no
    prefix either).
    A query at position len_r + depth sees prefix key k when k < len_r and, with a window,
    when its position minus k is below the window (mlx-lm's windowed causal mask).
    """
    b, n = depths.shape
    if tree_masks.shape != (b, n, n) or lengths.shape != (b,) or sizes.shape != (b,):
        raise ValueError(
            f"tree masks {tree_masks.shape}, depths {depths.shape} and lengths "
            f"{lengths.shape} do not describe the same B padded trees"
        )
    if int(lengths.max(initial=0)) > write_at:
        raise ValueError(f"a row holds more than write_at = {write_at} tokens")
    keys = mx.arange(write_at)[None, None, :]  # (1, 1, W)
    rows = mx.array(lengths.astype(np.int32))[:, None, None]  # (B, 1, 1)
    real = mx.array(np.arange(n)[None, :] < sizes[:, None])[:, :, None]  # (B, N, 1)
    prefix = (keys < rows) & real
    tree = np.asarray(tree_masks, dtype=bool)
    if window is not None:
        query_pos = rows + mx.array(depths.astype(np.int32))[:, :, None]  # (B, N, 1)
        prefix = prefix & ((query_pos - keys) < window)
        tree = tree & ((depths[:, :, None] - depths[:, None, :]) < window)
    prefix = mx.broadcast_to(prefix, (b, n, write_at))
    return mx.concatenate([prefix, mx.array(tree)], axis=2)[:, None]


class BatchTreeKVCache:
    """One layer's keys and values for B left-aligned rows (see the module docstring).

    mlx-lm's attention calls `update_and_fetch` and (through `create_attention_mask`)
    `make_mask`; the batch engine calls the rest. `offset` is the step's write index W: mlx-lm
    passes it to RoPE, which the tree context overrides with per-token positions.
    """

    def __init__(self, context: TreeContext):
        self._context = context
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.lengths = np.zeros((0,), dtype=np.int64)
        self.offset = 0  # the write index of the current step

    @property
    def tree_context(self) -> TreeContext:
        return self._context

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write the step's B x N keys/values at the common index; return [0, W + N)."""
        if keys.shape[0] != self.batch_size:
            raise ValueError(f"{keys.shape[0]} rows given to a cache of {self.batch_size}")
        start, n = self.offset, keys.shape[2]
        if self.keys is None:  # a fresh batch (batched prefill): empty buffers of this shape
            b, h, _, dk = keys.shape
            self.keys = mx.zeros((b, h, 0, dk), keys.dtype)
            self.values = mx.zeros((b, h, 0, values.shape[3]), values.dtype)
        self._reserve(start + n)
        self.keys[..., start : start + n, :] = keys
        self.values[..., start : start + n, :] = values
        return self.keys[..., : start + n, :], self.values[..., : start + n, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if not self._context.active:
            raise ValueError("a batched cache is only used inside batched tree verification")
        return self._context.mask(window_size)

    def _reserve(self, size: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if size <= capacity:
            return
        grow = ((size - capacity + STEP - 1) // STEP) * STEP
        b, h, _, dk = self.keys.shape
        dv = self.values.shape[3]
        self.keys = mx.concatenate([self.keys, mx.zeros((b, h, grow, dk), self.keys.dtype)], 2)
        self.values = mx.concatenate(
            [self.values, mx.zeros((b, h, grow, dv), self.values.dtype)], 2
        )

    # ------------------------------------------------------------------ rows
    def add_rows(self, keys: list[mx.array], values: list[mx.array]) -> None:
        """Append rows from single-sequence caches' (1, H, len, D) keys/values (copied once)."""
        lengths = [int(k.shape[2]) for k in keys]
        capacity = max([*lengths, 0 if self.keys is None else self.keys.shape[2]])
        capacity = ((capacity + STEP - 1) // STEP) * STEP or STEP

        def padded(a: mx.array) -> mx.array:
            pad = capacity - a.shape[2]
            return a if pad == 0 else mx.pad(a, [(0, 0), (0, 0), (0, pad), (0, 0)])

        new_k = [padded(k) for k in keys]
        new_v = [padded(v) for v in values]
        if self.keys is not None:
            new_k.insert(0, padded(self.keys))
            new_v.insert(0, padded(self.values))
        self.keys = mx.concatenate(new_k, axis=0)
        self.values = mx.concatenate(new_v, axis=0)
        self.lengths = np.concatenate([self.lengths, np.array(lengths, dtype=np.int64)])

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only `rows` (indices into the batch, in the order given)."""
        rows = np.asarray(rows, dtype=np.int64)
        self.lengths = self.lengths[rows]
        if rows.size == 0:
            self.keys = self.values = None
            return
        index = mx.array(rows.astype(np.int32))
        # the buffers shrink to the longest remaining row (a long row's leaving frees its room)
        capacity = max(STEP, -(-int(self.lengths.max()) // STEP) * STEP)
        self.keys = self.keys[index, :, :capacity]
        self.values = self.values[index, :, :capacity]

    def row(self, r: int) -> tuple[mx.array, mx.array]:
        """Row r's valid keys and values, (1, H, len_r, D) each."""
        n = int(self.lengths[r])
        return self.keys[r : r + 1, :, :n, :], self.values[r : r + 1, :, :n, :]

    # ------------------------------------------------------------------ commit
    def commit(self, write_at: int, paths: list[np.ndarray]) -> None:
        """Keep each row's accepted path (packed indices, increasing) after its prefix.

        One gather of the B x P path entries (P the longest path) and one scatter; a shorter
        path's padding copies its last entry to slots past the row's new length, where nothing
        reads it.
        """
        if len(paths) != self.batch_size:
            raise ValueError(f"{len(paths)} paths for {self.batch_size} rows")
        longest = max(int(p.shape[0]) for p in paths)
        src = np.empty((self.batch_size, longest), dtype=np.int32)
        for r, p in enumerate(paths):  # B rows of <= L + 1 entries
            src[r, : p.shape[0]] = p
            src[r, p.shape[0] :] = p[-1]
        src += write_at
        dst = (self.lengths[:, None] + np.arange(longest)[None, :]).astype(np.int32)
        self._reserve(int(dst.max()) + 1)
        for name in ("keys", "values"):
            a = getattr(self, name)
            shape = (a.shape[0], a.shape[1], longest, a.shape[3])
            gather = mx.broadcast_to(mx.array(src)[:, None, :, None], shape)
            scatter = mx.broadcast_to(mx.array(dst)[:, None, :, None], shape)
            moved = mx.take_along_axis(a, gather, axis=2)
            setattr(self, name, mx.put_along_axis(a, scatter, moved, axis=2))
        self.lengths = self.lengths + np.array([p.shape[0] for p in paths], dtype=np.int64)

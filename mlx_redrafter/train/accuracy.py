"""Held-out top-1 / top-k accuracy per depth, the figure training reports at each evaluation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .loss import depth_logits, draft_targets
from .positions import PositionData


def accuracy(drafter, embed, data: PositionData, batch: int = 1024, top: int = 5):
    """Top-1 and top-k accuracy per depth against `data.labels` (outside the draft
    vocabulary counts as a miss)."""
    return accuracies(drafter, embed, data, batch, top)["all"]


def accuracies(
    drafter, embed, data: PositionData, batch: int = 1024, top: int = 5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`accuracy` over all positions ("all") and over the response positions ("response"),
    from one pass: the two figures that make runs with either loss setting comparable."""
    depths = data.windows.shape[1] - 1
    sums = {name: np.zeros((3, depths)) for name in ("all", "response")}
    mask = data.response_mask
    for start in range(0, len(data), batch):
        hidden = mx.array(data.hidden[start : start + batch]).astype(mx.float32)
        windows = mx.array(data.windows[start : start + batch])
        labels = mx.array(data.labels[start : start + batch])
        response = mx.array(mask[start : start + batch])
        targets = draft_targets(drafter, labels)
        for i, logits in enumerate(depth_logits(drafter, embed, hidden, windows)):
            real = labels[:, i] >= 0
            target = targets[:, i]
            k = min(top, logits.shape[-1])
            topk = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
            best = mx.argmax(logits, axis=-1)
            hit1 = (best == target) & (target >= 0)
            hitk = (topk == target[:, None]).any(axis=-1) & (target >= 0)
            counts = mx.stack(
                [hit1.sum(), hitk.sum(), real.sum()]
                + [(hit1 & response).sum(), (hitk & response).sum(), (real & response).sum()]
            ).tolist()
            sums["all"][:, i] += counts[:3]
            sums["response"][:, i] += counts[3:]
    return {
        name: (s[0] / np.maximum(s[2], 1), s[1] / np.maximum(s[2], 1)) for name, s in sums.items()
    }

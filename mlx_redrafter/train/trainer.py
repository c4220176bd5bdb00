"""Drafter training: the reference objective, teacher-forced on the LLM's frozen hidden states.

For a sequence x and the LLM's final-normed hidden state h_t at each position t, the drafter at
depth i (0 <= i < K) has consumed the true tokens x_{t+1} .. x_{t+1+i} through its RNN and is
trained with cross-entropy to predict x_{t+i+2}. Positions are the unit of batching: each
position t contributes its hidden state and the K+1 tokens after it (its "window"), so a batch
is a random set of positions from many sequences, and the LLM runs once per sequence, before
training, not once per step.

The draft vocabulary (`draft_vocab`) is the N most frequent tokens of the training data; targets
outside it are counted as misses in accuracy and left out of the loss.

Self-distillation (`teacher_top_k` > 0): the same LLM pass that gives h_t also gives the LLM's
own next-token distribution at every position, kept as its top-k ids and logits. Depth i at
position t then learns the LLM's prediction at t+i+1 (what the LLM would emit after the tokens the
RNN consumed): its argmax as the hard label (`llm_labels`; equal to the data on the LLM's own
greedy answers, and the right target on prompts, sampled answers and plain text, where the data
token is not what the LLM would say), and, with weight `kl_weight`, the top-k distribution
(renormalized over the ids in the draft vocabulary) as a soft label. The soft cross-entropy
differs from KL(teacher || drafter) by the teacher's entropy, a constant, so it has the same
gradient. Decision: the teacher is recomputed in this pass rather than read from the top-k that
`generate-data --top-k-logprobs` can store, so every source (including plain text) gets it and
no large arrays need keeping; the stored ones remain for analysis.

Loss positions (`loss_positions`): the engine drafts first from the state t = len(prompt) - 1
(hidden h_t of the last prompt token, g0 = the first generated token), so a position t of a
prompt + response sequence is a *response position* when t >= len(prompt) - 1; every position
of plain text (no prompt) is one. Decision: "response" (the default) trains only on those, as
the reference recipe masks prompt positions out of its loss: the prompt (chat template, system
prompt) is never drafted by the engine, and its memorised positions inflate held-out accuracy.
"all" keeps the earlier behaviour (every position of prompt + response). The LLM pass is the
same either way (the mask applies after it), and held-out accuracy is reported on both the
response positions and all positions, so runs with either setting compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import atomic_folder, remove_leftovers
from ..drafter import Drafter, DrafterConfig, check_drafter, top_indices
from ..verify import embed_tokens

IGNORE = -1
LOSS_POSITIONS = ("response", "all")


@dataclass
class TrainConfig:
    depths: int = 5
    exit_dim: int | None = None
    num_draft_layers: int = 2
    draft_vocab: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    epochs: float = 2.0
    batch_size: int = 256  # positions per optimizer micro-batch
    grad_accum: int = 1
    val_fraction: float = 0.05
    seed: int = 0
    eval_every: int = 200
    checkpoint_every: int = 500
    max_seq_len: int = 1024
    init_head_from_llm: bool = True
    teacher_top_k: int = 0  # 0: learn the data tokens only
    kl_weight: float = 0.0  # weight of the soft (top-k) term; the hard term gets 1 - kl_weight
    llm_labels: bool = True  # with a teacher: hard labels are the LLM's argmax, not the data
    loss_positions: str = "response"  # "response": t >= len(prompt) - 1 only; "all": every t


@dataclass
class SequenceStates:
    """What one LLM pass over a sequence gives: h_t, and optionally its top-k next tokens."""

    hidden: np.ndarray  # (T, H) float16
    top_ids: np.ndarray | None = None  # (T, k) int32, most likely first
    top_logits: np.ndarray | None = None  # (T, k) float16 raw logits (softmax over them: q)


@dataclass
class PositionData:
    """Every training position: the LLM's hidden state and the K+1 tokens after it.

    `labels[:, i]` is what depth i learns (the data token x_{t+i+2}, or the LLM's argmax after
    x_{t+i+1}); `teacher_ids/logits[:, i]` the LLM's top-k there (absent without a teacher).
    """

    hidden: np.ndarray  # (P, H) float16/float32
    windows: np.ndarray  # (P, K+1) int32 LLM token ids, IGNORE past a sequence's end
    labels: np.ndarray | None = None  # (P, K) int32; None: windows[:, 1:]
    teacher_ids: np.ndarray | None = None  # (P, K, k) int32, IGNORE where undefined
    teacher_logits: np.ndarray | None = None  # (P, K, k) float16
    response: np.ndarray | None = None  # (P,) bool: t >= len(prompt) - 1; None: all True

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = self.windows[:, 1:]

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def has_teacher(self) -> bool:
        return self.teacher_ids is not None

    @property
    def response_mask(self) -> np.ndarray:
        """(P,) bool: the positions the engine drafts from (all of them without prompts)."""
        if self.response is None:
            return np.ones(len(self), dtype=bool)
        return self.response

    def select(self, mask: np.ndarray) -> PositionData:
        """The positions where `mask` holds (a copy)."""

        def pick(a):
            return None if a is None else a[mask]

        return PositionData(
            hidden=self.hidden[mask],
            windows=self.windows[mask],
            labels=pick(self.labels),
            teacher_ids=pick(self.teacher_ids),
            teacher_logits=pick(self.teacher_logits),
            response=pick(self.response),
        )


# ------------------------------------------------------------------------------ data
def token_windows(tokens: Sequence[int], depths: int) -> np.ndarray:
    """(T, K+1): for position t, tokens t+1 .. t+K+1 (IGNORE beyond the end)."""
    arr = np.asarray(tokens, dtype=np.int32)
    padded = np.concatenate([arr, np.full(depths + 1, IGNORE, np.int32)])
    idx = np.arange(len(arr))[:, None] + 1 + np.arange(depths + 1)[None, :]
    return padded[idx]


def llm_hidden_states(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    max_tokens_per_batch: int = 4096,
    progress: bool = True,
) -> list[np.ndarray]:
    """The LLM's final-normed hidden state at every position of every sequence (frozen)."""
    states = llm_states(model, sequences, 0, max_tokens_per_batch, progress)
    return [s.hidden for s in states]


def llm_states(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    top_k: int = 0,
    max_tokens_per_batch: int = 4096,
    progress: bool = True,
    bar=None,
) -> list[SequenceStates]:
    """One frozen LLM pass per sequence: hidden states, and the top-k next tokens if asked.

    Sequences are grouped by length into padded batches (right padding is harmless under a
    causal mask) so that the LLM runs on large matrices; the vocabulary projection for the
    top-k runs in row chunks so that (tokens x vocabulary) logits never sit in memory at once.
    """
    from ..verify import lm_head

    head = lm_head(model) if top_k > 0 else None
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[SequenceStates | None] = [None] * len(sequences)
    own_bar = bar is None
    if own_bar:
        bar = states_bar(sum(len(s) for s in sequences), top_k, progress)
    start = 0
    while start < len(order):
        longest = len(sequences[order[start]])
        end = start + 1
        while end < len(order):
            longest = max(longest, len(sequences[order[end]]))
            if longest * (end - start + 1) > max_tokens_per_batch:
                break
            end += 1
        longest = max(len(sequences[i]) for i in order[start:end])
        batch = np.zeros((end - start, longest), dtype=np.int32)
        for row, i in enumerate(order[start:end]):
            batch[row, : len(sequences[i])] = sequences[i]
        hidden = model.model(mx.array(batch))
        mx.eval(hidden)
        top_ids = top_logits = None
        if head is not None:
            top_ids, top_logits = _top_k_next(head, hidden, top_k)
        hidden = np.array(hidden.astype(mx.float16))
        for row, i in enumerate(order[start:end]):
            n = len(sequences[i])
            out[i] = SequenceStates(
                hidden[row, :n],
                None if top_ids is None else top_ids[row, :n],
                None if top_logits is None else top_logits[row, :n],
            )
            bar.update(n)
        start = end
    if own_bar:
        bar.close()
    return out  # type: ignore[return-value]


def states_bar(total_tokens: int, top_k: int, progress: bool = True):
    """The progress bar of the frozen LLM pass (shared with the on-disk states cache)."""
    from tqdm import tqdm

    desc = "LLM hidden states" + (f" + top-{top_k}" if top_k else "")
    return tqdm(total=total_tokens, unit="tok", desc=desc, disable=not progress)


def _top_k_next(head, hidden: mx.array, k: int, chunk: int = 512):
    """(B, T, H) hidden -> top-k ids (B, T, k) int32 and their raw logits (B, T, k) float16.

    Raw logits, not log-probs: the soft label renormalizes over the top-k, where the full
    softmax's normalizer cancels, and skipping it saves a third of this pass on the CPU.
    Chunks are evaluated one by one so that (chunk x vocabulary) logits are all that is live.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    ids, values = [], []
    for i in range(0, rows.shape[0], chunk):
        logits = head(rows[i : i + chunk]).astype(mx.float32)
        top = top_indices(logits, k).astype(mx.int32)
        picked = mx.take_along_axis(logits, top, axis=-1)
        mx.eval(top, picked)
        ids.append(top)
        values.append(picked)
    shape = (*hidden.shape[:2], k)
    ids = mx.concatenate(ids).reshape(shape)
    values = mx.concatenate(values).reshape(shape)
    return np.array(ids).astype(np.int32), np.array(values.astype(mx.float16))


def first_response_position(prompt_length: int) -> int:
    """The first position the engine drafts from: t = len(prompt) - 1 (h_t of the last prompt
    token, g0 = the first generated token); 0 without a prompt."""
    return max(int(prompt_length) - 1, 0)


def build_positions(
    hidden: Sequence[np.ndarray] | Sequence[SequenceStates],
    sequences: Sequence[Sequence[int]],
    depths: int,
    llm_labels: bool = True,
    prompt_lengths: Sequence[int] | None = None,
    drop_prompt: bool = False,
) -> PositionData:
    """Positions of all sequences, from hidden arrays or SequenceStates (teacher when present).

    Depth i at position t: the RNN has read x_{t+1} .. x_{t+1+i}; the data label is x_{t+i+2}
    and the teacher is the LLM's top-k at position t+i+1.

    prompt_lengths (len(prompt) per sequence, 0 for plain text) marks the response positions
    t >= len(prompt) - 1 in `response`; with `drop_prompt` the others are left out (the
    "response" loss). Without prompt_lengths every position is kept and `response` is None.
    """
    if drop_prompt and prompt_lengths is None:
        raise ValueError("drop_prompt needs prompt_lengths")
    states = [h if isinstance(h, SequenceStates) else SequenceStates(h) for h in hidden]
    teacher = all(s.top_ids is not None for s in states) and len(states) > 0
    windows = [token_windows(s, depths) for s in sequences]
    # a position whose next token is unknown teaches nothing
    keep = [w[:, 1] != IGNORE for w in windows]
    response = None
    if prompt_lengths is not None:
        marks = [
            np.arange(len(w)) >= first_response_position(n)
            for w, n in zip(windows, prompt_lengths, strict=True)
        ]
        if drop_prompt:
            keep = [k & m for k, m in zip(keep, marks, strict=True)]
        response = np.concatenate([m[k] for m, k in zip(marks, keep, strict=True)])
    data = PositionData(
        hidden=np.concatenate([s.hidden[k] for s, k in zip(states, keep, strict=True)]),
        windows=np.concatenate([w[k] for w, k in zip(windows, keep, strict=True)]),
        response=response,
    )
    if not teacher:
        return data
    ids, values = [], []
    for s, w, k in zip(states, windows, keep, strict=True):
        t_ids, t_logit = _shifted(s.top_ids, depths, IGNORE), _shifted(s.top_logits, depths, 0)
        valid = (w[:, 1:] != IGNORE)[:, :, None]  # depth i exists where its data label does
        ids.append(np.where(valid, t_ids, IGNORE)[k])
        values.append(np.where(valid, t_logit, 0)[k].astype(np.float16))
    data.teacher_ids = np.concatenate(ids)
    data.teacher_logits = np.concatenate(values)
    if llm_labels:
        data.labels = data.teacher_ids[:, :, 0].copy()
    return data


def _shifted(per_position: np.ndarray, depths: int, fill) -> np.ndarray:
    """(T, k) -> (T, K, k): entry [t, i] = per_position[t + 1 + i] (fill past the end)."""
    length = per_position.shape[0]
    padded = np.concatenate(
        [per_position, np.full((depths + 1, per_position.shape[1]), fill, per_position.dtype)]
    )
    idx = np.arange(length)[:, None] + 1 + np.arange(depths)[None, :]
    return padded[idx]


def frequent_tokens(sequences: Sequence[Sequence[int]], n: int, always: Sequence[int] = ()):
    """The n most frequent token ids (ties by id), with `always` ids forced in."""
    counts = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in sequences]))
    forced = [t for t in dict.fromkeys(always) if t < 1 << 31]
    order = np.lexsort((np.arange(len(counts)), -counts))
    chosen = list(forced) + [int(t) for t in order if counts[t] > 0 and t not in set(forced)]
    return np.array(sorted(chosen[:n]), dtype=np.int32)


def split_by_id(ids: Sequence[str], val_fraction: float) -> np.ndarray:
    """Deterministic held-out mask from sequence ids (stable across runs and data growth)."""
    import hashlib

    def bucket(s: str) -> float:
        return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(i) < val_fraction for i in ids], dtype=bool)


# ------------------------------------------------------------------------------ model
def new_drafter(model: nn.Module, cfg: TrainConfig, vocab_ids: np.ndarray | None) -> Drafter:
    embed = embed_tokens(model)
    vocab = int(embed.weight.shape[0])
    hidden = int(model.model.norm.weight.shape[0])
    config = DrafterConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        exit_dim=cfg.exit_dim,
        num_draft_layers=cfg.num_draft_layers,
        draft_vocab_size=None if vocab_ids is None else len(vocab_ids),
    )
    mx.random.seed(cfg.seed)
    drafter = Drafter(config)
    if vocab_ids is not None:
        drafter.draft_vocab_ids = mx.array(vocab_ids, dtype=mx.int32)
    if cfg.init_head_from_llm and config.exit_dim == hidden:
        output = llm_output_embedding(model)
        if output is not None:
            rows = output if vocab_ids is None else output[mx.array(vocab_ids)]
            # a copy: the LLM's own array must stay a frozen constant of the training graph
            drafter.lm_head[-1].weight = mx.array(np.array(rows.astype(mx.float32))).astype(
                drafter.lm_head[-1].weight.dtype
            )
    mx.eval(drafter.parameters())
    return drafter


def warm_start_drafter(model: nn.Module, path: str | Path) -> Drafter:
    """A trained drafter to continue from, in float32 (shipped drafters are float16).

    Its shape and draft vocabulary are kept: new data refines it instead of starting over,
    which costs one pass over the data instead of several.
    """
    drafter = Drafter.from_pretrained(path)
    check_drafter(model, drafter)
    drafter.set_dtype(mx.float32)
    drafter.config.torch_dtype = "float32"
    mx.eval(drafter.parameters())
    return drafter


def llm_output_embedding(model: nn.Module) -> mx.array | None:
    """The LLM's output projection [V, H] as floats (None for quantized heads).

    A drafter whose exit_dim equals the LLM's hidden size can start its vocabulary projection
    from it: the token geometry is what data-starved training learns slowest.
    """
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    if not isinstance(head, (nn.Linear, nn.Embedding)) or hasattr(head, "scales"):
        return None
    return head.weight


def draft_targets(drafter: Drafter, windows: mx.array) -> mx.array:
    """LLM ids -> draft-vocabulary indices (IGNORE when outside the draft vocabulary)."""
    if drafter.config.draft_vocab_size is None:
        return windows
    table = mx.full((drafter.config.vocab_size + 1,), IGNORE, dtype=mx.int32)
    table[drafter.draft_vocab_ids] = mx.arange(drafter.config.draft_vocab_size, dtype=mx.int32)
    return table[mx.where(windows < 0, drafter.config.vocab_size, windows)]


def depth_logits(drafter: Drafter, embed: nn.Module, hidden: mx.array, windows: mx.array):
    """Teacher-forced drafter logits at each depth: list of K arrays (B, V_draft)."""
    state = mx.zeros((hidden.shape[0], drafter.config.hidden_size), dtype=hidden.dtype)
    logits = []
    for i in range(windows.shape[1] - 1):
        token = mx.maximum(windows[:, i], 0)  # IGNORE rows are masked out of the loss
        state = drafter.rnn_step(state, mx.stop_gradient(embed(token)))
        logits.append(drafter.head_logits(hidden, state))
    return logits


def loss_and_metrics(
    drafter: Drafter,
    embed: nn.Module,
    hidden: mx.array,
    windows: mx.array,
    targets: mx.array,
    teacher: tuple[mx.array, mx.array] | None = None,
    kl_weight: float = 0.0,
):
    """Loss summed over depths (each depth's mean), and per-depth (hard loss sum, count).

    targets (B, K): draft-vocabulary indices (IGNORE: no label, or outside the vocabulary).
    teacher: draft-vocabulary ids (B, K, k) (IGNORE where absent) and logits (B, K, k).
    """
    total = mx.array(0.0)
    per_depth = []
    for i, logits in enumerate(depth_logits(drafter, embed, hidden, windows)):
        logits = logits.astype(mx.float32)
        target = targets[:, i]
        valid = target >= 0
        ce = nn.losses.cross_entropy(logits, mx.maximum(target, 0))
        ce = mx.where(valid, ce, 0.0)
        term = ce.sum() / mx.maximum(valid.sum(), 1)
        if teacher is not None and kl_weight > 0:
            soft = soft_cross_entropy(logits, teacher[0][:, i], teacher[1][:, i])
            term = (1.0 - kl_weight) * term + kl_weight * soft
        total = total + term
        per_depth.append((ce.sum(), valid.sum()))
    return total, per_depth


def soft_cross_entropy(logits: mx.array, ids: mx.array, teacher: mx.array) -> mx.array:
    """Mean over rows of -sum_j q_j log p(ids_j); q = softmax of the teacher's top-k logits
    (or log-probs: a per-row constant cancels).

    Entries with id IGNORE (outside the draft vocabulary, or past the end) get no mass; rows
    with none left are skipped.
    """
    present = ids >= 0
    q = mx.softmax(mx.where(present, teacher.astype(mx.float32), -1e9), axis=-1)
    q = mx.where(present, q, 0.0)
    log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(log_p, mx.maximum(ids, 0), axis=-1)
    rows = present.any(axis=-1)
    per_row = mx.where(rows, -(q * picked).sum(axis=-1), 0.0)
    return per_row.sum() / mx.maximum(rows.sum(), 1)


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


# ------------------------------------------------------------------------------ training
def learning_rate_schedule(cfg: TrainConfig, total_steps: int):
    warm = max(1, int(cfg.warmup * total_steps))
    return optim.join_schedules(
        [
            optim.linear_schedule(cfg.learning_rate * 1e-3, cfg.learning_rate, warm),
            optim.cosine_decay(
                cfg.learning_rate, max(1, total_steps - warm), cfg.learning_rate * 0.05
            ),
        ],
        [warm],
    )


def batch_order(n_positions: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n_positions)
    return [
        perm[i : i + batch_size] for i in range(0, n_positions - batch_size + 1, batch_size)
    ] or [perm]


class Trainer:
    """AdamW + warmup/cosine over position batches, with checkpoints that resume exactly."""

    def __init__(
        self,
        model: nn.Module,
        drafter: Drafter,
        train: PositionData,
        val: PositionData | None,
        cfg: TrainConfig,
        out_dir: str | Path,
        log=print,
    ):
        if cfg.loss_positions not in LOSS_POSITIONS:
            raise ValueError(
                f"loss_positions must be one of {LOSS_POSITIONS}, got {cfg.loss_positions!r}"
            )
        if cfg.loss_positions == "response" and not train.response_mask.all():
            train = train.select(
                train.response_mask
            )  # build_positions(drop_prompt=True) avoids the copy
        self.model, self.drafter, self.train, self.val, self.cfg = model, drafter, train, val, cfg
        self.embed = embed_tokens(model)
        self.out_dir = Path(out_dir)
        self.log = log
        self.steps_per_epoch = len(batch_order(len(train), cfg.batch_size, 0, cfg.seed)) // max(
            1, cfg.grad_accum
        )
        self.total_steps = max(1, int(math.ceil(cfg.epochs * self.steps_per_epoch)))
        self.optimizer = optim.AdamW(
            learning_rate=learning_rate_schedule(cfg, self.total_steps),
            weight_decay=cfg.weight_decay,
        )
        self.step = 0
        self.history: list[dict] = []
        self._grad = nn.value_and_grad(drafter, self._loss)
        self._compiled_step = None

    def _update(self, *batch):
        loss, grads = self._grad(*batch)
        self.optimizer.update(self.drafter, grads)
        return loss

    def _loss(self, hidden, windows, targets, teacher_ids=None, teacher_logits=None):
        teacher = None if teacher_ids is None else (teacher_ids, teacher_logits)
        return loss_and_metrics(
            self.drafter, self.embed, hidden, windows, targets, teacher, self.cfg.kl_weight
        )[0]

    def _batch(self, idx: np.ndarray):
        windows = mx.array(self.train.windows[idx])
        hidden = mx.array(self.train.hidden[idx]).astype(mx.float32)
        targets = draft_targets(self.drafter, mx.array(self.train.labels[idx]))
        if not (self.train.has_teacher and self.cfg.kl_weight > 0):
            return hidden, windows, targets
        teacher_ids = draft_targets(self.drafter, mx.array(self.train.teacher_ids[idx]))
        return hidden, windows, targets, teacher_ids, mx.array(self.train.teacher_logits[idx])

    def _micro_batches(self):
        """Yield (step, list of micro-batch index arrays), resuming at self.step."""
        step = 0
        epoch = 0
        while step < self.total_steps:
            order = batch_order(len(self.train), self.cfg.batch_size, epoch, self.cfg.seed)
            for k in range(0, len(order) - self.cfg.grad_accum + 1, self.cfg.grad_accum):
                if step >= self.total_steps:
                    return
                if step >= self.step:
                    yield step, order[k : k + self.cfg.grad_accum]
                step += 1
            epoch += 1

    def fit(self, progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Train to the end of the schedule (or `stop_after` more steps, then checkpoint)."""
        from tqdm import tqdm

        first = self.step
        # One fused graph per optimizer step (forward, backward, update): per-op overhead, not
        # arithmetic, dominates a small drafter on the CPU back-end. Built here, after any
        # checkpoint load, because it binds the optimizer's state object.
        self.optimizer.init(self.drafter.trainable_parameters())
        state = [self.drafter.state, self.optimizer.state, mx.random.state]
        self._compiled_step = mx.compile(self._update, inputs=state, outputs=state)

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            desc="training",
            disable=not progress,
        )
        for step, micro in self._micro_batches():
            batches = [self._batch(idx) for idx in micro]
            if len(batches) == 1:
                loss_sum = self._compiled_step(*batches[0])
            else:
                grads, loss_sum = None, 0.0
                for batch in batches:
                    loss, g = self._grad(*batch)
                    grads = g if grads is None else _tree_add(grads, g)
                    loss_sum = loss_sum + loss
                self.optimizer.update(self.drafter, _tree_scale(grads, 1.0 / len(batches)))
            mx.eval(self.drafter.parameters(), self.optimizer.state, loss_sum)
            self.step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss_sum) / len(micro):.3f}")
            record = {"step": self.step, "loss": float(loss_sum) / len(micro)}
            if self.val is not None and (
                self.step % self.cfg.eval_every == 0 or self.step == self.total_steps
            ):
                record.update(self.evaluate())
                self.log(self._eval_line(record))
            self.history.append(record)
            done = stop_after is not None and self.step - first >= stop_after
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps or done:
                self.save_checkpoint()
            if done:
                break
        bar.close()
        return self.history

    def evaluate(self) -> dict[str, list[float]]:
        """Held-out accuracy per depth: `val_top1/5` on the positions the loss uses, and
        `val_top1/5_response` and `val_top1/5_all` whatever the setting, so runs compare."""
        acc = accuracies(self.drafter, self.embed, self.val)

        def rounded(values):
            return [round(float(x), 4) for x in values]

        out = {}
        for name in ("response", "all"):
            out[f"val_top1_{name}"] = rounded(acc[name][0])
            out[f"val_top5_{name}"] = rounded(acc[name][1])
        out["val_top1"] = out[f"val_top1_{self.cfg.loss_positions}"]
        out["val_top5"] = out[f"val_top5_{self.cfg.loss_positions}"]
        return out

    def _eval_line(self, record: dict) -> str:
        def fmt(values):
            return " ".join(f"{x:.3f}" for x in values)

        other = "all" if self.cfg.loss_positions == "response" else "response"
        line = (
            f"step {self.step}: loss {record['loss']:.3f} | val top-1 {fmt(record['val_top1'])}"
            f" | top-5 {fmt(record['val_top5'])} ({self.cfg.loss_positions} positions)"
        )
        if not self.val.response_mask.all():
            line += f" | {other} positions: top-1 {fmt(record[f'val_top1_{other}'])}"
        return line

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """drafter/ + optimizer state + step, built beside and renamed into place: an
        interrupted save leaves the previous checkpoint as it was."""
        final = self.out_dir / "checkpoint"
        remove_leftovers(final)  # of a save killed outright (a kill -9 gets no clean-up)
        with atomic_folder(final, replace=True) as tmp:
            tmp.mkdir()
            self.drafter.save_pretrained(tmp / "drafter")
            state = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), state)
            (tmp / "trainer.json").write_text(
                json.dumps({"step": self.step, "config": asdict(self.cfg), "history": self.history})
            )
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        path = Path(path) if path else self.out_dir / "checkpoint"
        meta = json.loads((path / "trainer.json").read_text())
        saved = Drafter.from_pretrained(path / "drafter")
        self.drafter.update(saved.parameters())
        state = mx.load(str(path / "optimizer.safetensors"))
        self.optimizer.init(self.drafter.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(state.items()))
        self.step = int(meta["step"])
        self.history = meta.get("history", [])
        mx.eval(self.drafter.parameters(), self.optimizer.state)


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s: float):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * s, a)

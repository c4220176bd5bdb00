"""The training loop: AdamW with warmup + cosine over batches of positions, gradient
accumulation, periodic held-out evaluation, and checkpoints that resume exactly."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..atomic import atomic_folder, remove_leftovers
from ..drafter import Drafter
from ..verify import embed_tokens
from .accuracy import accuracies
from .config import LOSS_POSITIONS, TrainConfig
from .loss import draft_targets, loss_and_metrics
from .positions import PositionData


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
    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s: float):
    return tree_map(lambda x: x * s, a)

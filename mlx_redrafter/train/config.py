"""The settings of one drafter training run (saved in every checkpoint's `trainer.json`)."""

from __future__ import annotations

from dataclasses import dataclass

# "response": train on the positions the engine drafts from; "all": every position
# (`positions.py` says where the boundary lies and why "response" is the default).
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

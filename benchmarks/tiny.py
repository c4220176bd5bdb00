"""Tiny random models and drafters: one config per architecture feature, for the tests and for
the lossless part of `mlx_redrafter.benchmarks.kernels`.

Why here (`mlx_redrafter.benchmarks.tiny`): two users share these builders, the test suite and a
benchmark that runs on a GPU machine from the installed wheel. The benchmarks package is the one
place both import by its installed name: it ships in the wheel (pyproject's `packages`), so the
GPU script needs no checkout and nobody inserts a folder into `sys.path`; and the rule that the
engine (mlx_redrafter/) never imports the benchmarks (tests/test_layout.py) already keeps test
fixtures out of the runtime. A separate `mlx_redrafter.testing` package would need its own layout
rule for the same guarantee.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import _get_classes

from mlx_redrafter.drafter import Drafter, DrafterConfig

VOCAB = 128

_BASE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    rope_theta=10000.0,
)

CONFIGS = {
    # grouped-query attention, tied head
    "llama": dict(_BASE, model_type="llama", tie_word_embeddings=True),
    # untied head, multi-head attention
    "llama_untied": dict(
        _BASE, model_type="llama", tie_word_embeddings=False, num_key_value_heads=4
    ),
    # mistral-style head_dim that is not hidden / heads (mlx-lm runs it through llama.py)
    "mistral": dict(_BASE, model_type="mistral", head_dim=32, tie_word_embeddings=False),
    "qwen2": dict(_BASE, model_type="qwen2", tie_word_embeddings=False),
    # q/k norms, explicit head_dim
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    # sliding window shorter than prompt + generation, local/global rope bases
    "gemma3_text": dict(
        _BASE,
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        sliding_window_pattern=2,
        rope_local_base_freq=10000.0,
    ),
}


def make_model(name: str, seed: int = 0, quantize: bool = False) -> nn.Module:
    config = dict(CONFIGS[name.removesuffix("_q4")])
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Larger-than-default weights make the logits peaked, so greedy paths rarely near-tie.
    model.update(tree_map(lambda p: p * 2.0 if p.ndim == 2 else p, model.parameters()))
    if name.endswith("_q4") or quantize:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def make_drafter(model: nn.Module, seed: int = 1, exit_dim: int | None = None, **kw) -> Drafter:
    hidden = model.model.norm.weight.shape[0]
    vocab = model.model.embed_tokens.weight.shape[0]
    mx.random.seed(seed)
    drafter = Drafter(DrafterConfig(vocab_size=vocab, hidden_size=hidden, exit_dim=exit_dim, **kw))
    mx.eval(drafter.parameters())
    return drafter


class OracleDrafter:
    """Proposes the LLM's true greedy continuation in some beams and noise in others.

    It knows the reference greedy sequence (prompt + output) and looks up where g0 sits in it
    (the engine's hidden state is ignored). Beam b keeps the truth for `keep[b]` drafted
    tokens and then diverges, so long acceptances, shared prefixes, the bonus token, and
    divergent branches all occur. Off the known sequence it proposes noise.
    """

    def __init__(
        self, reference: list[int], prompt_len: int, vocab: int, hidden: int = 64, seed: int = 0
    ):
        self.reference = reference
        self.prompt_len = prompt_len
        self.vocab = vocab
        self.rng = __import__("numpy").random.default_rng(seed)
        self.position = prompt_len  # index in reference of the next g0
        self.config = DrafterConfig(vocab_size=vocab, hidden_size=hidden)

    def full_vocab_log_probs(self, log_probs):
        return log_probs

    def beam_search(self, hidden, first_token, embed_tokens, beam_width, beam_length):
        np = __import__("numpy")
        g0 = int(first_token.item())
        ref = self.reference
        # locate g0: the engine only calls with the true next token on greedy parity runs
        pos = self.position
        while pos < len(ref) and ref[pos] != g0:
            pos += 1
        beams = np.zeros((beam_width, beam_length), dtype=np.int32)
        for b in range(beam_width):
            keep = int(self.rng.integers(0, beam_length))
            for j in range(beam_length):
                idx = pos + j
                if j <= keep and idx < len(ref):
                    beams[b, j] = ref[idx]
                else:
                    beams[b, j] = int(self.rng.integers(0, self.vocab))
            beams[b, 0] = g0
        self.position = pos
        log_probs = mx.full((beam_width, beam_length - 1, self.vocab), -float(np.log(self.vocab)))
        return mx.array(beams), log_probs


class BatchOracleDrafter:
    """`OracleDrafter` for a batch: `beam_search_batch` over B (hidden, g0) rows.

    Rows come and go in a batch, so each row is recognised by its hidden state: the oracle
    holds the LLM's hidden states along every known sequence (prompt + greedy output, from one
    plain forward each) and takes the nearest one, which also says where g0 sits. Beams then
    follow `OracleDrafter`'s pattern: the truth for a random number of tokens, then noise.
    """

    def __init__(self, model: nn.Module, sequences: list[list[int]], vocab: int, seed: int = 0):
        import numpy as np

        self.sequences = sequences
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        states = [model.model(mx.array(s)[None])[0].astype(mx.float32) for s in sequences]
        self.states = np.concatenate([np.array(h) for h in states])  # (sum T, H)
        self.where = [(i, t) for i, s in enumerate(sequences) for t in range(len(s))]
        hidden = model.model.norm.weight.shape[0]
        self.config = DrafterConfig(vocab_size=vocab, hidden_size=hidden)

    def full_vocab_log_probs(self, log_probs):
        return log_probs

    def beam_search_batch(self, hidden, first_tokens, embed_tokens, beam_width, beam_length):
        import numpy as np

        h = np.array(hidden.astype(mx.float32))
        firsts = np.array(first_tokens).tolist()
        beams = self.rng.integers(0, self.vocab, size=(len(firsts), beam_width, beam_length))
        for r, (state, g0) in enumerate(zip(h, firsts, strict=True)):
            seq, t = self.where[int(np.argmin(((self.states - state) ** 2).sum(axis=1)))]
            ref, pos = self.sequences[seq], t + 1  # the hidden at t produced the token at t + 1
            for b in range(beam_width):
                keep = int(self.rng.integers(0, beam_length))
                truth = ref[pos : pos + keep + 1]
                beams[r, b, : len(truth)] = truth
            beams[r, :, 0] = g0
        log_probs = mx.full(
            (len(firsts), beam_width, beam_length - 1, self.vocab), -float(np.log(self.vocab))
        )
        return mx.array(beams.astype(np.int32)), log_probs


def reference_greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own greedy decoding (its generate_step and caches)."""
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        out.append(int(token))
    return out


def engine_tokens(
    model: nn.Module, drafter, prompt: list[int], max_tokens: int, **kw
) -> tuple[list[int], list]:
    """The engine's own decoding (`generate_step`, `kw` passed on): every token emitted and each
    step's stats, to hold against `reference_greedy`."""
    from mlx_redrafter.generate import generate_step

    tokens, steps = [], []
    for new, stats in generate_step(mx.array(prompt), model, drafter, max_tokens=max_tokens, **kw):
        tokens += new
        steps.append(stats)
    return tokens, steps


def make_tokenizer(vocab: int = VOCAB, eos: int = 2):
    """A word-level tokenizer over 't0'..'t{vocab-1}' (mlx-lm's TokenizerWrapper around it)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # single_word: the special token "t2" must not match inside "t24" once saved and reloaded
    special = {
        name: AddedToken(f"t{i}", single_word=True, special=True)
        for name, i in (("eos_token", eos), ("unk_token", 0))
    }
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    return TokenizerWrapper(hf)


def first_divergence_is_tie(
    model: nn.Module, prompt: list[int], expected: list[int], got: list[int], tol: float = 1e-4
) -> tuple[bool, int | None, float]:
    """Check docs/DESIGN.md section 5's rule: equal, or the first difference is a near-tie.

    Returns (ok, first differing index or None, relative top-2 gap there). The gap is taken from
    a plain causal forward over the context the autoregressive decoder saw.
    """
    import numpy as np

    from mlx_redrafter.benchmarks.metrics import first_divergence, near_tie

    diff = first_divergence(expected, got)
    if diff is None:
        return True, None, float("inf")
    if diff >= min(len(expected), len(got)):
        return False, diff, float("nan")
    logits = model(mx.array(prompt + expected[:diff])[None])[0, -1].astype(mx.float32)
    ok, gap = near_tie(np.array(logits), expected[diff], got[diff], tol=tol)
    return ok, diff, gap


CHAT_TEMPLATE = (
    "{% for m in messages %}t1 {{ m['content'] }} t2 {% endfor %}"
    "{% if add_generation_prompt %}t1 {% endif %}"
)


def save_tiny_model_dir(path, name: str = "llama", with_drafter: bool = True):
    """Write a tiny model folder (mlx-lm layout + tokenizer + optional drafter/)."""
    import json
    from pathlib import Path

    from mlx.utils import tree_flatten

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_model(name)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(CONFIGS[name]))
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer._tokenizer.save_pretrained(str(path))
    if with_drafter:
        make_drafter(model).save_pretrained(path / "drafter")
    return path

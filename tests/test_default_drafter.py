"""The drafter shipped for the default model: small, loaded by default, and lossless."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_redrafter import load
from mlx_redrafter.benchmarks.tiny import engine_tokens, first_divergence_is_tie, reference_greedy
from mlx_redrafter.default_model import bundled_drafter_path

MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def default():
    return load()


def test_shipped_drafter_is_small_and_loaded_by_default(default):
    path = bundled_drafter_path()
    assert path is not None, "the default model's drafter is missing from the package"
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= MAX_BYTES
    _, _, drafter = default
    assert drafter is not None
    assert drafter.config.draft_vocab_size is not None  # cheap head next to a 135M model


@pytest.mark.slow  # the real 135M model: two answers, each decoded twice
def test_greedy_with_the_shipped_drafter_equals_autoregressive(default):
    model, tokenizer, drafter = default
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        expected = reference_greedy(model, prompt, 40)
        got, _ = engine_tokens(model, drafter, prompt, 40)
        ok, diff, gap = first_divergence_is_tie(model, prompt, expected, got)
        assert ok, f"diverged at {diff} (gap {gap:.2e})"


def test_reference_export_of_the_shipped_drafter_keeps_its_beams(default, tmp_path, capsys):
    """README's `--export-torch` example on the shipped (reduced-vocabulary) drafter: the
    exported full-vocabulary head, loaded back, drafts the same beams from the real model's
    hidden states (convert/full_vocab.py explains the expansion)."""
    import numpy as np

    from mlx_redrafter import Drafter
    from mlx_redrafter.convert import cli

    model, tokenizer, drafter = default
    out = tmp_path / "ref-drafter"
    assert (
        cli.main(["--drafter-path", str(bundled_drafter_path()), "--export-torch", str(out)]) == 0
    )
    assert "expanded to the full 49152" in capsys.readouterr().out
    exported = Drafter.from_pretrained(out)
    exported.set_dtype(drafter.lm_head[-1].weight.dtype)
    assert exported.config.draft_vocab_size is None and exported.config.exit_dim == 577
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain how a rainbow forms."}], add_generation_prompt=True
    )
    hidden = model.model(mx.array(prompt)[None])[0]
    embed = model.model.embed_tokens
    for position in range(len(prompt) - 12, len(prompt) - 1, 3):
        g0 = mx.array(prompt[position + 1])
        beams, log_probs = drafter.beam_search(hidden[position], g0, embed, 4, 5)
        again, again_log_probs = exported.beam_search(hidden[position], g0, embed, 4, 5)
        assert np.array_equal(np.array(beams), np.array(again)), position
        full = np.array(drafter.full_vocab_log_probs(log_probs))
        kept = full > -1000
        assert (kept == (np.array(again_log_probs) > -1000)).all()
        assert np.abs(full[kept] - np.array(again_log_probs)[kept]).max() < 1e-3

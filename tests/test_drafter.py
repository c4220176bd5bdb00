"""The drafter: config, weight layout, checkpoint io, warp, and beam search.

Beam search is checked against a slow float64 NumPy implementation written from docs/DESIGN.md
section 2 (it reads the drafter's weights, never its functions).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_redrafter.benchmarks.tiny import VOCAB, make_drafter, make_model
from mlx_redrafter.drafter import (
    MODEL_TYPE,
    Drafter,
    DrafterConfig,
    check_beam_shape,
    top_k_log_probs,
    warp_log_softmax,
)

H = 64  # hidden size of the tiny models


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def params_np(drafter) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(drafter.parameters())}


def hidden_state(seed: int) -> mx.array:
    """A non-flat hidden state: scaled so the draft distributions are peaked and untied."""
    return mx.array(np.random.default_rng(seed).normal(size=(H,)).astype(np.float32) * 3.0)


# ------------------------------------------------------------------ config
def test_config_defaults():
    cfg = DrafterConfig(vocab_size=100, hidden_size=16)
    assert cfg.exit_dim == 32
    assert cfg.num_draft_layers == 2
    assert cfg.rnn is True
    assert cfg.model_type == MODEL_TYPE == "recurrent_drafting_drafter"
    assert cfg.draft_vocab_size is None
    assert cfg.head_vocab_size == 100
    assert not cfg.has_input_proj
    d = cfg.to_dict()
    assert d["exit_dim"] == 32 and d["vocab_size"] == 100 and d["hidden_size"] == 16
    assert d["model_type"] == MODEL_TYPE
    assert "draft_vocab_size" not in d
    assert "extra" not in d
    json.dumps(d)  # serialisable as config.json


def test_config_round_trip_keeps_unknown_fields():
    raw = {
        "vocab_size": 100,
        "hidden_size": 16,
        "exit_dim": 24,
        "num_draft_layers": 1,
        "rnn": False,
        "model_type": MODEL_TYPE,
        "architectures": ["ReDrafter"],
        "some_future_field": {"a": [1, 2]},
    }
    cfg = DrafterConfig.from_dict(raw)
    assert cfg.exit_dim == 24 and cfg.num_draft_layers == 1 and cfg.rnn is False
    assert cfg.extra == {"architectures": ["ReDrafter"], "some_future_field": {"a": [1, 2]}}
    d = cfg.to_dict()
    assert d["architectures"] == ["ReDrafter"]
    assert d["some_future_field"] == {"a": [1, 2]}
    for k, v in raw.items():
        assert d[k] == v
    again = DrafterConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert again.to_dict() == d


def test_config_round_trip_draft_vocab():
    cfg = DrafterConfig(vocab_size=100, hidden_size=16, draft_vocab_size=40)
    d = cfg.to_dict()
    assert d["draft_vocab_size"] == 40
    assert DrafterConfig.from_dict(d) == cfg
    assert cfg.head_vocab_size == 40


def test_config_rejects_wrong_model_type():
    with pytest.raises(ValueError, match="llama"):
        DrafterConfig.from_dict({"vocab_size": 10, "hidden_size": 4, "model_type": "llama"})
    with pytest.raises(ValueError, match="llama"):
        DrafterConfig(vocab_size=10, hidden_size=4, model_type="llama")


def test_config_rejects_missing_fields():
    with pytest.raises(ValueError, match="vocab_size"):
        DrafterConfig.from_dict({"hidden_size": 4})
    with pytest.raises(ValueError, match="hidden_size"):
        DrafterConfig.from_dict({"vocab_size": 4})
    with pytest.raises(ValueError) as err:
        DrafterConfig.from_dict({"model_type": MODEL_TYPE})
    assert "vocab_size" in str(err.value) and "hidden_size" in str(err.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(vocab_size=0, hidden_size=4),
        dict(vocab_size=4, hidden_size=0),
        dict(vocab_size=4, hidden_size=4, exit_dim=0),
        dict(vocab_size=4, hidden_size=4, num_draft_layers=-1),
        dict(vocab_size=4, hidden_size=4, draft_vocab_size=5),
        dict(vocab_size=4, hidden_size=4, draft_vocab_size=0),
    ],
)
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        DrafterConfig(**kw)


# ------------------------------------------------------------------ weight layout
def reference_layout(vocab: int, hidden: int, exit_dim: int, layers: int) -> dict[str, tuple]:
    """The table of docs/DESIGN.md section 2."""
    out = {}
    if exit_dim != 2 * hidden:
        out["input_proj.weight"] = (exit_dim, 2 * hidden)
        out["input_proj.bias"] = (exit_dim,)
    for i in range(layers):
        out[f"lm_head.{i}.linear.weight"] = (exit_dim, exit_dim)
        out[f"lm_head.{i}.linear.bias"] = (exit_dim,)
    out[f"lm_head.{layers}.weight"] = (vocab, exit_dim)
    out["rnn_u.weight"] = (hidden, hidden)
    out["rnn_u.bias"] = (hidden,)
    out["rnn_w.weight"] = (hidden, hidden)
    return out


@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("exit_dim", [None, 32, 24, 48])
def test_parameter_layout(layers, exit_dim):
    vocab, hidden = 50, 16
    drafter = Drafter(
        DrafterConfig(
            vocab_size=vocab, hidden_size=hidden, exit_dim=exit_dim, num_draft_layers=layers
        )
    )
    e = exit_dim or 2 * hidden
    got = {k: tuple(v.shape) for k, v in tree_flatten(drafter.parameters())}
    assert got == reference_layout(vocab, hidden, e, layers)
    assert hasattr(drafter, "input_proj") == (e != 2 * hidden)
    assert drafter.config.has_input_proj == (e != 2 * hidden)


def test_parameter_layout_draft_vocab():
    drafter = Drafter(DrafterConfig(vocab_size=50, hidden_size=16, draft_vocab_size=20))
    got = {k: tuple(v.shape) for k, v in tree_flatten(drafter.parameters())}
    expected = reference_layout(20, 16, 32, 2)
    expected["draft_vocab_ids"] = (20,)
    assert got == expected


# ------------------------------------------------------------------ NumPy reference
def silu(x):
    return x / (1.0 + np.exp(-x))


def ref_warp_log_softmax(logits: np.ndarray, k: int = 50) -> np.ndarray:
    x = logits - logits.max()
    k = min(k, x.shape[0])
    kth = np.sort(x)[::-1][k - 1]
    x = np.where(x < kth, -50000.0, x)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def ref_beam_search(
    P: dict[str, np.ndarray],
    *,
    layers: int,
    input_proj: bool,
    rnn: bool,
    embedding: np.ndarray,
    hidden: np.ndarray,
    g0: int,
    width: int,
    length: int,
    vocab_ids: np.ndarray | None = None,
):
    """Returns beams (W, L), log-probs (W, L-1, V), scores (W,), and the smallest score gap
    that decided a selection (to rule out near-ties that float32 could resolve differently)."""
    P = {k: v.astype(np.float64) for k, v in P.items()}
    embedding = embedding.astype(np.float64)
    hidden = hidden.astype(np.float64).reshape(-1)
    n_hidden = hidden.shape[0]

    def to_llm(v):
        return int(v) if vocab_ids is None else int(vocab_ids[v])

    def head(state):
        x = np.concatenate([hidden, state])
        if input_proj:
            x = P["input_proj.weight"] @ x + P["input_proj.bias"]
        for i in range(layers):
            x = x + silu(P[f"lm_head.{i}.linear.weight"] @ x + P[f"lm_head.{i}.linear.bias"])
        return P[f"lm_head.{layers}.weight"] @ x

    beams = [[g0] for _ in range(width)]
    states = [np.zeros(n_hidden) for _ in range(width)]
    scores = [0.0] + [-5e4] * (width - 1)
    history: list[list[np.ndarray]] = [[] for _ in range(width)]
    min_gap = np.inf
    for _ in range(length - 1):
        new_states, log_probs = [], []
        for b in range(width):
            e = embedding[beams[b][-1]]
            if rnn:
                s = silu(P["rnn_w.weight"] @ e + P["rnn_u.weight"] @ states[b] + P["rnn_u.bias"])
            else:
                s = e + states[b]
            new_states.append(s)
            logits = head(s)
            srt = np.sort(logits)[::-1]
            if len(srt) > 50:
                min_gap = min(min_gap, srt[49] - srt[50])
            log_probs.append(ref_warp_log_softmax(logits))
        vocab = log_probs[0].shape[0]
        candidates = [
            (scores[b] + log_probs[b][v], b, v) for b in range(width) for v in range(vocab)
        ]
        candidates.sort(key=lambda c: -c[0])
        picked = candidates[: width + 1]
        gaps = [picked[i][0] - picked[i + 1][0] for i in range(len(picked) - 1)]
        min_gap = min(min_gap, *gaps)
        picked = picked[:width]
        beams = [beams[b] + [to_llm(v)] for _, b, v in picked]
        states = [new_states[b] for _, b, _ in picked]
        history = [history[b] + [log_probs[b]] for _, b, _ in picked]
        scores = [s for s, _, _ in picked]
    return np.array(beams), np.array(history), np.array(scores), min_gap


def run_both(model, drafter, *, seed, width, length, g0, vocab_ids=None, input_proj=None):
    cfg = drafter.config
    hidden = hidden_state(seed)
    beams, log_probs = drafter.beam_search(
        hidden, mx.array(g0), model.model.embed_tokens, width, length
    )
    mx.eval(beams, log_probs)
    ref = ref_beam_search(
        params_np(drafter),
        layers=cfg.num_draft_layers,
        input_proj=cfg.exit_dim != 2 * cfg.hidden_size if input_proj is None else input_proj,
        rnn=cfg.rnn,
        embedding=np.array(model.model.embed_tokens.weight),
        hidden=np.array(hidden),
        g0=g0,
        width=width,
        length=length,
        vocab_ids=vocab_ids,
    )
    return np.array(beams), np.array(log_probs), ref


def assert_matches_reference(got_beams, got_lp, ref, width, length, vocab):
    ref_beams, ref_lp, _, gap = ref
    # float32 and float64 log-probs differ by rounding, far below this margin: a decision
    # closer than it could go either way, so such data would make the test meaningless.
    assert gap > 5e-5, f"test data has a near-tie (gap {gap}); pick another seed"
    assert got_beams.shape == (width, length)
    assert got_beams.dtype == np.int32
    assert got_lp.shape == (width, length - 1, vocab)
    np.testing.assert_array_equal(got_beams, ref_beams)
    # kept entries to 1e-4; the -50000-filled ones to float32 resolution at that magnitude
    np.testing.assert_allclose(got_lp, ref_lp, rtol=1e-6, atol=1e-4)


SHAPES = [(1, 2), (1, 5), (2, 3), (4, 4), (5, 2), (8, 5)]


@pytest.mark.parametrize("width,length", SHAPES)
def test_beam_search_matches_reference(model, width, length):
    drafter = make_drafter(model)
    got_beams, got_lp, ref = run_both(
        model, drafter, seed=10 * width + length, width=width, length=length, g0=7
    )
    assert_matches_reference(got_beams, got_lp, ref, width, length, VOCAB)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rnn=False),
        dict(exit_dim=48),
        dict(exit_dim=80, num_draft_layers=1),
        dict(num_draft_layers=0),
    ],
    ids=["no-rnn", "input-proj", "input-proj-1-layer", "no-resblocks"],
)
@pytest.mark.parametrize("width,length", [(1, 4), (4, 4)])
def test_beam_search_variants_match_reference(model, kw, width, length):
    drafter = make_drafter(model, seed=3, **kw)
    if "exit_dim" in kw:
        assert hasattr(drafter, "input_proj")
    got_beams, got_lp, ref = run_both(
        model, drafter, seed=5 + width, width=width, length=length, g0=100, input_proj=None
    )
    assert_matches_reference(got_beams, got_lp, ref, width, length, VOCAB)


def test_beam_search_hidden_shapes_agree(model):
    drafter = make_drafter(model)
    h = hidden_state(1)
    emb = model.model.embed_tokens
    b1, lp1 = drafter.beam_search(h, mx.array(3), emb, 4, 4)
    b2, lp2 = drafter.beam_search(h.reshape(1, -1), mx.array([3]), emb, 4, 4)
    np.testing.assert_array_equal(np.array(b1), np.array(b2))
    np.testing.assert_array_equal(np.array(lp1), np.array(lp2))


# ------------------------------------------------------------------ beam search properties
@pytest.mark.parametrize("width", [1, 2, 8, 50])
def test_first_step_fans_out_from_beam_zero(model, width):
    drafter = make_drafter(model)
    beams, lp = drafter.beam_search(
        hidden_state(2), mx.array(9), model.model.embed_tokens, width, 2
    )
    beams, lp = np.array(beams), np.array(lp)
    assert np.all(beams[:, 0] == 9)
    assert len(set(beams[:, 1].tolist())) == width
    # every beam's history is beam 0's first-step distribution, and the tokens are its top W
    np.testing.assert_array_equal(lp[:, 0], np.broadcast_to(lp[0, 0], lp[:, 0].shape))
    top = np.argsort(-lp[0, 0], kind="stable")[:width]
    np.testing.assert_array_equal(beams[:, 1], top)
    if width == 50:
        # the fan-out used exactly the 50 tokens the warp keeps
        assert np.all(lp[0, 0, beams[:, 1]] > -1000)


@pytest.mark.parametrize("width,length", [(2, 4), (8, 5), (16, 3)])
def test_scores_non_increasing(model, width, length):
    drafter = make_drafter(model)
    beams, lp = drafter.beam_search(
        hidden_state(4), mx.array(11), model.model.embed_tokens, width, length
    )
    beams, lp = np.array(beams), np.array(lp)
    steps = np.arange(length - 1)
    scores = np.array([lp[b, steps, beams[b, 1:]].sum() for b in range(width)])
    assert np.all(scores > -1000), "all beams should descend from beam 0 through kept tokens"
    assert np.all(np.diff(scores) <= 1e-5), scores
    # the beams are distinct sequences
    assert len({tuple(r) for r in beams.tolist()}) == width


@pytest.mark.parametrize("n_draft,width,length", [(80, 4, 4), (80, 1, 3), (40, 6, 3)])
def test_reduced_vocab(model, n_draft, width, length):
    rng = np.random.default_rng(n_draft + width)
    ids = rng.permutation(VOCAB)[:n_draft].astype(np.int32)
    g0 = int(np.setdiff1d(np.arange(VOCAB), ids)[0])  # g0 outside the map
    drafter = make_drafter(model, seed=5, draft_vocab_size=n_draft)
    drafter.draft_vocab_ids = mx.array(ids)
    got_beams, got_lp, ref = run_both(
        model, drafter, seed=20, width=width, length=length, g0=g0, vocab_ids=ids
    )
    assert_matches_reference(got_beams, got_lp, ref, width, length, n_draft)
    assert np.all(got_beams[:, 0] == g0)
    assert set(got_beams[:, 1:].reshape(-1).tolist()) <= set(ids.tolist())

    full = np.array(drafter.full_vocab_log_probs(mx.array(got_lp)))
    assert full.shape == (width, length - 1, VOCAB)
    np.testing.assert_array_equal(full[..., ids], got_lp)
    outside = np.setdiff1d(np.arange(VOCAB), ids)
    assert np.all(np.isneginf(full[..., outside]))
    # the drafted tokens' log-probs read the same in both vocabularies
    inverse = {int(t): i for i, t in enumerate(ids)}
    for b in range(width):
        for t in range(length - 1):
            tok = int(got_beams[b, t + 1])
            assert full[b, t, tok] == got_lp[b, t, inverse[tok]]


def test_full_vocab_log_probs_identity_without_map(model):
    drafter = make_drafter(model)
    x = mx.array(np.random.default_rng(0).normal(size=(3, 2, VOCAB)).astype(np.float32))
    np.testing.assert_array_equal(np.array(drafter.full_vocab_log_probs(x)), np.array(x))


@pytest.mark.parametrize("width,length", [(0, 4), (51, 4), (4, 1), (1, 0), (-1, 3)])
def test_check_beam_shape_rejects(model, width, length):
    with pytest.raises(ValueError):
        check_beam_shape(width, length)
    drafter = make_drafter(model)
    with pytest.raises(ValueError):
        drafter.beam_search(hidden_state(0), mx.array(1), model.model.embed_tokens, width, length)


@pytest.mark.parametrize("width,length", [(1, 2), (50, 2), (3, 7)])
def test_check_beam_shape_accepts(width, length):
    check_beam_shape(width, length)


# ------------------------------------------------------------------ warp
def test_warp_log_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 200)).astype(np.float32) * 5
    out = np.array(warp_log_softmax(mx.array(x)))
    assert out.shape == x.shape
    np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    for row_x, row_out in zip(x, out, strict=True):
        order = np.argsort(-row_x)
        top, rest = order[:50], order[50:]
        assert np.all(row_out[rest] <= -49000)
        assert np.all(row_out[top] > -1000)
        # kept entries shift by one constant: differences and order are preserved
        shift = row_out[top] - row_x[top]
        np.testing.assert_allclose(shift, shift[0], atol=1e-4)
        np.testing.assert_array_equal(np.argsort(-row_out[top], kind="stable"), np.arange(50))
        np.testing.assert_allclose(
            row_out, ref_warp_log_softmax(row_x.astype(np.float64)), rtol=1e-6, atol=1e-4
        )


def test_warp_log_softmax_small_vocab_is_log_softmax():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 30)).astype(np.float32) * 4
    out = np.array(warp_log_softmax(mx.array(x)))
    x64 = x.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    expected = x64 - m - np.log(np.exp(x64 - m).sum(-1, keepdims=True))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_warp_log_softmax_keeps_ties_at_threshold():
    # "entries below the 50th largest" are warped: a tie at the 50th keeps them all
    x = np.zeros((1, 100), dtype=np.float32)
    out = np.array(warp_log_softmax(mx.array(x)))
    np.testing.assert_allclose(out, -np.log(100.0), atol=1e-5)


@pytest.mark.parametrize(
    "shape,k", [((6, 200), 50), ((2, 3, 300), 50), ((4, 30), 50), ((3, 90), 7)]
)
def test_top_k_log_probs_are_the_warped_entries(shape, k):
    # the beam search reads only these: they must be the top-k ids and the warp's values there
    rng = np.random.default_rng(sum(shape) + k)
    x = (rng.normal(size=shape) * 5).astype(np.float32)
    ids, values = top_k_log_probs(mx.array(x), k)
    ids, values = np.array(ids), np.array(values)
    kk = min(k, shape[-1])
    assert ids.shape == values.shape == (*shape[:-1], kk)
    assert ids.dtype == np.int32
    warped = np.array(warp_log_softmax(mx.array(x), k))
    for row_x, row_ids, row_values, row_warped in zip(
        x.reshape(-1, shape[-1]),
        ids.reshape(-1, kk),
        values.reshape(-1, kk),
        warped.reshape(-1, shape[-1]),
        strict=True,
    ):
        assert set(row_ids.tolist()) == set(np.argsort(-row_x)[:kk].tolist())
        np.testing.assert_allclose(row_values, row_warped[row_ids], rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------ checkpoint io
def assert_same_weights(a: Drafter, b: Drafter) -> None:
    pa, pb = params_np(a), params_np(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.parametrize(
    "kw", [dict(), dict(exit_dim=48, num_draft_layers=1), dict(draft_vocab_size=60)]
)
def test_save_load_round_trip(model, tmp_path, kw):
    drafter = make_drafter(model, seed=7, **kw)
    if "draft_vocab_size" in kw:
        ids = np.random.default_rng(0).permutation(VOCAB)[:60].astype(np.int32)
        drafter.draft_vocab_ids = mx.array(ids)
    drafter.save_pretrained(tmp_path / "d")
    assert (tmp_path / "d" / "config.json").is_file()
    assert (tmp_path / "d" / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["model_type"] == MODEL_TYPE
    loaded = Drafter.from_pretrained(tmp_path / "d")
    assert loaded.config == drafter.config
    assert_same_weights(drafter, loaded)
    h, emb = hidden_state(3), model.model.embed_tokens
    b1, lp1 = drafter.beam_search(h, mx.array(5), emb, 4, 4)
    b2, lp2 = loaded.beam_search(h, mx.array(5), emb, 4, 4)
    np.testing.assert_array_equal(np.array(b1), np.array(b2))
    np.testing.assert_array_equal(np.array(lp1), np.array(lp2))


def test_load_reference_style_checkpoint(tmp_path):
    """A reference-layout checkpoint (float16 weights, extra config fields) loads."""
    rng = np.random.default_rng(0)
    layout = reference_layout(40, 8, 16, 2)
    weights = {k: rng.normal(size=s).astype(np.float16) for k, s in layout.items()}
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "vocab_size": 40,
                "hidden_size": 8,
                "exit_dim": 16,
                "num_draft_layers": 2,
                "num_lookback_tokens": 1,
                "rnn": True,
                "torch_dtype": "float16",
                "model_type": MODEL_TYPE,
                "architectures": ["ReDrafterModel"],
            }
        )
    )
    d = Drafter.from_pretrained(tmp_path)
    got = params_np(d)
    assert got.keys() == weights.keys()
    for k, v in weights.items():
        np.testing.assert_array_equal(got[k].astype(np.float16), v, err_msg=k)
    assert d.config.extra == {"architectures": ["ReDrafterModel"]}


def write_reference_checkpoint(folder, drafter, *, config_edits=None, extra_weights=None):
    """Save `drafter` as a reference checkpoint would hold it: no `rnn_*` weights when `rnn` is
    false, plus any `extra_weights`; `config_edits` maps a field to a value (None deletes it)."""
    weights = dict(tree_flatten(drafter.parameters()))
    if not drafter.config.rnn:
        weights = {k: v for k, v in weights.items() if not k.startswith("rnn_")}
    weights.update(extra_weights or {})
    config = drafter.config.to_dict()
    for key, value in (config_edits or {}).items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


def assert_same_beams(a: Drafter, b: Drafter, model) -> None:
    for seed in range(3):
        h = hidden_state(seed)
        beams_a, lp_a = a.beam_search(h, mx.array(7 + seed), model.model.embed_tokens, 4, 5)
        beams_b, lp_b = b.beam_search(h, mx.array(7 + seed), model.model.embed_tokens, 4, 5)
        np.testing.assert_array_equal(np.array(beams_a), np.array(beams_b))
        np.testing.assert_array_equal(np.array(lp_a), np.array(lp_b))


@pytest.mark.parametrize("rnn_field", [False, None], ids=["rnn-false", "no-rnn-field"])
def test_load_reference_checkpoint_without_rnn_weights(model, tmp_path, rnn_field):
    """`rnn: false` (or no `rnn`: the reference's default is false) stores no rnn_* weights."""
    import mlx_redrafter
    from mlx_redrafter.benchmarks.tiny import save_tiny_model_dir

    drafter = make_drafter(model, seed=5, rnn=False)
    model_dir = save_tiny_model_dir(tmp_path / "model", with_drafter=False)
    write_reference_checkpoint(model_dir / "drafter", drafter, config_edits={"rnn": rnn_field})
    loaded = Drafter.from_pretrained(model_dir / "drafter")
    assert loaded.config.rnn is False
    assert_same_beams(loaded, drafter, model)
    _, _, through_load = mlx_redrafter.load(model_dir)
    assert through_load is not None and through_load.config.rnn is False
    assert_same_beams(through_load, drafter, model)


def test_load_reference_checkpoint_with_unused_emb_norm(model, tmp_path):
    """The reference MLX port's `emb_norm: true` checkpoints carry an RMSNorm its forward never
    applies: it is dropped, weight and config fields, and the beams are the drafter's own."""
    drafter = make_drafter(model, seed=6)
    write_reference_checkpoint(
        tmp_path / "d",
        drafter,
        config_edits={"emb_norm": True, "rms_norm_eps": 1e-5},
        extra_weights={"emb_norm.weight": mx.random.normal((H,)) + 3.0},
    )
    loaded = Drafter.from_pretrained(tmp_path / "d")
    assert "emb_norm" not in loaded.config.extra and "emb_norm" not in loaded.config.to_dict()
    assert "emb_norm.weight" not in dict(tree_flatten(loaded.parameters()))
    assert_same_beams(loaded, drafter, model)


@pytest.fixture
def saved(model, tmp_path):
    drafter = make_drafter(model, seed=7)
    path = tmp_path / "drafter"
    drafter.save_pretrained(path)
    return path


def rewrite_weights(path, edit) -> None:
    weights = mx.load(str(path / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        Drafter.from_pretrained(tmp_path / "nope")


def test_load_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Drafter.from_pretrained(saved)


def test_load_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Drafter.from_pretrained(saved)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_load_truncated_weights(saved, keep):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="model.safetensors"):
        Drafter.from_pretrained(saved)


def test_load_bad_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Drafter.from_pretrained(saved)


def test_load_missing_key(saved):
    rewrite_weights(saved, lambda w: w.pop("rnn_w.weight"))
    with pytest.raises(ValueError, match=r"rnn_w\.weight"):
        Drafter.from_pretrained(saved)


def test_load_extra_key(saved):
    rewrite_weights(saved, lambda w: w.__setitem__("lm_head.9.linear.weight", mx.zeros((2, 2))))
    with pytest.raises(ValueError, match=r"lm_head\.9\.linear\.weight"):
        Drafter.from_pretrained(saved)


def test_load_wrong_shape(saved):
    rewrite_weights(saved, lambda w: w.__setitem__("rnn_u.bias", mx.zeros((65,))))
    with pytest.raises(ValueError) as err:
        Drafter.from_pretrained(saved)
    msg = str(err.value)
    assert "rnn_u.bias" in msg and "(65,)" in msg and "(64,)" in msg


def test_load_transposed_weight(model, tmp_path):
    """A weight stored [in, out] instead of torch's [out, in] is caught and named."""
    make_drafter(model, exit_dim=48).save_pretrained(tmp_path)
    rewrite_weights(
        tmp_path, lambda w: w.__setitem__("input_proj.weight", w["input_proj.weight"].T)
    )
    with pytest.raises(ValueError) as err:
        Drafter.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "input_proj.weight" in msg and "(128, 48)" in msg and "(48, 128)" in msg


def test_batched_beam_search_equals_one_search_per_row():
    from mlx_redrafter.benchmarks.tiny import make_drafter, make_model

    model = make_model("llama")
    drafter = make_drafter(model, seed=3)
    embed = model.model.embed_tokens
    hidden = mx.random.normal((5, 64), key=mx.random.key(1)) * 3
    first = mx.array([3, 9, 27, 81, 100])
    beams, log_probs = drafter.beam_search_batch(hidden, first, embed, 4, 4)
    assert beams.shape == (5, 4, 4) and log_probs.shape == (5, 4, 3, 128)
    for row in range(5):
        b, lp = drafter.beam_search(hidden[row], first[row], embed, 4, 4)
        assert mx.array_equal(beams[row], b).item()
        assert mx.allclose(log_probs[row], lp, atol=1e-5).item()


def test_vocabulary_map_is_not_trainable():
    from mlx.utils import tree_flatten

    drafter = Drafter(DrafterConfig(vocab_size=128, hidden_size=16, draft_vocab_size=8))
    trainable = dict(tree_flatten(drafter.trainable_parameters()))
    assert "draft_vocab_ids" not in trainable
    assert "draft_vocab_ids" in dict(tree_flatten(drafter.parameters()))

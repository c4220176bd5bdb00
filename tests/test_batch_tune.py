"""The speculation shape per batch size: the cost model, the chooser with an injected t(B, N),
the measured curve through the batch engine's seam, the cached table, and batched decoding
that switches shapes between steps (drafting at few rows, plain steps at many) and stays
lossless per row across the switch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_batch_generate import (
    assert_lossless,
    model_for,
    no_eos,
    prompts_for,
    reference,
)

from mlx_redrafter import batch as batch_mod
from mlx_redrafter.batch import BatchGenerator, batch_generate, shape_for
from mlx_redrafter.benchmarks.tiny import VOCAB, BatchOracleDrafter, make_drafter
from mlx_redrafter.tuning import batch_costs
from mlx_redrafter.tuning.batch_choose import (
    PLAIN,
    batch_autotune,
    batch_estimates,
    choose_per_batch,
    confirm_per_batch,
    padded_copy_length,
    predicted_batch_tps,
    table_from_record,
)
from mlx_redrafter.tuning.batch_costs import (
    batch_draft_costs,
    batch_forward_cost_curve,
    batch_sizes_up_to,
)
from mlx_redrafter.tuning.costs import sample_states

BATCHES = (1, 2, 4, 8)


def fake_curve(batches=BATCHES, sizes=(1, 2, 4, 8, 16)) -> dict[tuple[int, int], float]:
    """A CPU-like t(B, N): a fixed part (weights read once) and a part growing with B x N."""
    return {(b, n): 0.010 + 0.001 * b * n for b in batches for n in sizes}


def fake_drafts(batches=BATCHES) -> dict:
    return {(b, 2, 3): {"draft_s": 0.002, "tree_size": 5.0} for b in batches}


FAKE_ACCEPTANCE = {(2, 3, 0): 2.0}  # tokens per row per step with W=2, L=3


# ---------------------------------------------------------------------------- the cost model
def test_predicted_tps_and_padded_copy_by_hand():
    assert predicted_batch_tps(4, 2.0, 0.03, 0.01, 0.01) == pytest.approx(4 * 2.0 / 0.05)
    with pytest.raises(ValueError, match="must take some time"):
        predicted_batch_tps(1, 1.0, 0.0, 0.0)
    assert padded_copy_length(0, 3.0, 4) == 0.0
    # every row proposes: the padded tree gets all N copied tokens whatever B
    assert padded_copy_length(8, 8.0, 1) == pytest.approx(8.0)
    # a row proposes half the time: P(some row of 3 proposes) = 1 - 0.5^3
    assert padded_copy_length(8, 4.0, 3) == pytest.approx(8 * (1 - 0.5**3))
    assert batch_sizes_up_to(8) == [1, 2, 4, 8] and batch_sizes_up_to(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="must be >= 1"):
        batch_sizes_up_to(0)


def test_chooser_drafts_at_one_row_and_switches_drafting_off_at_eight():
    estimates = batch_estimates(BATCHES, FAKE_ACCEPTANCE, fake_curve(), fake_drafts())
    by = {(e.batch, e.option): e for e in estimates}
    # B = 1: plain 1 / 0.011 tokens/s; drafting 2 / (0.015 + 0.002)
    assert by[(1, PLAIN)].predicted_tps == pytest.approx(1 / 0.011)
    assert by[(1, (2, 3, 0))].predicted_tps == pytest.approx(2 / 0.017)
    # B = 8: plain 8 / 0.018; drafting 16 / (0.010 + 0.040 + 0.002)
    assert by[(8, PLAIN)].predicted_tps == pytest.approx(8 / 0.018)
    assert by[(8, (2, 3, 0))].predicted_tps == pytest.approx(16 / 0.052)
    table = choose_per_batch(estimates)
    assert table[1] == (2, 3, 0) and table[8] == PLAIN
    # drafting stops paying once B x (5 - 1) x 1 ms outgrows what the second token buys
    assert table == {1: (2, 3, 0), 2: (2, 3, 0), 4: PLAIN, 8: PLAIN}


def test_chooser_needs_every_cost():
    curve = {k: v for k, v in fake_curve().items() if k != (4, 1)}
    with pytest.raises(ValueError, match="no N = 1 forward at B = 4"):
        batch_estimates(BATCHES, FAKE_ACCEPTANCE, curve, fake_drafts())
    with pytest.raises(ValueError, match="no beam-search cost for B=8 W=2 L=3"):
        batch_estimates(BATCHES, FAKE_ACCEPTANCE, fake_curve(), fake_drafts((1, 2, 4)))


def test_shape_for_takes_the_smallest_tabled_batch_at_or_above():
    table = {1: (2, 3, 0), 2: (1, 2, 0), 4: PLAIN}
    assert [shape_for(table, b) for b in (1, 2, 3, 4, 9)] == [
        (2, 3, 0), (1, 2, 0), PLAIN, PLAIN, PLAIN,
    ]  # fmt: skip


# ---------------------------------------------------------------------------- measured costs
def test_batch_cost_curve_times_the_engines_seam_in_rounds(monkeypatch):
    model = model_for("llama")
    calls = []
    real = batch_mod.batch_verify

    def counted(model, cache, padded):
        calls.append((cache[0].batch_size, padded.tokens.shape[1], cache[0].lengths.tolist()))
        return real(model, cache, padded)

    monkeypatch.setattr(batch_costs, "batch_verify", counted)
    curve = batch_forward_cost_curve(model, [1, 3], [1, 4], cache_len=10, repeats=2, warmup=1)
    assert set(curve) == {(1, 1), (1, 4), (3, 1), (3, 4)}
    assert all(t > 0 for t in curve.values())
    # three rounds (one warm-up) over every cell, each cell once per round
    assert [(b, n) for b, n, _ in calls] == [(1, 1), (1, 4), (3, 1), (3, 4)] * 3
    # every forward sees the filled rows at their own length: nothing was committed
    assert all(lengths == [10] * b for b, _, lengths in calls)


def test_batch_draft_costs_measure_the_padded_tree():
    model = model_for("llama")
    drafter = make_drafter(model, seed=3)
    rng = np.random.default_rng(0)
    states = sample_states(model, [rng.integers(3, VOCAB, 12).tolist()], count=4)
    costs = batch_draft_costs(model, drafter, [1, 4], [(2, 3), (1, 2)], states, repeats=1)
    assert set(costs) == {(1, 2, 3), (1, 1, 2), (4, 2, 3), (4, 1, 2)}
    for (_, w, n), c in costs.items():
        assert c["draft_s"] > 0
        assert n <= c["tree_size"] <= 1 + w * (n - 1)  # a chain at least, W full branches at most
    assert costs[(4, 2, 3)]["tree_size"] >= costs[(1, 2, 3)]["tree_size"]  # the largest row's
    with pytest.raises(ValueError, match="no states"):
        batch_draft_costs(model, drafter, [1], [(1, 2)], [])


# ---------------------------------------------------------------------------- the switch
FAKE_TABLE = choose_per_batch(
    batch_estimates(BATCHES, FAKE_ACCEPTANCE, fake_curve(), fake_drafts())
)


def test_rows_stay_lossless_as_the_shape_switches_with_the_number_of_rows():
    """Rows ending at different steps: plain steps while 3 or more run (the fake table),
    drafting with W=2 L=3 once 2 or fewer are left; then 3 rows join the single running row
    and drafting stops again. Every row equals its own greedy decoding."""
    name = "llama"
    model = model_for(name)
    prompts = prompts_for(8, seed=21)
    max_tokens = [6, 8, 10, 12, 60, 14, 16, 30]
    sequences = [p + reference(name, tuple(p), m) for p, m in zip(prompts, max_tokens, strict=True)]
    drafter = BatchOracleDrafter(model, sequences, VOCAB, seed=2)
    gen = BatchGenerator(model, drafter, shape_table=FAKE_TABLE, completion_batch_size=8)
    uids = gen.insert(prompts[:5], max_tokens[:5])
    got: dict[int, list[int]] = {}
    seen = []  # (active rows, the step's option, padded tree size)
    joined = False
    while gen.busy:
        if not joined and gen.active == 1:  # rows join a running row: back to plain steps
            uids += gen.insert(prompts[5:], max_tokens[5:])
            joined = True
        active = gen.active
        responses = gen.next()
        if active:
            seen.append((active, gen.shape, responses[0].padded_size))
        for r in responses:
            got.setdefault(r.uid, []).extend(r.tokens)
    assert joined
    for active, option, padded in seen:
        assert option == shape_for(FAKE_TABLE, active)
        assert (padded == 1) == (option == PLAIN)  # plain steps verify one token a row
    options = [o for _, o, _ in seen]
    assert PLAIN in options and (2, 3, 0) in options
    # plain, drafting, plain again once rows joined, drafting at the end
    switches = [i for i in range(1, len(options)) if options[i] != options[i - 1]]
    assert len(switches) >= 3 and options[0] == PLAIN
    for prompt, m, uid in zip(prompts, max_tokens, uids, strict=True):
        assert len(got[uid]) == m
        assert_lossless(name, prompt, reference(name, tuple(prompt), m), got[uid])


# ---------------------------------------------------------------------------- the tuned table
def test_auto_shape_is_tuned_per_batch_size_cached_and_lossless(tmp_path):
    name = "qwen3"
    model = model_for(name)
    drafter = make_drafter(model, seed=4)
    tokenizer = no_eos()
    tokenizer._tokenizer.chat_template = None
    tune = dict(prompts=["t5 t6 t7", "t9 t10"], max_tokens=8, cache_len=8, repeats=1)
    record = batch_autotune(
        model, drafter, tokenizer, 4, shapes=[(1, 2), (2, 3)], lookups=(0, 3),
        cache_dir=tmp_path, confirm=False, **tune,
    )  # fmt: skip
    table = table_from_record(record)
    assert sorted(table) == [1, 2, 4]
    options = {e["batch"]: [] for e in record["estimates"]}
    for e in record["estimates"]:
        options[e["batch"]].append(tuple(e[k] for k in ("beam_width", "beam_length")))
    # plain steps, each shape alone and with lookup, lookup alone: 6 options per batch size
    assert all(len(v) == 6 for v in options.values())
    for b, option in table.items():
        best = max(
            (e for e in record["estimates"] if e["batch"] == b), key=lambda e: e["predicted_tps"]
        )
        assert best["predicted_tps"] <= 1.005 * next(
            e["predicted_tps"]
            for e in record["estimates"]
            if e["batch"] == b and (e["beam_width"], e["beam_length"], e["prompt_lookup"]) == option
        )
    assert record["key"]["batch"] == [1, 2, 4] and record["confirmed"] is False
    assert set(record["forward_curve_s"]) >= {"1,1", "2,1", "4,1"}
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["table"] == record["table"]
    again = batch_autotune(
        model, drafter, tokenizer, 4, shapes=[(1, 2), (2, 3)], lookups=(0, 3),
        cache_dir=tmp_path, confirm=False, **tune,
    )  # fmt: skip
    assert again["cached"] == str(files[0]) and again["table"] == record["table"]
    # 'auto' through batch_generate: W pinned to 2, L tuned, no lookup; rows lossless
    prompts, max_tokens = prompts_for(3, seed=5), [9, 12, 7]
    response = batch_generate(
        model, tokenizer, prompts, drafter, max_tokens=max_tokens, beam_width=2,
        beam_length="auto", prompt_lookup=0, completion_batch_size=4,
        tune=dict(tune, cache_dir=tmp_path),
    )  # fmt: skip
    records = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert len(records) == 2
    tuned = next(r for r in records if r["key"]["shapes"] == [[2, n] for n in range(2, 7)])
    assert all(o[0] in (0, 2) and o[2] == 0 for o in tuned["table"].values())
    # confirmed online: at each B the faster measured of plain steps and the best drafting one
    assert tuned["confirmed"] is True
    for b, option in tuned["table"].items():
        tps = tuned["confirmed_tps"][b]
        assert "W{}L{}N{}".format(*option) == max(tps, key=tps.get) and "W0L0N0" in tps
    for prompt, m, ids in zip(prompts, max_tokens, response.token_ids, strict=True):
        expected = reference(name, tuple(prompt), m)
        expected = expected[: expected.index(1)] if 1 in expected else expected
        assert_lossless(name, prompt, expected, ids)


def test_auto_without_a_drafter_tunes_the_lookup_alone(tmp_path):
    model = model_for("llama")
    tokenizer = no_eos()
    tokenizer._tokenizer.chat_template = None
    tune = dict(prompts=["t5 t6 t7 t5 t6 t7"], max_tokens=8, cache_len=8, repeats=1)
    gen = BatchGenerator(
        model, None, prompt_lookup="auto", tokenizer=tokenizer, completion_batch_size=2,
        tune=dict(tune, cache_dir=tmp_path),
    )  # fmt: skip
    assert sorted(gen.shape_table) == [1, 2]
    assert all(w == 0 and n == 0 and k in (0, 4, 8) for w, n, k in gen.shape_table.values())
    assert len(list(tmp_path.glob("*.json"))) == 1
    # a fixed lookup without a drafter leaves nothing to tune
    gen = BatchGenerator(model, None, beam_width="auto", prompt_lookup=3, tokenizer=tokenizer)
    assert gen.shape_table == {gen.completion_batch_size: (0, 0, 3)}


@pytest.mark.parametrize("slow", ["drafting", "plain"])
def test_confirmation_keeps_what_measures_faster_at_each_batch_size(monkeypatch, slow):
    """The prediction can miss per-row host work: online, with a clock that makes one kind
    of step slow, the confirmation keeps the other kind at every B."""
    model = model_for("llama")
    drafter = make_drafter(model)
    now = [0.0]
    real_next = BatchGenerator.next

    def timed_next(self):
        drafting = self.shape != PLAIN
        now[0] += 1.0 if drafting == (slow == "drafting") else 0.01
        return real_next(self)

    monkeypatch.setattr(BatchGenerator, "next", timed_next)
    prompts = prompts_for(3, seed=2)
    measured = confirm_per_batch(
        model, drafter, prompts, {1: [(1, 2, 0)], 2: [(2, 3, 0)], 4: [(1, 2, 3)]},
        max_tokens=6, clock=lambda: now[0],
    )  # fmt: skip
    assert sorted(measured) == [1, 2, 4]
    for tps in measured.values():
        best = max(tps, key=tps.get)
        assert (best == PLAIN) == (slow == "drafting"), tps

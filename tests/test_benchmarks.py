"""The benchmark harness: metric functions by hand, the profiling loop against the engine, and
a smoke run of `mlx_redrafter.benchmark` on a tiny random model (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter.benchmarks import metrics, resummarize
from mlx_redrafter.benchmarks.decoders import RunRecord, pristine_rope
from mlx_redrafter.benchmarks.profiling import profiled_decode
from mlx_redrafter.benchmarks.prompts import Question, quick_subset
from mlx_redrafter.benchmarks.run import check_match
from mlx_redrafter.benchmarks.tiny import (
    OracleDrafter,
    first_divergence_is_tie,
    make_drafter,
    make_model,
    make_tokenizer,
    reference_greedy,
)
from mlx_redrafter.generate import generate_step
from mlx_redrafter.tuning import ShapeEstimate, auto_grid, best_shape, choose_shape
from mlx_redrafter.tuning.costs import filled_cache, forward_cost_curve, interpolate
from mlx_redrafter.verify import TreeRoPE, prepare_model

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- metrics
def test_median_ratio_and_group_tps():
    assert metrics.median([3.0, 1.0, 2.0]) == 2.0
    assert metrics.median([None, 4.0]) == 4.0
    assert metrics.median_ratio([3.0, 1.0, 2.0], [2.0, 4.0, 6.0]) == pytest.approx(0.5)
    assert metrics.median_ratio([1.0], [None]) is None
    runs = [
        {"repeat": 0, "decode_s": 1.0, "generation_tokens": 10},
        {"repeat": 0, "decode_s": 3.0, "generation_tokens": 30},
        {"repeat": 1, "decode_s": 2.0, "generation_tokens": 10},
    ]
    assert metrics.group_tps(runs, 0) == pytest.approx(10.0)  # 40 tokens / 4 s
    assert metrics.group_tps(runs, 1) == pytest.approx(5.0)
    assert metrics.geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
    assert metrics.tokens_per_second(1, 0.5) is None  # a one-token answer has no decode time


def test_histograms_and_mean_accepted():
    assert metrics.accepted_histogram([1, 3, 3, 2], 4) == [0, 1, 1, 2, 0]
    assert metrics.accepted_histogram([], 2) == [0, 0, 0]
    assert metrics.add_histograms([[0, 1, 2], [0, 3]]) == [0, 4, 2]
    assert metrics.histogram_mean([0, 1, 1, 2]) == pytest.approx((1 + 2 + 6) / 4)
    # 9 generated tokens: the prefill's token + 8 from 4 verification forwards
    assert metrics.mean_accepted(9, 4) == 2.0
    assert metrics.mean_accepted(1, 0) is None


def test_first_divergence_and_eos_marking():
    assert metrics.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == 2
    assert metrics.with_eos([5, 6, 2, 7], eos_ids=[2], ended_by_eos=False) == [5, 6, metrics.EOS]
    assert metrics.with_eos([5, 6], eos_ids=[2], ended_by_eos=True) == [5, 6, metrics.EOS]
    assert metrics.token_at([5], 3) is None


def test_near_tie_rule():
    logits = np.array([1.0, 5.0, 5.00001, 0.0])  # top-2: ids 2 and 1, gap 1e-5 / 5.00001
    tie, gap = metrics.near_tie(logits, 2, 1)
    assert tie and gap == pytest.approx(1e-5 / 5.00001)
    assert not metrics.near_tie(logits, 2, 3)[0]  # 3 is not a contender
    assert metrics.near_tie(logits, metrics.EOS, 2, eos_ids=[1])[0]  # EOS = id 1 here
    assert not metrics.near_tie(logits, 2, None)[0]  # cut by max_tokens: never a tie
    tie, gap = metrics.near_tie(np.array([0.0, 4.0, 5.0]), 2, 1)
    assert not tie and gap == pytest.approx(0.2)


def test_ideal_predicted_and_efficiency():
    # 2 tokens per step, t(1) = 100 ms, verify 150 ms, draft 50 ms -> 2 * 100 / 200
    assert metrics.ideal_speedup(2.0, 0.1, 0.15, 0.05) == pytest.approx(1.0)
    assert metrics.efficiency(0.9, 1.0) == pytest.approx(0.9)
    assert metrics.efficiency(None, 1.0) is None
    # with 50 ms of per-step overhead on both sides: 2 * 150 / 250
    assert metrics.predicted_speedup(2.0, 0.1, 0.15, 0.05, 0.05) == pytest.approx(1.2)
    assert metrics.shares({"a": 1.0, "b": 3.0}) == {"a": 0.25, "b": 0.75}


def test_best_shape_prefers_smaller_tree_among_near_equal():
    def est(w, length, speedup, size):
        return ShapeEstimate(w, length, 1.0, [], size, 0.0, 0.0, speedup)

    estimates = [est(4, 5, 1.50, 13.0), est(2, 4, 1.497, 7.0), est(8, 6, 1.2, 30.0)]
    assert (best_shape(estimates).beam_width, best_shape(estimates).beam_length) == (2, 4)


def test_interpolate_and_quick_subset():
    assert interpolate({1: 1.0, 4: 2.5}, 2) == pytest.approx(1.5)
    assert interpolate({1: 1.0, 2: 2.0}, 4) == pytest.approx(4.0)  # extrapolated
    qs = [Question(str(i), c, ["x"]) for i, c in enumerate("aaabbc")]
    assert [q.question_id for q in quick_subset(qs, 4)] == ["0", "3", "5", "1"]


# ---------------------------------------------------------------------------- engine parts
def test_near_tie_agrees_with_the_tests_rule():
    model = make_model("llama")
    prompt = [3, 4, 5]
    expected = reference_greedy(model, prompt, 8)
    got = list(expected)
    got[3] = (got[3] + 1) % 128
    ok, diff, gap = first_divergence_is_tie(model, prompt, expected, got)

    def record(tokens):
        return RunRecord("x", tokens, False, len(tokens), 1.0, 1.0, 1.0, 0.0)

    match = check_match(model, prompt, record(expected), record(got), eos_ids=[2])
    assert match["first_divergence"] == diff == 3
    assert match["near_tie"] == ok
    assert match["gap"] == pytest.approx(gap, rel=1e-4)


@pytest.mark.parametrize("use", ["none", "random", "oracle"])
def test_profiled_decode_matches_the_engine(use):
    model = make_model("llama")
    prompt = [5, 6, 7, 8]
    reference = reference_greedy(model, prompt, 24)
    drafter = {
        "none": None,
        "random": make_drafter(model),
        "oracle": OracleDrafter(prompt + reference, len(prompt), 128),
    }[use]
    res = profiled_decode(model, drafter, prompt, max_tokens=24, beam_width=3, beam_length=4)
    assert res.tokens == reference
    assert sum(res.tokens_per_step) == len(res.tokens) - 1
    assert set(res.seconds) == {"draft", "pack", "verify", "accept", "commit", "other"}
    if use == "oracle":
        assert res.mean_accepted > 1.5
    steps = generate_step(
        mx.array(prompt), model, make_drafter(model), max_tokens=24, beam_width=3, beam_length=4
    )
    assert [t for new, _ in steps for t in new] == reference


@pytest.mark.parametrize("use", ["none", "drafter", "lookup"])
def test_a_probe_sees_every_phase_of_each_step_in_order(use):
    """The engine's hook: begin, the five phases, in order, once per verification step; the
    tokens are those of the run without a probe (with no draft source, one-token tree steps
    instead of the pipelined path)."""
    from mlx_redrafter.probe import PHASES

    class Recorder:
        def __init__(self):
            self.calls = []

        def begin(self):
            self.calls.append("begin")

        def phase(self, name, *arrays):
            self.calls.append(name)

        def accept(self, best, n, most):
            assert 0 <= n <= most
            self.calls.append("decision")
            return best, n

    model = make_model("llama")
    prompt = [5, 6, 7, 8, 5, 6, 7]
    drafter = make_drafter(model) if use == "drafter" else None
    kwargs = dict(max_tokens=16, beam_width=2, beam_length=3, guard=False)
    kwargs["prompt_lookup"] = 3 if use == "lookup" else 0
    plain = [t for new, _ in generate_step(mx.array(prompt), model, drafter, **kwargs) for t in new]
    recorder = Recorder()
    steps = list(generate_step(mx.array(prompt), model, drafter, probe=recorder, **kwargs))
    assert [t for new, _ in steps for t in new] == plain
    assert PHASES == ("draft", "pack", "verify", "accept", "commit")
    one = ["begin", "draft", "pack", "verify", "decision", "accept", "commit"]
    assert recorder.calls == one * (len(steps) - 1)


def test_forced_acceptance_sets_tokens_per_step():
    model = make_model("llama")
    res = profiled_decode(
        model,
        make_drafter(model),
        [5, 6, 7],
        max_tokens=31,
        beam_width=2,
        beam_length=4,
        sync=False,
        forced_accept=lambda: 2,
    )
    assert res.tokens_per_step == [3] * 10  # 1 + 10 steps x 3 tokens
    assert res.mean_accepted == 3.0


def test_cost_curve_restores_the_cache_and_pristine_rope_swaps_back():
    model = make_model("llama")
    prepare_model(model)
    cache = filled_cache(model, 40)
    curve = forward_cost_curve(model, [1, 2, 4], cache=cache, repeats=1)
    assert sorted(curve) == [1, 2, 4] and all(t > 0 for t in curve.values())
    assert cache[0].offset == 40
    with pristine_rope(model):
        assert not isinstance(model.layers[0].self_attn.rope, TreeRoPE)
    assert isinstance(model.layers[0].self_attn.rope, TreeRoPE)


def test_cost_curve_times_the_sizes_in_rounds_and_keeps_each_median(monkeypatch):
    """A slow phase of the machine must not land on one size alone: each round times every
    size once, the warm-up round is dropped, and a size's median ignores one slow round (here
    the first forward, a warm-up, and the fifth are slow)."""
    from mlx_redrafter.tuning import costs

    order, seconds = [], iter([9.0, 0.1, 0.1, 0.2, 9.0, 0.2, 0.1, 0.2, 0.1, 0.2])
    model = make_model("llama")
    prepare_model(model)
    cache = filled_cache(model, 8)

    def fake_forward(model, cache, tree, tree_tokens):
        order.append(tree.size)
        return next(seconds)

    monkeypatch.setattr(costs, "_synced_forward_s", fake_forward)
    curve = forward_cost_curve(model, [4, 1], cache=cache, repeats=4, warmup=1)
    assert order == [1, 4] * 5
    assert curve == {1: 0.1, 4: 0.2}


def _tuning_setup():
    """A tiny model, drafter and template-free tokenizer for `choose_shape`."""
    model = make_model("llama")
    prepare_model(model)
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.chat_template = None
    return model, make_drafter(model), tokenizer


def test_choose_shape_is_cached(tmp_path):
    model, drafter, tokenizer = _tuning_setup()
    kwargs = dict(
        prompts=["t5 t6 t7", "t9 t10"],
        shapes=[(1, 2), (2, 3)],
        max_tokens=12,
        cache_dir=tmp_path,
    )
    shape = choose_shape(model, drafter, tokenizer, **kwargs)
    assert shape in [(1, 2), (2, 3)]
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["choice"] == [*shape, 0] and len(record["estimates"]) == 2
    assert choose_shape(model, drafter, tokenizer, **kwargs) == shape  # from the cache
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_choose_shape_remeasures_after_an_engine_revision(tmp_path, monkeypatch):
    """A cached shape is tied to the step costs it was measured with."""
    import mlx_redrafter.tuning.cache as tuning_cache

    model, drafter, tokenizer = _tuning_setup()
    kwargs = dict(prompts=["t5 t6 t7"], shapes=[(1, 2)], max_tokens=8, cache_dir=tmp_path)
    first = choose_shape(model, drafter, tokenizer, **kwargs)
    monkeypatch.setattr(tuning_cache, "TUNER_VERSION", tuning_cache.TUNER_VERSION + 1)
    assert choose_shape(model, drafter, tokenizer, **kwargs) == first
    records = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert sorted(r["key"]["tuner"] for r in records) == [
        tuning_cache.TUNER_VERSION - 1,
        tuning_cache.TUNER_VERSION,
    ]


def test_cost_curve_and_metrics_reexport_the_engine_tuner_functions():
    """Scripts written against the benchmarks' modules keep working: same objects."""
    import mlx_redrafter.benchmarks.cost_curve as cost_curve
    import mlx_redrafter.tuning as tuning
    from mlx_redrafter.tuning import costs

    for name in ("forward_cost_curve", "draft_costs", "interpolate", "time_forward"):
        assert getattr(cost_curve, name) is getattr(costs, name)
    assert metrics.predicted_speedup is tuning.predicted_speedup


def test_auto_grid_pins_a_fixed_axis():
    assert auto_grid(2, "auto") == [(2, n) for n in (2, 3, 4, 5, 6)]
    assert auto_grid("auto", 7) == [(w, 7) for w in (1, 2, 3, 4, 8)]
    assert len(auto_grid("auto", "auto")) == 25


def test_stream_generate_accepts_auto_and_generate_step_asks_for_integers(tmp_path, monkeypatch):
    from mlx_redrafter.generate import stream_generate

    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    model = make_model("llama")
    drafter = make_drafter(model)
    tokenizer = make_tokenizer()
    prompt = [5, 6, 7, 8]
    tokens = [
        t
        for r in stream_generate(
            model,
            tokenizer,
            prompt,
            drafter=drafter,
            max_tokens=10,
            beam_width="auto",
            beam_length=3,
        )
        for t in r.tokens
    ]
    assert tokens == reference_greedy(model, prompt, 10)[: len(tokens)] and len(tokens) == 10
    record = json.loads(next((tmp_path / "autotune").glob("*.json")).read_text())
    width, length, _ = record["choice"]
    assert length == 3 if width else length == 0  # L pinned, or no RNN where it does not pay
    with pytest.raises(ValueError, match="auto"):
        generate_step(mx.array(prompt), model, drafter, beam_width="auto")


def test_auto_tunes_with_the_lookup_ngram_sizes_the_generation_uses(tmp_path, monkeypatch):
    """The tuner simulates and confirms the lookup with the caller's n-gram sizes (each
    PromptLookup it builds has them), and they are part of the cache key."""
    import mlx_redrafter.tuning.simulate as simulate_module
    from mlx_redrafter.generate import stream_generate
    from mlx_redrafter.lookup import PromptLookup

    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    built = []

    class Spy(PromptLookup):
        def __init__(self, tokens, max_draft, ngram_max=3, ngram_min=2):
            built.append((ngram_max, ngram_min))
            super().__init__(tokens, max_draft, ngram_max, ngram_min)

    monkeypatch.setattr(simulate_module, "PromptLookup", Spy)
    # the package exports a `generate` function: the module itself is in sys.modules
    monkeypatch.setattr(sys.modules["mlx_redrafter.generate"], "PromptLookup", Spy)
    model = make_model("llama")
    tokenizer = make_tokenizer()
    prompt = [5, 6, 7, 5, 6, 7, 5]
    for ngram_min in (1, 2):
        built.clear()
        options = dict(prompt_lookup="auto", lookup_ngram_max=4, lookup_ngram_min=ngram_min)
        tokens = [
            t
            for r in stream_generate(model, tokenizer, prompt, max_tokens=6, **options)
            for t in r.tokens
        ]
        assert tokens == reference_greedy(model, prompt, 6)[: len(tokens)] and len(tokens) == 6
        assert built and set(built) == {(4, ngram_min)}, built
    keys = [json.loads(f.read_text())["key"] for f in (tmp_path / "autotune").glob("*.json")]
    assert sorted(k["lookup_ngrams"] for k in keys) == [[4, 1], [4, 2]]
    with pytest.raises(ValueError, match="n-gram"):
        next(stream_generate(model, tokenizer, prompt, prompt_lookup="auto", lookup_ngram_min=0))


# ---------------------------------------------------------------------------- CLI smoke run
def _write_prompts(path: Path) -> Path:
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["t5 t6 t7", "t8 t9"]},
        {"question_id": 2, "category": "math", "turns": ["t10 t11", "t12"]},
        {"question_id": 3, "category": "writing", "turns": ["t13 t14", "t3"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_benchmark(tmp_path, *args):
    env = dict(os.environ, MLX_REDRAFTER_HOME=str(tmp_path / "home"))
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.benchmarks.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_benchmark_cli_smoke(tiny_model_dir, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    proc = _run_benchmark(
        tmp_path,
        *("--model", str(tiny_model_dir), "--prompts", str(prompts), "--limit", "2"),
        *("--turns", "2", "--max-tokens", "16", "--repeats", "2", "--out", str(out)),
        *("--draft-model", str(tiny_model_dir), "--curve-cache-len", "32"),
        *("--sweep", "--confirm", "1", "--sweep-prompts", "2", "--confirm-prompts", "1"),
        *("--beam-width", "auto", "--beam-length", "auto", "--profile-prompts", "2"),
        *("--prompt-lookup", "0", "--no-confirm", "--save-tokens"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = out.glob("*.json")
    results = json.loads(json_path.read_text())

    env = results["environment"]
    for key in ("date", "machine", "backend", "blas", "dtype", "model", "drafter", "versions"):
        assert env[key], key
    assert env["dtype"] == "float32" and "mlx" in env["versions"]
    assert set(results["decoders"]) == {"mlx_lm", "ours_ar", "redrafter", "draft_model"}

    prompts = results["prompts"]
    assert [(p["question_id"], p["turn"]) for p in prompts] == [
        ("1", 1),
        ("1", 2),
        ("2", 1),
        ("2", 2),
    ]
    assert prompts[1]["prompt_tokens"] > prompts[0]["prompt_tokens"]  # first answer in context
    for p in prompts:
        assert all(len(runs) == 2 for runs in p["runs"].values())
        base = [r["tps"] for r in p["runs"]["mlx_lm"]]
        for name, runs in p["runs"].items():
            expected = np.median([r["tps"] for r in runs]) / np.median(base)
            assert p["speedup"][name] == pytest.approx(expected)
        assert set(p["match"]) == {"ours_ar", "redrafter", "draft_model"}
        for m in p["match"].values():
            assert m["exact"] or m["near_tie"], m  # exact-match check ran, lossless

    overall = results["summary"]["overall"]
    for name in results["decoders"]:
        per_repeat = []
        for r in range(2):
            runs = [p["runs"][name][r] for p in prompts]
            per_repeat.append(
                sum(x["generation_tokens"] for x in runs) / sum(x["decode_s"] for x in runs)
            )
        assert overall[name]["tps_per_repeat"] == pytest.approx(per_repeat)
        base = overall["mlx_lm"]["tps_per_repeat"]
        assert overall[name]["speedup"] == pytest.approx(np.median(per_repeat) / np.median(base))
    rd = overall["redrafter"]
    assert rd["match"]["compared"] == 4
    assert rd["mean_accepted"] >= 1.0 and sum(rd["accepted_hist"]) > 0
    assert set(results["summary"]["categories"]) == {"writing", "math"}

    assert results["profile"]["phases"]["redrafter"]["shares"].keys() == {
        "draft",
        "verify",
        "accept_commit",
    }
    assert all(results["profile"]["profiled_output_matches_mlx_lm"])
    assert results["profile"]["ideal"]["ideal_speedup"] > 0
    assert set(results["verify_cost_curve"]["relative"]) == {str(2**i) for i in range(8)}
    assert len(results["sweep"]["estimates"]) == 25 and results["sweep"]["confirmed"]
    assert results["autotune"]["choice"] == [
        results["config"]["beam_width"],
        results["config"]["beam_length"],
        results["config"]["prompt_lookup"],
    ]

    md = json_path.with_suffix(".md").read_text()
    for text in (
        "speedup vs mlx-lm",
        "exact match",
        "Where time goes",
        "Ideal speedup",
        "Verify-cost curve",
        "Sweep",
        "Auto shape",
        "OpenBLAS" if "OpenBLAS" in env["blas"] else "BLAS",
    ):
        assert text in md, text
    pytest.importorskip("matplotlib")
    assert len(list(out.glob("*.png"))) == 3

    # 16 tokens cannot hold a 16-token run twice: every answer is loop-free
    loop_free = results["summary"]["loop_free"]
    assert (loop_free["prompts"], loop_free["of"]) == (4, 4)
    assert [p["greedy_loop"] for p in prompts] == [False] * 4
    assert "loop-free answers (4 of 4)" in md

    # a rebuilt summary: make one mlx-lm answer a greedy loop, the timings stay as measured
    prompts[2]["runs"]["mlx_lm"][0]["tokens"] = list(range(16)) * 2
    json_path.write_text(json.dumps(results))
    assert resummarize.main([str(json_path)]) == 0
    rebuilt = json.loads(json_path.read_text())
    assert [p["greedy_loop"] for p in rebuilt["prompts"]] == [False, False, True, False]
    assert rebuilt["summary"]["overall"] == results["summary"]["overall"]
    loop_free = rebuilt["summary"]["loop_free"]
    assert (loop_free["prompts"], loop_free["of"]) == (3, 4)
    kept = [p for i, p in enumerate(prompts) if i != 2]
    for name in results["decoders"]:
        tps = [
            sum(p["runs"][name][r]["generation_tokens"] for p in kept)
            / sum(p["runs"][name][r]["decode_s"] for p in kept)
            for r in range(2)
        ]
        assert loop_free["summary"][name]["tps_per_repeat"] == pytest.approx(tps)
    assert "loop-free answers (3 of 4)" in json_path.with_suffix(".md").read_text()


def test_resummarize_refuses_a_run_without_saved_tokens(tmp_path, capsys):
    results = {
        "decoders": {"mlx_lm": {"kind": "mlx_lm"}},
        "config": {"repeats": 1},
        "prompts": [{"question_id": "7", "runs": {"mlx_lm": [{"tps": 1.0}]}}],
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    assert resummarize.main([str(path)]) == 2
    assert "prompt 7 has no saved output tokens" in capsys.readouterr().err
    assert json.loads(path.read_text()) == results  # untouched
    assert not path.with_suffix(".md").exists()
    assert resummarize.main([str(tmp_path / "missing.json")]) == 2


def test_benchmark_cli_sampling_and_no_drafter(tiny_model_dir, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    proc = _run_benchmark(
        tmp_path,
        *("--model", str(tiny_model_dir), "--prompts", str(prompts), "--limit", "1"),
        *("--max-tokens", "8", "--temp", "0.8", "--no-curve", "--profile-prompts", "0"),
        *("--out", str(out), "--no-drafter", "--prompt-lookup", "3", "--name", "sampled"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = out.glob("*-sampled.json")
    results = json.loads(json_path.read_text())
    # no RNN drafter: the autoregressive paths and prompt lookup alone
    assert set(results["decoders"]) == {"mlx_lm", "ours_ar", "lookup"}
    assert results["decoders"]["lookup"]["prompt_lookup"] == 3
    assert "match" not in results["prompts"][0]  # no exact-match check when sampling
    assert results["config"]["repeats"] == 3


def test_benchmark_cli_reports_a_missing_prompt_file(tmp_path):
    proc = _run_benchmark(tmp_path, "--prompts", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_cost_curve_cli_reports_the_draft_to_forward_ratio(tiny_model_dir, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "cost.json"
    env = dict(os.environ, MLX_REDRAFTER_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.benchmarks.cost_curve"]
        + ["--model", str(tiny_model_dir)]
        + ["--prompts", str(prompts), "--shapes", "2x3", "1x2", "--sizes", "1", "4"]
        + ["--cache-len", "16", "--repeats", "1", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result["forward_s"]) == ["1", "4"]
    for shape in ("W2L3", "W1L2"):
        d = result["draft"][shape]
        assert d["ratio_to_forward1"] == pytest.approx(d["draft_s"] / result["forward_s"]["1"])
        assert f"beam search {shape[:2]} {shape[2:]}" in proc.stdout


def test_batch_benchmark_writes_every_decoder_and_prediction_per_batch_size(
    tiny_model_dir, tmp_path
):
    prompts = _write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.benchmarks.batch", "--model", str(tiny_model_dir)]
        + ["--prompts", str(prompts), "--batch-sizes", "1", "3", "--max-tokens", "6"]
        + ["--shapes", "1x2", "2x3", "--lookups", "0", "--tune-prompts", "2"]
        + ["--tune-max-tokens", "6", "--tune-repeats", "1", "--cache-len", "8"]
        + ["--out", str(out)],
        cwd=tmp_path,
        env=dict(os.environ, MLX_REDRAFTER_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "batch.json").read_text())
    # the tuner's table holds B = 1, 2 and 3 (the largest asked); each option predicted
    assert sorted(results["tuner"]["table"]) == ["1", "2", "3"]
    assert {e["batch"] for e in results["tuner"]["estimates"]} == {1, 2, 3}
    by_batch = results["summary"]["by_batch"]
    assert sorted(by_batch) == ["1", "3"]
    for b, row in by_batch.items():
        for name in ("mlx_lm", "plain", "redrafter", "guarded"):
            assert row[name] > 0
        assert 0 <= row["plain_steps"] <= 1
        pred = row["predicted"]
        assert pred["option"] == results["tuner"]["table"][b]
        # the option is the predicted best, or one the online confirmation measured faster
        if pred["option"] == results["tuner"]["predicted_table"][b]:
            assert pred["plain"] > 0 and pred["redrafter"] >= pred["plain"] * 0.995
        else:
            confirmed = results["tuner"]["confirmed_tps"][b]
            assert confirmed["W{}L{}N{}".format(*pred["option"])] >= confirmed["W0L0N0"]
        # greedy: every row of ours equals mlx-lm's (up to a checked float near-tie)
        assert row["match"] == {d: f"{b}/{b}" for d in ("plain", "redrafter", "guarded")}
    runs = results["runs"]
    assert sorted((r["batch"], r["decoder"]) for r in runs) == sorted(
        (b, d) for b in (1, 3) for d in ("mlx_lm", "plain", "redrafter", "guarded")
    )
    for r in runs:
        if r["decoder"] == "plain":  # one token a row a step: steps = the longest row's
            assert r["forwards"] <= 6 - 1 and r["options"] == {"W0L0N0": r["forwards"]}
    assert set(results["summary"]["drafting_pays_up_to"]) == {"measured", "predicted"}
    md = (out / "batch.md").read_text()
    assert "| 3 |" in md and "Drafting pays up to" in md
    assert (out / "batch-tps.png").stat().st_size > 0


def test_chat_check_reads_the_consoles_own_stats(tiny_model_dir, tmp_path):
    """The user-side check drives the real console; what it records must add up: the session's
    tokens are the replies' tokens, and its tokens/step is the replies' steps pooled."""
    pytest.importorskip("pexpect")
    questions = tmp_path / "q.txt"
    questions.write_text("t5 t6 t7\n\nt8 t9\nt10 t11 t12\nt13\n")
    out = tmp_path / "chat.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.benchmarks.chat_check", "--questions", str(questions)]
        + ["--limit", "3", "--out", str(out), "--"]
        + ["--model", str(tiny_model_dir), "--max-tokens", "8", "--beam-width", "2"]
        + ["--beam-length", "3", "--prompt-lookup", "0"],
        cwd=ROOT,
        env=dict(os.environ, MLX_REDRAFTER_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    replies, session = record["replies"], record["session"]
    assert [r["question"] for r in replies] == ["t5 t6 t7", "t8 t9", "t10 t11 t12"]
    assert "ReDrafter" in record["chat"] and "W=2" in record["chat"]
    assert session["replies"] == 3 and session["tokens"] == sum(r["tokens"] for r in replies)
    for r in replies:
        assert 1 <= r["tokens"] <= 8 and r["reply"].split()[0].startswith("t")
    steps = [round((r["tokens"] - 1) / r["tokens_per_step"]) for r in replies if r["tokens"] > 1]
    pooled = sum(r["tokens"] - 1 for r in replies) / max(1, sum(steps))
    assert session["tokens_per_step"] == pytest.approx(pooled, abs=0.006)
    assert f"{session['tokens_per_step']:.2f} tokens/step" in proc.stdout

"""Distillation data (`mlx_redrafter.train generate-data`) on a saved tiny random model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mlx_redrafter.benchmarks.tiny import (
    first_divergence_is_tie,
    reference_greedy,
    save_tiny_model_dir,
)
from mlx_redrafter.train import cli, data, self_instruct
from mlx_redrafter.train.data import DistillStore, read_records, shard_paths
from mlx_redrafter.train.prompts import make_prompt, prompt_id, read_prompts

MAX_TOKENS = 10
EOS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llm"), with_drafter=False)


@pytest.fixture(scope="module")
def reference(model_dir):
    model, _ = mlx_lm.load(str(model_dir))
    return model


# Words of the tiny word-level vocabulary; "t2x" would split around the special token "t2".
WORDS = [f"t{i}" for i in range(3, 128) if not str(i).startswith("2")]


@pytest.fixture(scope="module")
def prompt_texts():
    rng = np.random.default_rng(0)
    # varied lengths, so batches need padding
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 14)))) for _ in range(10)]


@pytest.fixture()
def jsonl(tmp_path, prompt_texts):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"question_id": 100 + i, "category": "even" if i % 2 == 0 else "odd", "turns": [t, "x"]}
        for i, t in enumerate(prompt_texts)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generate(model_dir, out, *prompt_files, extra=()):
    args = ["generate-data", "--model", str(model_dir), "--out", str(out), "--quiet"]
    for f in prompt_files:
        args += ["--prompts", str(f)]
    args += ["--max-tokens", str(MAX_TOKENS), "--batch-size", "4", *extra]
    return cli.main(args)


def chat_ids(text: str) -> list[int]:
    # mlx_redrafter.benchmarks.tiny's chat template: "t1 <message> t2 t1 "; word i has id i
    return [1, *(int(w[1:]) for w in text.split()), 2, 1]


def expected_answer(model, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    out = reference_greedy(model, prompt, max_tokens)
    return out[: out.index(EOS) + 1] if EOS in out else out


def check_greedy(model, record):
    expected = expected_answer(model, record["prompt"])
    ok, at, gap = first_divergence_is_tie(model, record["prompt"], expected, record["response"])
    assert ok, f"{record['text']!r}: differs at {at} (gap {gap:.2e})"
    if record["response"] == expected:
        stopped = expected[-1] == EOS
        assert record["finish_reason"] == ("stop" if stopped else "length")


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if data.TMP_MARK in p.name]


# ---------------------------------------------------------------------------------- tests


def test_batched_answers_equal_greedy_decoding_one_prompt_at_a_time(
    model_dir, reference, jsonl, tmp_path, prompt_texts
):
    out = tmp_path / "out"
    assert generate(model_dir, out, jsonl) == 0
    shards = shard_paths(out)
    assert [p.name for p in shards] == [f"shard-0000{i}.jsonl.gz" for i in range(3)]  # 4+4+2
    records = list(read_records(out))
    assert sorted(r["text"] for r in records) == sorted(prompt_texts)
    for r in records:
        assert r["prompt"] == chat_ids(r["text"])
        assert r["id"] == prompt_id("prompts.jsonl", r["text"])
        assert r["question_id"] - 100 == prompt_texts.index(r["text"])
        assert r["category"] == ("even" if r["question_id"] % 2 == 0 else "odd")
        check_greedy(reference, r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["max_tokens"] == MAX_TOKENS
    assert manifest["counts"]["records"] == 10
    assert manifest["counts"]["response_tokens"] == sum(len(r["response"]) for r in records)
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in shards]
    assert not list(out.glob("topk-*"))


def test_rows_that_stop_early_leave_the_batch_and_waiting_prompts_join(model_dir, reference):
    model, _, _ = cli.load_model(str(model_dir))
    rng = np.random.default_rng(1)
    prompts = [
        make_prompt("s", " ".join(rng.choice(WORDS, size=int(rng.integers(1, 10)))))
        for _ in range(12)
    ]
    refs = {}
    for p in prompts:
        p.tokens = chat_ids(p.text)
        refs[p.id] = reference_greedy(reference, p.tokens, 12)
    # the stop token: the one that ends the most answers after a few tokens
    firsts = Counter(t for r in refs.values() for t in set(r) if 2 <= r.index(t) < 10)
    stop = firsts.most_common(1)[0][0]
    completions = list(
        data.generate_completions(model, prompts, stop_ids=[stop], max_tokens=12, batch_size=3)
    )
    assert sorted(c.prompt.id for c in completions) == sorted(p.id for p in prompts)
    for c in completions:
        ref = refs[c.prompt.id]
        want = ref[: ref.index(stop) + 1] if stop in ref else ref
        ok, at, gap = first_divergence_is_tie(reference, c.prompt.tokens, want, c.tokens)
        assert ok, f"differs at {at} (gap {gap:.2e})"
        if c.tokens == want:
            assert c.finish_reason == ("stop" if stop in ref else "length")
    assert sum(c.finish_reason == "stop" for c in completions) >= 3
    assert len({len(c.tokens) for c in completions}) >= 3


def test_resume_skips_stored_prompts_and_adds_new_ones(model_dir, reference, jsonl, tmp_path):
    out = tmp_path / "out"
    assert generate(model_dir, out, jsonl, extra=["--limit", "5"]) == 0
    first = {p.name: p.read_bytes() for p in shard_paths(out)}
    assert sum(1 for _ in read_records(out)) == 5
    assert generate(model_dir, out, jsonl) == 0
    records = list(read_records(out))
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    for name, content in first.items():  # earlier shards untouched
        assert (out / name).read_bytes() == content
    assert generate(model_dir, out, jsonl) == 0  # nothing left: no new shard
    assert len(shard_paths(out)) == len(first) + 2
    for r in records:
        check_greedy(reference, r)


def test_other_settings_are_refused_for_an_existing_folder(model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(model_dir, out, jsonl, extra=["--limit", "1"]) == 0
    assert generate(model_dir, out, jsonl, extra=["--temp", "0.7", "--seed", "1"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_crash_mid_run_keeps_finished_shards_and_leaves_no_temp_files(
    model_dir, reference, jsonl, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real = data.generate_completions

    def crashing(*args, **kwargs):
        for i, completion in enumerate(real(*args, **kwargs)):
            if i == 5:
                raise RuntimeError("simulated crash")
            yield completion

    monkeypatch.setattr(data, "generate_completions", crashing)
    assert generate(model_dir, out, jsonl, extra=["--shard-size", "2"]) == 2
    # two full shards, then the finished fifth answer saved on the way out
    assert len(shard_paths(out)) == 3
    assert sum(1 for _ in read_records(out)) == 5
    assert no_temp_files(out)

    # a crash while a shard is being written leaves the earlier shards and no partial file
    def failing_write(f, records):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(data, "generate_completions", real)
    monkeypatch.setattr(data, "write_jsonl_gz", failing_write)
    with pytest.raises(OSError):
        generate(model_dir, out, jsonl)
    assert len(shard_paths(out)) == 3 and no_temp_files(out)

    monkeypatch.undo()
    assert generate(model_dir, out, jsonl) == 0
    records = list(read_records(out))
    assert len(records) == 10 and len({r["id"] for r in records}) == 10
    for r in records:
        check_greedy(reference, r)


def test_top_k_logprobs_match_the_models_log_softmax(model_dir, reference, jsonl, tmp_path):
    out, k = tmp_path / "out", 5
    assert generate(model_dir, out, jsonl, extra=["--top-k-logprobs", str(k)]) == 0
    assert len(list(out.glob("topk-*.npz"))) == len(shard_paths(out))
    for r in read_records(out, with_topk=True):
        ids, logprobs = r["topk_ids"], r["topk_logprobs"]
        n = len(r["response"])
        assert ids.shape == logprobs.shape == (n, k)
        assert ids.dtype == np.int32 and logprobs.dtype == np.float16
        # teacher-forced: position j predicts response[j] from prompt + response[:j]
        context = r["prompt"] + r["response"][:-1]
        logits = reference(mx.array(context)[None])[0, len(r["prompt"]) - 1 :]
        ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        np.testing.assert_allclose(
            logprobs.astype(np.float32),
            np.take_along_axis(ref, ids, axis=-1),
            rtol=2e-3,
            atol=2e-3,
        )
        assert np.all(np.diff(logprobs.astype(np.float32), axis=-1) <= 0)  # most likely first
        kth = -np.sort(-ref, axis=-1)[:, k - 1]
        assert np.all(logprobs[:, -1].astype(np.float32) >= kth - 2e-3)
        assert ids[:, 0].tolist() == r["response"]  # greedy: the top token was chosen


def test_plain_text_prompt_file(model_dir, reference, tmp_path, prompt_texts):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompt_texts[:3]) + "\n\n" + prompt_texts[0] + "\n")
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == prompt_texts[:3]  # blank line and repeat dropped
    assert [p.question_id for p in prompts] == [1, 2, 3]
    assert all(p.category is None and p.source == "prompts.txt" for p in prompts)
    out = tmp_path / "out"
    assert generate(model_dir, out, path) == 0
    records = list(read_records(out))
    assert sorted(r["text"] for r in records) == sorted(prompt_texts[:3])
    for r in records:
        check_greedy(reference, r)


def test_sampling_depends_on_seed_and_prompt_not_on_batching(model_dir, jsonl, tmp_path):
    def answers(out, batch, seed):
        assert (
            generate(
                model_dir,
                out,
                jsonl,
                extra=["--temp", "1.0", "--seed", str(seed), "--batch-size", str(batch)],
            )
            == 0
        )
        return {r["id"]: r["response"] for r in read_records(out)}

    a = answers(tmp_path / "a", 4, 7)
    b = answers(tmp_path / "b", 1, 7)
    c = answers(tmp_path / "c", 4, 8)
    assert a == b
    assert a != c


def test_evaluation_prompts_are_refused(model_dir, tmp_path, capsys):
    path = tmp_path / "mt_bench.jsonl"
    path.write_text(json.dumps({"turns": ["t5"]}) + "\n")
    assert generate(model_dir, tmp_path / "out", path) == 2
    assert "evaluation" in capsys.readouterr().err


def _bad_prompt_file(tmp_path, case):
    """A prompt file wrong in one way, and the words its error must contain (after the path)."""
    if case == "folder":
        path = tmp_path / "prompts.jsonl"
        path.mkdir()
        return path, f"prompt file {path} is a folder"
    if case == "binary":
        path = tmp_path / "prompts.txt"
        path.write_bytes(b"t5 t6\n" + bytes(range(0x80, 0x100)))
        return path, f"{path}:2: not UTF-8 text"
    if case == "nul":
        path = tmp_path / "prompts.txt"
        path.write_bytes(b"t5 t6\nt7\x00t8\n")
        return path, f"{path}:2: a NUL byte: a binary file"
    if case == "bad-json":
        path = tmp_path / "prompts.jsonl"
        path.write_text(json.dumps({"turns": ["t5"]}) + '\n{"turns": [t6]}\n')
        return path, f"{path}:2: not valid JSON: Expecting value (column 12)"
    if case == "not-an-object":
        path = tmp_path / "prompts.jsonl"
        path.write_text('\n["t5"]\n')
        return path, f"{path}:2: expected a JSON object, got list"
    if case == "no-text":
        path = tmp_path / "prompts.jsonl"
        path.write_text(json.dumps({"turns": ["t5"]}) + "\n" + json.dumps({"id": 3}) + "\n")
        return path, f"{path}:2: no prompt text"
    if case == "empty":
        path = tmp_path / "prompts.jsonl"
        path.write_text("\n  \n")
        return path, f"prompt file {path} holds no prompts"
    path = tmp_path / "absent.jsonl"
    return path, f"prompt file {path} does not exist"


BAD_CASES = ["folder", "binary", "nul", "bad-json", "not-an-object", "no-text", "empty", "missing"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_prompt_file_is_named_with_its_line(tmp_path, capsys, case):
    """The CLI exits 2 before loading any model, and says which file, which line, and what."""
    path, message = _bad_prompt_file(tmp_path, case)
    rc = cli.main(["generate-data", "--prompts", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"mlx_redrafter.train generate-data: error: {message}" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", BAD_CASES)
def test_the_benchmarks_read_prompt_files_the_same_way(tmp_path, case):
    from mlx_redrafter.benchmarks.prompts import load_questions

    path, message = _bad_prompt_file(tmp_path, case)
    message = message.replace("no prompt text", "needs a list of strings under 'turns'")
    message = message.replace("holds no prompts", "holds no questions")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_questions(path)
    assert message in str(e.value)


def test_topics_file_errors_name_the_file(tmp_path):
    folder = tmp_path / "topics"
    folder.mkdir()
    with pytest.raises(ValueError, match=f"topics file {folder} is a folder"):
        self_instruct.read_topics(folder)
    binary = tmp_path / "topics.txt"
    binary.write_bytes(b"cats\n\xff\xfe")
    with pytest.raises(ValueError, match=f"{binary}:2: not UTF-8 text"):
        self_instruct.read_topics(binary)


def test_a_second_writer_is_refused(tmp_path):
    settings = {"model": "m"}
    with DistillStore(tmp_path).open(settings):
        with pytest.raises(RuntimeError, match="another run"):
            with DistillStore(tmp_path).open(settings):
                pass


# ---------------------------------------------------------------------------- self-instruct


@pytest.mark.parametrize(
    "raw, finish, accepted",
    [
        (" Write a Python function that sorts a list.\n", "stop", True),
        (' "How do I brew green tea properly?"\nTopic: x', "stop", True),
        ("Request: 1. Give me three tips for sleeping better.", "stop", True),
        ("  - What is   a prime number?  ", "stop", True),
        ("Too short.\n", "stop", False),
        ("Explain what a sports coach does all day", "length", False),  # cut off
        ("Write a poem. Topic: cats | Kind: a poem", "stop", False),  # template leaked
        ("the answer to the question the answer to the question the answer to", "stop", False),
        ("1234 5678 9012 3456", "stop", False),
        ("", "stop", False),
    ],
)
def test_clean_instruction(raw, finish, accepted):
    got = self_instruct.clean_instruction(raw, finish)
    assert (got is not None) == accepted
    if accepted:
        assert "\n" not in got and got == got.strip() and "  " not in got
        assert not got.startswith(("Request", "1.", "-", '"'))


def test_clean_instruction_values():
    clean = self_instruct.clean_instruction
    assert clean(' "How do I brew green tea properly?"\nTopic: x') == (
        "How do I brew green tea properly?"
    )
    assert clean("Request: 1. Give me three tips for sleeping better.") == (
        "Give me three tips for sleeping better."
    )
    assert clean("  - What is   a prime number?  ") == "What is a prime number?"


def test_selection_dedups_in_plan_order():
    items = self_instruct.plan(["cats", "tea"], seed=0)
    texts = ["Tell me about cats please.", "tell me about CATS, please!", "How is tea made?"]
    attempts = {
        items[0].key: {"text": texts[0]},
        items[1].key: {"text": texts[1]},  # same request: dropped
        items[2].key: {"text": None},  # rejected attempt
        items[3].key: {"text": texts[2]},
    }
    chosen = self_instruct.select(items, attempts, 5)
    assert [t for _, t in chosen] == [texts[0], texts[2]]
    assert self_instruct.select(items, attempts, 1) == [(items[0], texts[0])]
    # what to attempt next: the gaps that could complete the first n, padded to a batch
    assert self_instruct.missing_items(items, attempts, 2, 1) == []
    assert self_instruct.missing_items(items, attempts, 3, 1) == [items[4]]
    assert self_instruct.missing_items(items, attempts, 3, 3) == items[4:7]
    assert self_instruct.dedup_key(texts[0]) == self_instruct.dedup_key(texts[1])


def test_plan_and_prompts_are_deterministic():
    topics = self_instruct.read_topics("builtin")
    assert len(topics) >= 100 and len(set(topics)) == len(topics)
    a, b = self_instruct.plan(topics, seed=1), self_instruct.plan(topics, seed=1)
    assert a == b and a != self_instruct.plan(topics, seed=2)
    assert len({i.key for i in a}) == len(a)
    coding = {i.topic for i in a if i.category == "coding"}
    assert coding <= set(self_instruct.CODING_TOPICS)
    text = self_instruct.instruction_prompt(a[0])
    assert text == self_instruct.instruction_prompt(a[0])
    assert text.endswith(f"Topic: {a[0].topic} | Kind: {a[0].kind}\nRequest:")


def test_self_instruct_stores_attempts_and_resumes(model_dir, tmp_path, monkeypatch):
    # The tiny word-level model cannot write English: give each item its own token prompt and
    # accept any answer, to exercise the loop, its storage and its resume.
    def word_prompt(item):
        seed = int(prompt_id("w", item.key)[:6], 16)
        return " ".join(WORDS[(seed >> s) % len(WORDS)] for s in range(0, 18, 3))

    monkeypatch.setattr(self_instruct, "instruction_prompt", word_prompt)
    monkeypatch.setattr(self_instruct, "clean_instruction", lambda raw, finish: raw.strip())
    monkeypatch.setattr(self_instruct, "MAX_INSTRUCTION_TOKENS", 4)
    topics = tmp_path / "topics.txt"
    topics.write_text("# my topics\ncats\n\ntea\ncats\n")
    assert self_instruct.read_topics(topics) == ["cats", "tea"]
    out = tmp_path / "out"
    args = ["--self-instruct", "6", "--topics", str(topics), "--seed", "3"]
    assert generate(model_dir, out, extra=args) == 0
    attempts = data.read_instruction_attempts(out)
    records = list(read_records(out))
    assert len(records) == 6
    assert {r["source"] for r in records} == {"self-instruct"}
    assert {r["text"] for r in records} <= {a["text"] for a in attempts}
    kinds = {c for c, _ in self_instruct.KINDS}
    assert all(r["category"] in kinds for r in records)
    n_shards = len(shard_paths(out, data.INSTRUCTIONS))
    assert generate(model_dir, out, extra=args) == 0  # resumed: nothing to write or answer
    assert len(shard_paths(out, data.INSTRUCTIONS)) == n_shards
    assert len(list(read_records(out))) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["self_instruct"]["requests"] == 6

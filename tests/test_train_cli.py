"""generate-data -> train -> evaluate through the CLI on a tiny model folder."""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mlx_redrafter.train.data import read_records


def cli(*args):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"t{i} t{i + 3} t{i + 7}" for i in range(5, 45)) + "\n")
    data = root / "data"
    r = cli(
        "generate-data",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(data),
        "--max-tokens",
        "24",
        "--batch-size",
        "8",
    )
    assert r.returncode == 0, r.stderr
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "doc.md").write_text(" ".join(f"t{i % 90 + 3}" for i in range(300)))
    out = root / "run"
    r = cli(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--text",
        str(prompts),
        "--corpus",
        str(corpus),
        "--corpus-tokens",
        "40",
        "--teacher-top-k",
        "4",
        "--kl-weight",
        "0.5",
        "--out",
        str(out),
        "--exit-dim",
        "64",
        "--layers",
        "1",
        "--draft-vocab",
        "64",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--depths",
        "3",
        "--eval-every",
        "5",
    )
    assert r.returncode == 0, r.stderr
    return root, prompts, data, out, r.stdout


def test_train_writes_a_loadable_reduced_vocab_drafter(run_dir, tiny_model_dir):
    from mlx_redrafter import load

    _, _, _, out, stdout = run_dir
    assert "val top-1" in stdout
    card = json.loads((out / "drafter" / "training.json").read_text())
    assert card["data"]["train_sequences"] > 30 and card["steps"] > 0
    assert card["data"]["corpus_tokens"] == 40 and card["config"]["kl_weight"] == 0.5
    _, _, drafter = load(tiny_model_dir, drafter_path=out / "drafter")
    assert drafter.config.draft_vocab_size == 64


def test_offline_and_online_evaluation_agree(run_dir, tiny_model_dir):
    root, prompts, data, out, _ = run_dir
    common = [
        "--model",
        str(tiny_model_dir),
        "--drafter",
        str(out / "drafter"),
        "--prompts",
        str(prompts),
        "--max-tokens",
        "24",
        "--beam-width",
        "1",
        "3",
        "--beam-length",
        "3",
    ]
    online = cli("evaluate", *common, "--out", str(root / "online.json"))
    offline = cli(
        "evaluate",
        *common,
        "--offline",
        "--responses",
        str(data),
        "--out",
        str(root / "offline.json"),
    )
    assert online.returncode == 0, online.stderr
    assert offline.returncode == 0, offline.stderr
    a = json.loads((root / "online.json").read_text())["results"]
    b = json.loads((root / "offline.json").read_text())["results"]
    assert set(a) == {"W1L3", "W3L3"}
    for shape in a:
        assert a[shape]["steps"] == b[shape]["steps"]
        assert a[shape]["tokens"] == b[shape]["tokens"]
        assert a[shape]["mean_accepted"] >= 1.0


def test_sampling_evaluation_compares_rules_in_one_run(run_dir, tiny_model_dir):
    root, prompts, _, out, _ = run_dir
    common = ["--model", str(tiny_model_dir), "--drafter", str(out / "drafter")]
    common += ["--prompts", str(prompts), "--max-tokens", "12", "--beam-length", "3"]
    r = cli(
        "evaluate",
        *common,
        *("--temp", "0", "1.0", "--accept", "exact", "reference", "match"),
        *("--per-category", "5"),  # plain-text prompts have one (empty) category
        *("--out", str(root / "sampling.json")),
    )
    assert r.returncode == 0, r.stderr
    record = json.loads((root / "sampling.json").read_text())
    assert record["prompts"] == 5
    results = record["results"]
    expected = {"W4L3"} | {f"W4L3 temp=1 {a}" for a in ("exact", "reference", "match")}
    assert set(results) == expected
    for res in results.values():
        assert res["steps"] > 0 and 1.0 <= res["mean_accepted"] <= 3.0
    bad = cli("evaluate", *common, "--temp", "0.7", "--offline", "--responses", str(root))
    assert bad.returncode != 0 and "greedy decoding only" in bad.stderr
    bad = cli("evaluate", *common, "--temp", "0.7", "--accept", "typical")
    assert bad.returncode != 0 and "typical" in bad.stderr


def test_init_continues_from_a_trained_drafter(tmp_path, tiny_model_dir, run_dir):
    """With a zero learning rate the continued drafter must come out as it went in: proof that
    training started from its weights and kept its vocabulary map; contradicting flags and a
    drafter of another model are refused by name."""
    import mlx.core as mx

    _, prompts, _, out, _ = run_dir
    common = ["train", "--model", str(tiny_model_dir), "--text", str(prompts)]
    common += ["--epochs", "1", "--batch-size", "64", "--depths", "3", "--eval-every", "1000"]
    r = cli(*common, "--init", str(out / "drafter"), "--lr", "0", "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert f"continuing from {out / 'drafter'}" in r.stdout
    before = mx.load(str(out / "drafter" / "model.safetensors"))
    after = mx.load(str(tmp_path / "a" / "drafter" / "model.safetensors"))
    assert set(before) == set(after)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert mx.array_equal(after[key], value).item(), key
    card = json.loads((tmp_path / "a" / "drafter" / "training.json").read_text())
    assert card["init"] == str(out / "drafter") and card["config"]["draft_vocab"] == 64

    r = cli(*common, "--init", str(out / "drafter"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    moved = mx.load(str(tmp_path / "b" / "drafter" / "model.safetensors"))
    assert mx.array_equal(moved["draft_vocab_ids"], before["draft_vocab_ids"]).item()
    assert any(not mx.array_equal(moved[k], before[k]).item() for k in before)

    bad = cli(
        *common, "--init", str(out / "drafter"), "--layers", "2", "--out", str(tmp_path / "c")
    )
    assert bad.returncode == 2 and "--layers 2 contradicts the --init drafter" in bad.stderr
    other = cli(*common, "--init", "default", "--out", str(tmp_path / "d"))
    assert other.returncode == 2 and "hidden_size 576 does not match" in other.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_states_cache_makes_a_second_run_skip_the_llm_pass(tmp_path, tiny_model_dir, run_dir):
    """The second run reads every sequence's states back and trains to the same drafter."""
    import mlx.core as mx

    _, prompts, data, _, _ = run_dir
    common = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--text", str(prompts)]
    common += ["--epochs", "1", "--batch-size", "64", "--depths", "3", "--draft-vocab", "64"]
    common += ["--exit-dim", "64", "--layers", "1", "--states-cache", str(tmp_path / "states")]
    first = cli(*common, "--out", str(tmp_path / "a"))
    second = cli(*common, "--out", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    counts = [
        [int(n) for n in re.findall(r"LLM states: (\d+) of (\d+) sequences", r.stdout)[0]]
        for r in (first, second)
    ]
    assert counts[0][0] == 0 and counts[1][0] == counts[1][1] == counts[0][1] > 30
    a = mx.load(str(tmp_path / "a" / "drafter" / "model.safetensors"))
    b = mx.load(str(tmp_path / "b" / "drafter" / "model.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_loss_positions_flag_masks_the_prompt_and_reports_both(tmp_path, tiny_model_dir, run_dir):
    """--loss-positions all keeps the prompt's positions: exactly min(len(prompt) - 1,
    len - 2) more per training answer (--limit 12 of them); both runs report both accuracies."""
    from mlx_redrafter.train.positions import split_by_id

    _, _, data, _, _ = run_dir
    common = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--limit", "12"]
    common += ["--epochs", "1", "--batch-size", "32", "--depths", "3", "--draft-vocab", "64"]
    common += ["--exit-dim", "64", "--layers", "1", "--val-fraction", "0.3"]
    cards = {}
    for mode in ("response", "all"):
        r = cli(*common, "--loss-positions", mode, "--out", str(tmp_path / mode))
        assert r.returncode == 0, r.stderr
        assert f"({mode} positions)" in r.stdout
        cards[mode] = json.loads((tmp_path / mode / "drafter" / "training.json").read_text())
    records = list(read_records(data))[:12]
    held_out = split_by_id([r["id"] for r in records], 0.3)
    assert 0 < held_out.sum() < 12
    prompt_positions = sum(
        min(len(r["prompt"]) - 1, len(r["prompt"]) + len(r["response"]) - 2)
        for r, v in zip(records, held_out, strict=True)
        if not v
    )
    got = {m: c["data"]["train_positions"] for m, c in cards.items()}
    assert got["all"] - got["response"] == prompt_positions > 0
    for mode, card in cards.items():
        assert card["loss_positions"] == mode == card["config"]["loss_positions"]
        assert card["data"]["train_sequences"] + card["data"]["val_sequences"] == 12
        for name in ("response", "all"):
            assert len(card[f"val_top1_{name}"]) == len(card[f"val_top5_{name}"]) == 3
        assert card["val_top1"] == card[f"val_top1_{mode}"]
    # a checkpoint keeps its loss: resuming under the other setting is refused before any work
    other = cli(*common, "--resume", "--out", str(tmp_path / "all"))
    assert other.returncode == 2 and "pass --loss-positions all to continue it" in other.stderr
    bad = cli(*common, "--loss-positions", "prompt", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "invalid choice: 'prompt'" in bad.stderr
    bad = cli(*common, "--limit", "0", "--out", str(tmp_path / "bad"))  # the last wins
    assert bad.returncode == 2 and "--limit must be at least 1" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_an_earlier_run_is_kept_unless_force(tmp_path, tiny_model_dir, run_dir):
    """--out holding a run's drafter/ and checkpoint/ is refused (before any work) unless
    --resume continues it or --force starts over; --force replaces both."""
    import mlx.core as mx

    _, prompts, _, out, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = (run / "drafter" / "model.safetensors").read_bytes()
    common = ["train", "--model", str(tiny_model_dir), "--text", str(prompts), "--out", str(run)]
    common += ["--epochs", "1", "--batch-size", "64", "--depths", "3", "--eval-every", "1000"]
    common += ["--exit-dim", "32", "--layers", "1", "--draft-vocab", "32"]
    refused = cli(*common)
    assert refused.returncode == 2
    assert (
        f"{run} already holds an earlier run's drafter/ and checkpoint/ (pass --resume to "
        "continue that run, or --force to start over and replace it)"
    ) in refused.stderr
    assert (run / "drafter" / "model.safetensors").read_bytes() == before
    both = cli(*common, "--resume", "--force")
    assert both.returncode == 2 and "pick one" in both.stderr

    forced = cli(*common, "--force")
    assert forced.returncode == 0, forced.stderr
    for folder in (run / "drafter", run / "checkpoint" / "drafter"):
        config = json.loads((folder / "config.json").read_text())
        assert config["exit_dim"] == 32 and config["draft_vocab_size"] == 32, folder
    steps = json.loads((run / "checkpoint" / "trainer.json").read_text())["step"]
    assert steps == json.loads((run / "drafter" / "training.json").read_text())["steps"]
    assert mx.load(str(run / "drafter" / "model.safetensors"))["draft_vocab_ids"].size == 32


def test_resume_needs_a_checkpoint(tmp_path, tiny_model_dir, run_dir):
    _, _, data, _, _ = run_dir
    r = cli(
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "fresh"),
        "--resume",
    )
    assert r.returncode == 2 and "no checkpoint" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_background_run_stops_on_a_signal_and_keeps_finished_answers(tmp_path, tiny_model_dir, sig):
    """A shell's background job ignores SIGINT; both signals must still stop the run cleanly."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"t{i % 90 + 3} t{i % 7 + 3} t{i % 13 + 3}" for i in range(400)))
    out = tmp_path / "data"
    args = ["generate-data", "--model", str(tiny_model_dir), "--prompts", str(prompts)]
    args += ["--out", str(out), "--max-tokens", "48", "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_redrafter.train", *args],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.time() + 120
    while not list(out.glob("shard-*.jsonl.gz")) and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    records = list(read_records(out))
    assert 2 <= len(records) < 400
    with open(out / ".lock", "w") as f:  # the folder's lock was released
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

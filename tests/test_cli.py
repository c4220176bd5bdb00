"""The `mlx_redrafter.generate` CLI on a saved tiny model folder."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_redrafter.benchmarks.tiny import (
    CHAT_TEMPLATE,
    VOCAB,
    make_model,
    make_tokenizer,
    reference_greedy,
    save_tiny_model_dir,
)
from mlx_redrafter.generate import DEFAULT_PROMPT, setup_arg_parser


def run_cli(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_redrafter.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env=env,
    )


def test_drafter_and_no_drafter_print_the_greedy_reply(tiny_model_dir):
    tokenizer = make_tokenizer()
    # the tiny chat template wraps the message: "t1 <message> t2 t1 "
    prompt_ids = tokenizer.encode("t1 t5 t6 t7 t2 t1", add_special_tokens=False)
    expected_ids = reference_greedy(make_model("llama"), prompt_ids, 12)
    eos = tokenizer.eos_token_ids
    if any(t in eos for t in expected_ids):
        expected_ids = expected_ids[: next(i for i, t in enumerate(expected_ids) if t in eos)]
    expected = tokenizer.decode(expected_ids)

    with_drafter = run_cli(
        "--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12", "--verbose"
    )
    without = run_cli(
        "--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12", "--no-drafter"
    )
    assert with_drafter.returncode == 0, with_drafter.stderr
    assert without.returncode == 0, without.stderr
    assert with_drafter.stdout.strip() == without.stdout.strip() == expected.strip()
    assert "speculation: " in with_drafter.stderr  # the tuned default, whatever it chose
    assert "tokens per verification step" in with_drafter.stderr
    assert "Peak memory" in with_drafter.stderr


def test_prompt_from_stdin(tiny_model_dir):
    a = run_cli(
        "--model", str(tiny_model_dir), "--max-tokens", "6", "--prompt", "-", stdin="t9 t10"
    )
    b = run_cli("--model", str(tiny_model_dir), "--max-tokens", "6", "--prompt", "t9 t10")
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.slow  # two CLI runs, each loading a model
def test_no_prompt_uses_the_default_and_never_reads_stdin(tiny_model_dir, tmp_path):
    """An open stdin pipe that never closes must not hang generate (mlx-lm reads stdin only for
    `--prompt -`); the default prompt is the one --help shows."""
    help_text = " ".join(setup_arg_parser().format_help().split())
    assert f"(default: {DEFAULT_PROMPT!r})" in help_text
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as fout, err.open("w") as ferr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_redrafter.generate", "--model", str(tiny_model_dir),
             "--max-tokens", "6"],
            stdin=subprocess.PIPE, stdout=fout, stderr=ferr, text=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
            proc.stdin.close()
    assert rc == 0, err.read_text()
    explicit = run_cli(
        "--model", str(tiny_model_dir), "--max-tokens", "6", "--prompt", DEFAULT_PROMPT
    )
    assert explicit.returncode == 0, explicit.stderr
    assert out.read_text() == explicit.stdout and explicit.stdout.strip()


@pytest.mark.parametrize(
    "args,stdin,message",
    [
        (["--prompt", "-"], "", "the prompt is empty (--prompt - read nothing from stdin)"),
        (["--prompt", "-"], " \n", "the prompt is empty (--prompt - read nothing from stdin)"),
        (["--prompt", ""], None, "the prompt is empty"),
    ],
)
def test_empty_prompt_is_an_argument_error(tiny_model_dir, args, stdin, message):
    result = run_cli("--model", str(tiny_model_dir), *args, stdin=stdin)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: mlx_redrafter.generate" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"mlx_redrafter.generate: error: {message}"


@pytest.fixture(scope="module")
def endless_model_dir(tmp_path_factory):
    """A tiny model folder whose generation never stops by itself: a long context, and an EOS
    id (128) that the model's 128 logits can never pick."""
    path = save_tiny_model_dir(tmp_path_factory.mktemp("endless"))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 20
    (path / "config.json").write_text(json.dumps(config))
    tokenizer = make_tokenizer(vocab=VOCAB + 1, eos=VOCAB)
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer._tokenizer.save_pretrained(str(path))
    return path


def as_foreground() -> None:
    """In the child: Ctrl-C handled as in a terminal's foreground program. A test run started as a
    shell's background job (`cmd &`, as CI may be) inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler, so the signal would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_one_line_and_exits_130(endless_model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_redrafter.generate", "--model", str(endless_model_dir),
         "--prompt", "t5 t6 t7", "--max-tokens", "10000000",
         # a pinned shape: no tuning, whose progress lines on stderr are not what this checks
         "--beam-width", "2", "--beam-length", "3", "--prompt-lookup", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=as_foreground,
    )  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.poll() is None, "no reply text within 120 s"
        first = os.read(proc.stdout.fileno(), 1)  # the reply has started: we are in the loop
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip() == "mlx_redrafter.generate: interrupted"
    assert first and (first + out).decode().endswith("\n")  # the cut reply line is ended


def test_sampling_is_reproducible_with_seed(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--prompt", "t3", "--max-tokens", "15", "--temp", "1.0"]
    a = run_cli(*args, "--seed", "7")
    b = run_cli(*args, "--seed", "7")
    c = run_cli(*args, "--seed", "8")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_load_reads_model_tokenizer_and_drafter(tiny_model_dir):
    from mlx_redrafter import load

    model, tokenizer, drafter = load(tiny_model_dir)
    assert drafter is not None and drafter.config.hidden_size == 64
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 128)
    _, _, none = load(tiny_model_dir, use_drafter=False)
    assert none is None


@pytest.mark.slow  # several CLI runs, two of them tuning the beam shape on the device
def test_auto_beam_shape_is_tuned_once_and_keeps_the_reply(tiny_model_dir, tmp_path):
    """`--beam-length auto` tunes L on this device (W pinned), confirms the pick against plain
    steps, caches it, and stays lossless; `--retune` measures again."""
    env = dict(os.environ, MLX_REDRAFTER_HOME=str(tmp_path))
    args = ["--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12"]
    tuned = [*args, "--beam-width", "2", "--beam-length", "auto", "--prompt-lookup", "0"]
    fixed = run_cli(*args, "--no-speculation")
    first = run_cli(*tuned, "--verbose", env=env)
    assert first.returncode == 0, first.stderr
    assert "autotune: greedy calibration answers" in first.stderr
    assert "autotune: confirming" in first.stderr
    assert first.stdout == fixed.stdout
    cached = list((tmp_path / "autotune").glob("*.json"))
    assert len(cached) == 1
    record = json.loads(cached[0].read_text())
    assert {tuple(e_shape) for e_shape in record["key"]["shapes"]} == {(2, n) for n in range(2, 7)}
    width, length, lookup = record["choice"]
    assert lookup == 0 and width in (0, 2)  # W pinned, or plain steps where drafting loses
    measured = record["confirmed_tps"]
    assert "W0L0N0" in measured and max(measured, key=measured.get) == f"W{width}L{length}N0"
    shown = f"W=2 L={length}" if width else "no speculation"
    assert shown in first.stderr

    again = run_cli(*tuned, "--verbose", env=env)
    assert again.returncode == 0, again.stderr
    assert "autotune:" not in again.stderr  # read from the cache
    assert shown in again.stderr
    retuned = run_cli(*tuned, "--verbose", "--retune", env=env)
    assert "autotune: greedy calibration answers" in retuned.stderr
    assert retuned.stdout == fixed.stdout


NO_DRAFTER_NOTE = "has no drafter/; decoding without a drafter (--no-drafter to silence)"


@pytest.mark.slow  # two CLI runs, each loading a model
def test_a_model_without_drafter_says_so_once(tmp_path, capfd):
    bare = save_tiny_model_dir(tmp_path / "bare", with_drafter=False)
    args = ["--model", str(bare), "--prompt", "t5 t6", "--max-tokens", "4"]
    noted = run_cli(*args)
    assert noted.returncode == 0, noted.stderr
    assert noted.stderr.count("note:") == 1
    assert f"note: {bare} {NO_DRAFTER_NOTE}" in noted.stderr
    silenced = run_cli(*args, "--no-drafter")
    assert silenced.returncode == 0, silenced.stderr
    assert "note:" not in silenced.stderr
    assert noted.stdout == silenced.stdout and noted.stdout.strip()

    from mlx_redrafter import load

    assert load(bare)[2] is None  # the API reports it in its result and prints nothing
    assert "note:" not in capfd.readouterr().err

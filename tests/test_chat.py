"""mlx_redrafter.chat: the console script in a pseudo-terminal, greedy parity over turns, and
the conversation bookkeeping."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_redrafter
from mlx_redrafter.benchmarks.tiny import (
    CHAT_TEMPLATE,
    OracleDrafter,
    make_model,
    make_tokenizer,
    reference_greedy,
    save_tiny_model_dir,
)
from mlx_redrafter.chat import ChatSession, ContextFullError
from mlx_redrafter.conversation import (
    cached_after_reply,
    fit_to_budget,
    reusable_prefix,
)

REPO = Path(mlx_redrafter.__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
EOS = 2


def template_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render(turns, user):
    """The tiny template, token for token: "t1 <content> t2 " per message, then "t1 "."""
    text = "".join(f"t1 {q} t2 t1 {a} t2 " for q, a in turns) + f"t1 {user} t2 t1 "
    return template_tokenizer().encode(text, add_special_tokens=False)


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokens_in(screen_text: str) -> list[int]:
    """Token ids of the word-level reply text shown on screen (escapes and ^C echoes removed)."""
    text = ANSI.sub("", screen_text).replace("^C", " ")
    return [int(t) for t in re.findall(r"t(\d+)", text)]


# ---------------------------------------------------------------------------- the console
def as_foreground() -> None:
    """In the child: Ctrl-C handled as in a terminal's foreground program. A test run started as a
    shell's background job (`cmd &`, as CI may be) inherits SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler, so a Ctrl-C at the prompt would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(pexpect, model_dir, *args, home=None, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NO_COLOR", None)
    if home is not None:
        env["MLX_REDRAFTER_HOME"] = str(home)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_redrafter.chat", "--model", str(model_dir), *args],
        cwd=str(REPO),
        env=env,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(40, 250),
        preexec_fn=as_foreground,
    )
    child.expect("Chatting with [^\r\n]*: ")
    banner = child.before + child.after
    child.expect_exact(">> ")
    child.banner = ANSI.sub("", banner + child.before)  # what the screen showed before ">> "
    return child


def send_turn(child, message):
    """Send a message; return (reply token ids, summary line)."""
    child.sendline(message)
    child.expect(re.escape(message) + r"\r?\n")
    child.expect(r"\[([^\]\n]*)tokens/step\]")
    reply = tokens_in(child.before)
    summary = child.match.group(0)
    child.expect_exact(">> ")
    return reply, summary


def stats(child):
    child.sendline("/stats")
    child.expect(r"last prefill: (\d+) tokens")
    prefill = int(child.match.group(1))
    child.expect(r"context: +(\d+) tokens cached \(budget 512\), (\d+) turns?")
    cached, turns = int(child.match.group(1)), int(child.match.group(2))
    child.expect(r"peak memory: +[0-9.]+ GB")
    child.expect_exact(">> ")
    return prefill, cached, turns


@pytest.mark.slow  # two CLI runs, each loading a model
def test_model_without_drafter_is_noted_unless_no_drafter(tmp_path):
    bare = save_tiny_model_dir(tmp_path / "bare", with_drafter=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for extra, notes in (([], 1), (["--no-drafter"], 0)):
        result = subprocess.run(
            [sys.executable, "-m", "mlx_redrafter.chat", "--model", str(bare), "--quiet",
             "--prompt-lookup", "0", *extra],
            input="/quit\n", capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "Chatting with bare: no speculation" in result.stdout
        assert result.stderr.count(f"note: {bare} has no drafter/; decoding without a drafter") == (
            notes
        )


def test_console_turns_stats_reset_quit(tiny_model_dir):
    pexpect = pytest.importorskip("pexpect")
    model = make_model("llama")
    child = spawn_chat(pexpect, tiny_model_dir, "--max-tokens", "8")
    try:
        child.sendline("/help")
        child.expect_exact("/system TEXT")
        child.expect_exact(">> ")

        first, summary = send_turn(child, "t5 t6 t7")
        full1 = render([], "t5 t6 t7")
        assert first == reference_greedy(model, full1, 8)  # no EOS in these 8 tokens
        assert "max tokens reached; 8 tokens" in summary and "tok/s" in summary

        second, _ = send_turn(child, "t8 t9")
        turns = [("t5 t6 t7", " ".join(f"t{t}" for t in first))]
        full2 = render(turns, "t8 t9")
        assert second == reference_greedy(model, full2, 8)
        # The cache held turn 1's prompt and reply but its last token (the engine's next g0):
        # turn 2 fed only the rest.
        in_cache = full1 + first[:-1]
        expected_prefill = len(full2) - common_prefix(in_cache, full2)
        assert expected_prefill == 7
        prefill, cached, n_turns = stats(child)
        assert prefill == expected_prefill
        assert (cached, n_turns) == (len(full2) + len(second) - 1, 2)

        child.sendline("/reset")
        child.expect_exact("[conversation cleared]")
        child.expect_exact(">> ")
        again, _ = send_turn(child, "t5 t6 t7")
        assert again == first
        prefill, _, n_turns = stats(child)
        assert (prefill, n_turns) == (len(full1), 1)  # an empty cache: the whole prompt

        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_console_tunes_an_auto_beam_shape(tiny_model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(
        pexpect,
        tiny_model_dir,
        "--max-tokens",
        "6",
        "--beam-width",
        "auto",
        "--beam-length",
        "2",
        "--prompt-lookup",
        "0",
        home=tmp_path,
        timeout=240,
    )
    try:
        banner = child.banner
        assert "tuning speculation" in banner
        # the tuned pick, or plain steps where the confirmation found drafting slower
        assert re.search(r"ReDrafter W=[12348] L=2|no speculation", banner), banner
        reply, _ = send_turn(child, "t5 t6 t7")
        assert reply == reference_greedy(make_model("llama"), render([], "t5 t6 t7"), 6)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert len(list((tmp_path / "autotune").glob("*.json"))) == 1
    # a cache hit says nothing about tuning
    again = spawn_chat(
        pexpect,
        tiny_model_dir,
        *("--beam-width", "auto", "--beam-length", "2", "--prompt-lookup", "0"),
        home=tmp_path,
    )
    try:
        assert "tuning" not in again.banner, again.banner
        again.sendline("/quit")
        again.expect(pexpect.EOF)
    finally:
        again.close()


def test_console_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_model_dir):
    pexpect = pytest.importorskip("pexpect")
    # "t9 t10" starts a greedy reply with no EOS for 500 tokens: the whole 512-token context.
    child = spawn_chat(pexpect, tiny_model_dir, "--max-tokens", "-1")
    try:
        child.sendline("t9 t10")
        child.expect(r"t9 t10\r?\n")
        child.expect(r"t\d+")  # the reply is streaming
        shown = child.after
        child.sendintr()
        child.expect(r"\[interrupted; (\d+) tokens, [0-9.]+ tok/s, [0-9.]+ tokens/step\]")
        partial = tokens_in(shown + child.before)
        assert len(partial) == int(child.match.group(1))
        assert 0 < len(partial) < 400
        child.expect_exact(">> ")

        child.sendintr()  # at the prompt: only a new prompt
        child.expect_exact(">> ")

        # The partial reply is kept in the history; the cache held it but its last token.
        child.sendline("t4")
        child.expect(r"t4\r?\n")
        child.expect(r"t\d+")
        shown = child.after
        child.sendintr()
        child.expect(r"\[interrupted; (\d+) tokens")
        second = tokens_in(shown + child.before)
        child.expect_exact(">> ")
        full1 = render([], "t9 t10")
        full2 = render([("t9 t10", " ".join(f"t{t}" for t in partial))], "t4")
        in_cache = full1 + partial[:-1]
        prefill, cached, n_turns = stats(child)
        assert prefill == len(full2) - common_prefix(in_cache, full2) == 6
        assert (cached, n_turns) == (len(full2) + len(second) - 1, 2)

        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# ---------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from mlx_redrafter import load

    return load(tiny_model_dir)


def check_cache_consistent(session, reference_tokens):
    """Every layer holds exactly session.cache_tokens, a prefix of the greedy transcript."""
    n = len(session.cache_tokens)
    assert all(layer.offset == n for layer in session.cache)
    assert session.cache_tokens == reference_tokens[:n]


@pytest.mark.parametrize("drafter_kind", ["trained_format", "oracle"])
def test_greedy_chat_equals_autoregressive_decoding(loaded, drafter_kind):
    model, tokenizer, drafter = loaded
    reference_model = make_model("llama")
    max_tokens = 20
    session = ChatSession(model, tokenizer, drafter, max_tokens=max_tokens)
    past_eos = False
    # turn 1 ends with EOS after 14 tokens, turns 2 and 3 at max tokens
    for user in ["t5 t6 t7", "t8 t9", "t10 t11 t12"]:
        prompt = session.render(session.turns, user)
        continuation = reference_greedy(reference_model, prompt, max_tokens + 8)
        expected = continuation[:max_tokens]
        if EOS in expected:
            expected = expected[: expected.index(EOS)]
        if drafter_kind == "oracle":  # long accepted runs, EOS inside them
            session.drafter = OracleDrafter(prompt + continuation, len(prompt), vocab=128)
        before = list(session.cache_tokens)

        reply = session.reply(user)

        assert reply.tokens == expected
        assert reply.finish == ("stop" if len(expected) < max_tokens else "length")
        assert reply.stats.prefill_tokens == len(prompt) - reusable_prefix(before, prompt)
        if before:
            assert reply.stats.prefill_tokens < len(prompt) // 2
        assert session.turns[-1] == (user, tokenizer.decode(expected))
        check_cache_consistent(session, prompt + continuation)
        past_eos |= len(session.cache_tokens) > len(prompt) + len(expected) + 1
    if drafter_kind == "oracle":
        assert past_eos  # the engine committed tokens after EOS, and the next turn dropped them
        assert session.session.tokens_per_step > 2.0


def test_context_budget_drops_the_oldest_turns(loaded):
    model, tokenizer, drafter = loaded
    reference_model = make_model("llama")
    session = ChatSession(model, tokenizer, drafter, max_tokens=8, max_context=40)
    dropped = 0
    for user in ["t5 t6 t7", "t8 t9", "t10 t11 t12", "t20 t21"]:
        reply = session.reply(user)
        dropped += reply.stats.dropped_turns
        prompt = session.render(session.turns[:-1], user)  # the conversation it answered
        assert len(prompt) + len(reply.tokens) <= 40
        expected = reference_greedy(reference_model, prompt, min(8, 40 - len(prompt)))
        if EOS in expected:
            expected = expected[: expected.index(EOS)]
        assert reply.tokens == expected
        check_cache_consistent(session, prompt + reply.tokens + [EOS])
    assert dropped >= 2

    before = (list(session.turns), list(session.cache_tokens))
    with pytest.raises(ContextFullError, match="context budget is 40 tokens"):
        session.reply(" ".join(["t9"] * 40))
    assert (session.turns, session.cache_tokens) == before  # nothing changed


def test_replies_stream_from_stream_generate(loaded, monkeypatch):
    """The chat has no decode loop of its own: each reply is stream_generate's, on the
    session's cache, and what the cache holds afterwards is read off its step_tokens."""
    import mlx_redrafter.chat as chat

    model, tokenizer, drafter = loaded
    calls, real = [], chat.stream_generate

    def spy(*args, **kwargs):
        responses = list(real(*args, **kwargs))
        calls.append((kwargs["prompt_cache"], responses))
        yield from responses

    monkeypatch.setattr(chat, "stream_generate", spy)
    session = ChatSession(model, tokenizer, drafter, max_tokens=12)
    full = session.render([], "t5 t6 t7")
    reply = session.reply("t5 t6 t7")
    assert len(calls) == 1 and calls[0][0] is session.cache
    responses = calls[0][1]
    assert reply.tokens == [t for r in responses for t in r.tokens]
    assert reply.text == "".join(r.text for r in responses)
    assert reply.stats.tokens == responses[-1].generation_tokens
    emitted = [t for r in responses for t in r.step_tokens]
    assert session.cache_tokens == full + emitted[:-1]


class InterruptingLayer:
    """A decoder layer that raises KeyboardInterrupt on its n-th call (a Ctrl-C mid-forward)."""

    def __init__(self, layer, n):
        self.layer, self.n, self.calls = layer, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.layer(*args, **kwargs)

    def __getattr__(self, key):  # what the model reads off its layers (use_sliding, ...)
        return getattr(self.layer, key)


@pytest.mark.parametrize("n", [1, 4])  # during the prefill; during the 3rd verification
def test_hard_interrupt_mid_forward_keeps_the_cache_consistent(loaded, n):
    model, tokenizer, drafter = loaded
    reference_model = make_model("llama")
    session = ChatSession(model, tokenizer, drafter, max_tokens=12)
    session.reply("t5 t6 t7")
    layers = model.model.layers
    original = layers[1]
    layers[1] = InterruptingLayer(original, n)  # layer 0 has run, layer 1 has not
    try:
        reply = session.reply("t9 t10")
    finally:
        layers[1] = original
    assert reply.finish == "interrupted"
    assert all(layer.offset == len(session.cache_tokens) for layer in session.cache)
    if n == 1:  # nothing was shown: the turn is dropped
        assert reply.tokens == [] and len(session.turns) == 1
    else:
        assert len(reply.tokens) >= 2 and session.turns[-1] == ("t9 t10", reply.text)
    # The next turn still equals autoregressive decoding of the conversation kept.
    prompt = session.render(session.turns, "t4")
    expected = reference_greedy(reference_model, prompt, 12)
    if EOS in expected:
        expected = expected[: expected.index(EOS)]
    assert session.reply("t4").tokens == expected


# ---------------------------------------------------------------------------- bookkeeping
def test_reusable_prefix_leaves_a_token_to_feed():
    assert reusable_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert reusable_prefix([1, 2, 3, 9, 9], [1, 2, 3]) == 2  # all cached: re-feed the last one
    assert reusable_prefix([], [1, 2]) == 0


def test_cached_after_reply_and_fit_to_budget():
    full = [1, 5, 2, 1]
    assert cached_after_reply(full, [7, 8, 2, 9], kept_before=1, prefilled=True) == full + [7, 8, 2]
    assert cached_after_reply(full, [], kept_before=1, prefilled=False) == [1]
    turns = [("a", "b"), ("c", "d"), ("e", "f")]
    render_turns = lambda ts: [0] * (10 * len(ts) + 5)
    assert fit_to_budget(render_turns, turns, 30, reserve=4) == (1, [0] * 25)
    assert fit_to_budget(render_turns, turns, 30, reserve=6) == (2, [0] * 15)
    assert fit_to_budget(render_turns, turns, None, reserve=4) == (0, [0] * 35)
    assert fit_to_budget(render_turns, turns, 3, reserve=0) == (3, [0] * 5)


def test_ctrl_c_while_loading_prints_one_line(monkeypatch, capsys):
    from mlx_redrafter import chat

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlx_redrafter.models.load", interrupt)
    assert chat.main(["--quiet"]) == 130
    assert capsys.readouterr().err == "mlx_redrafter.chat: interrupted\n"

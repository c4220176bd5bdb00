"""mlx_redrafter.server end to end: the real server in a child process (tiny random model, pinned
speculation, an API key) and the official `openai` client.

Greedy replies are compared with `mlx_redrafter.generate` and mlx-lm on the same model folder,
loaded here; logprobs with mlx-lm's; the prompt cache by a second chat turn's cached tokens.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from serving import API_KEY, openai_client, running, start_server

import mlx_redrafter

EOS = 2
MAX_REQUEST_BYTES = 200_000
SPEC = dict(beam_width=2, beam_length=3, prompt_lookup=0, guard=False)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("server"),
        "--api-key",
        API_KEY,
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--prompt-cache-bytes",
        "50MB",
    )
    with running(process):
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same model folder, loaded in this process for the references."""
    return mlx_redrafter.load(tiny_model_dir)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def settled_health(server, timeout: float = 30.0) -> dict:
    """/health once the worker is idle (its counters move just after a reply is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        idle = health["queue"] == {"waiting": 0, "running": False}
        if idle or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def mlx_lm_greedy(model, prompt: list[int], max_tokens: int):
    """mlx-lm's greedy tokens, cut after EOS, and each step's log-probs vector."""
    tokens, rows = [], []
    for token, logprobs in mlx_lm_generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        tokens.append(int(token))
        rows.append(np.array(logprobs))
        if int(token) == EOS:
            break
    return tokens, rows


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t != EOS])


USER = [{"role": "user", "content": "t5 t9 t14 t3 t77"}]


# ---------------------------------------------------------------------------- endpoints
def test_models_and_health(server, client, model_id, tiny_model_dir):
    assert model_id == tiny_model_dir.name
    health = server.health()
    assert health["status"] == "ok" and health["model"] == model_id
    assert health["prompt_cache"]["max_bytes"] == 50_000_000
    assert health["memory"]["active_bytes"] > 0


def test_chat_greedy_equals_generate_and_mlx_lm(client, model_id, local):
    model, tokenizer, drafter = local
    prompt = chat_ids(tokenizer, USER)
    expected, _ = mlx_lm_greedy(model, prompt, 12)
    ours = mlx_redrafter.generate(model, tokenizer, prompt, drafter=drafter, max_tokens=12, **SPEC)
    assert ours == text_of(tokenizer, expected)
    reply = client.chat.completions.create(model=model_id, messages=USER, max_tokens=12)
    assert reply.choices[0].message.content == ours
    assert reply.choices[0].finish_reason == ("stop" if expected[-1] == EOS else "length")
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected)  # EOS counted, as mlx-lm counts
    assert reply.usage.total_tokens == len(prompt) + len(expected)
    extra = reply.usage.model_extra
    assert extra["speculation"] == {
        "drafter": True,
        "beam_width": 2,
        "beam_length": 3,
        "prompt_lookup": 0,
    }
    assert extra["tokens_per_step"] >= 1.0


def test_chat_stream_equals_whole_reply(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=USER, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=USER,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_text_completion_stream_and_not(client, model_id, local):
    model, tokenizer, drafter = local
    prompt = "t8 t21 t34 t55"
    expected = mlx_redrafter.generate(
        model, tokenizer, prompt, drafter=drafter, max_tokens=9, **SPEC
    )
    reply = client.completions.create(model=model_id, prompt=prompt, max_tokens=9)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=9, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_stop_strings_end_the_text(client, model_id, local):
    model, tokenizer, drafter = local
    prompt = chat_ids(tokenizer, USER)
    tokens, _ = mlx_lm_greedy(model, prompt, 12)
    words = text_of(tokenizer, tokens).split()
    assert len(words) >= 4, "the tiny model's greedy reply is too short for this test"
    stop = words[3]
    full = text_of(tokenizer, tokens)
    expected = full[: full.find(stop)]
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=model_id, messages=USER, max_tokens=12, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].message.content or "", reply.choices[0].finish_reason
        assert text == expected and reason == "stop"


def test_logprobs_equal_the_models_own(client, model_id, local):
    model, tokenizer, _ = local
    prompt = chat_ids(tokenizer, USER)
    expected, rows = mlx_lm_greedy(model, prompt, 10)
    reply = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=10, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    shown = [t for t in expected if t != EOS]
    assert [entry.model_extra["id"] for entry in content] == shown
    for entry, token, row in zip(content, shown, rows, strict=False):
        assert abs(entry.logprob - row[token]) < 1e-4
        top = np.argsort(-row)[:3]
        assert [int(tokenizer.convert_tokens_to_ids(t.token)) for t in entry.top_logprobs] == list(
            top
        )
        assert np.allclose([t.logprob for t in entry.top_logprobs], row[top], atol=1e-4)
    text = (
        client.completions.create(model=model_id, prompt="t8 t21 t34", max_tokens=5, logprobs=2)
        .choices[0]
        .logprobs
    )
    assert len(text.token_logprobs) == len(text.tokens) == len(text.top_logprobs) > 0
    assert all(len(top) == 2 for top in text.top_logprobs)


def test_second_chat_turn_reuses_the_cache(client, model_id, local):
    model, tokenizer, drafter = local
    first = [{"role": "user", "content": "t40 t41 t42 t43"}]
    reply = client.chat.completions.create(model=model_id, messages=first, max_tokens=6)
    answer = reply.choices[0].message.content or ""
    second = first + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "t44 t45"},
    ]
    again = client.chat.completions.create(model=model_id, messages=second, max_tokens=6)
    cached = again.usage.prompt_tokens_details.cached_tokens
    before = reply.usage.prompt_tokens + reply.usage.completion_tokens
    # the template closes the reply with "t2" where the engine's EOS was: nothing re-renders
    # differently but the reply's last token, which the engine never caches
    assert cached >= before - 2
    assert cached < again.usage.prompt_tokens
    expected = mlx_redrafter.generate(
        model, tokenizer, chat_ids(tokenizer, second), drafter=drafter, max_tokens=6, **SPEC
    )
    assert again.choices[0].message.content == expected


def test_extension_fields_set_speculation_per_request(client, model_id, local):
    model, tokenizer, drafter = local
    plain = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=8, extra_body={"use_drafter": False}
    )
    assert plain.usage.model_extra["speculation"]["drafter"] is False
    assert plain.usage.model_extra["tokens_per_step"] == 1.0
    wide = client.chat.completions.create(
        model=model_id,
        messages=USER,
        max_tokens=8,
        extra_body={"beam_width": 3, "beam_length": 4, "prompt_lookup": 2},
    )
    assert wide.usage.model_extra["speculation"] == {
        "drafter": True,
        "beam_width": 3,
        "beam_length": 4,
        "prompt_lookup": 2,
    }
    assert plain.choices[0].message.content == wide.choices[0].message.content


def test_penalties_and_logit_bias_apply(client, model_id):
    forced = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=4, logit_bias={"99": 100}
    )
    assert forced.choices[0].message.content == "t99 t99 t99 t99"
    varied = client.chat.completions.create(
        model=model_id,
        messages=USER,
        max_tokens=4,
        logit_bias={"99": 100},
        extra_body={"repetition_penalty": 1e6},
        presence_penalty=2.0,
    )
    assert varied.choices[0].message.content.split().count("t99") < 4


def test_seeded_sampling_repeats(client, model_id):
    """The seed reaches the engine: the same seed repeats a sampled reply, others differ. (No
    drafter here, to keep the test short; the engine's tests cover seeded speculative
    sampling.)"""

    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=model_id,
            messages=USER,
            max_tokens=8,
            temperature=5.0,
            seed=seed,
            extra_body={"use_drafter": False},
        )
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


# ---------------------------------------------------------------------------- bad input
def post(server, path: str, payload, key: str | None = API_KEY, raw: bytes | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(payload).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


GOOD = {"messages": USER, "max_tokens": 2}
LONG = " ".join(f"t{i % 100 + 3}" for i in range(600))  # past the tiny model's 512 tokens
BAD = {
    "malformed JSON": (None, b'{"messages": [', 400, "JSON"),
    "missing messages": ({"max_tokens": 2}, None, 400, "messages"),
    "messages not a list": ({"messages": "t5 t6"}, None, 400, "messages"),
    "temperature not a number": (dict(GOOD, temperature="hot"), None, 400, "temperature"),
    "negative max_tokens": (dict(GOOD, max_tokens=-3), None, 400, "max_tokens"),
    "huge max_tokens": (dict(GOOD, max_tokens=10**9), None, 400, "max_tokens"),
    "max_tokens past the context": (dict(GOOD, max_tokens=505), None, 400, "max_tokens"),
    "negative temperature": (dict(GOOD, temperature=-0.5), None, 400, "temperature"),
    "n = 2": (dict(GOOD, n=2), None, 400, "n"),
    "unknown model": (dict(GOOD, model="/etc/passwd"), None, 404, "model"),
    "prompt over the context": (
        {"messages": [{"role": "user", "content": LONG}]},
        None,
        400,
        "context",
    ),
    "body over the limit": (None, b" " * (MAX_REQUEST_BYTES + 1), 413, "limit"),
    "bad beam width": (dict(GOOD, beam_width=0), None, 400, "beam_width"),
    "logit_bias outside the vocabulary": (
        dict(GOOD, logit_bias={"100000": 1}),
        None,
        400,
        "100000",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_json_4xx_and_the_server_goes_on(server, case):
    payload, raw, status, named = BAD[case]
    response = post(server, "/v1/chat/completions", payload, raw=raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert named in error["message"] and error["type"]
    good = post(server, "/v1/chat/completions", GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_is_required(server, key):
    response = post(server, "/v1/chat/completions", GOOD, key=key)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert post(server, "/v1/chat/completions", GOOD).status_code == 200


def test_openai_client_raises_on_bad_requests(server, model_id):
    wrong = openai_client(server, api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="n=2"):
        right.chat.completions.create(model=model_id, messages=USER, n=2)
    with pytest.raises(openai.NotFoundError):
        right.chat.completions.create(model="gpt-4o", messages=USER)


# ---------------------------------------------------------------------------- load
PROMPTS = [f"t{10 + i} t{30 + i} t{60 + i}" for i in range(4)]


def test_sixteen_clients_at_once(server, client, model_id):
    """16 clients x 3 requests, streamed and not; 4 clients give up on their first request
    while it waits in the queue, 2 close their first stream after one chunk. Every other
    request gets the greedy reply it gets alone."""
    expected = {
        p: client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": p}], max_tokens=24
        )
        .choices[0]
        .message.content
        for p in PROMPTS
    }
    before = settled_health(server)
    results, failures, lock = [], [], threading.Lock()

    def run(i: int) -> None:
        own = openai_client(server)
        for j in range(3):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            messages = [{"role": "user", "content": prompt}]
            try:
                if i in (4, 5) and j == 0:  # read one chunk of a stream, then hang up
                    stream = own.chat.completions.create(
                        model=model_id, messages=messages, max_tokens=24, stream=True
                    )
                    next(iter(stream))
                    stream.close()
                    continue
                if i < 4 and j == 0:  # disconnect while queued: a client timeout
                    quick = own.with_options(timeout=0.3)
                    try:
                        quick.chat.completions.create(
                            model=model_id, messages=messages, max_tokens=24
                        )
                    except openai.APITimeoutError:
                        continue
                if (i + j) % 2:
                    chunks = own.chat.completions.create(
                        model=model_id, messages=messages, max_tokens=24, stream=True
                    )
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    reply = own.chat.completions.create(
                        model=model_id, messages=messages, max_tokens=24
                    )
                    text = reply.choices[0].message.content or ""
                with lock:
                    results.append(text == expected[prompt])
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                with lock:
                    failures.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert len(results) >= 16 * 3 - 6 and all(results)
    after = settled_health(server)
    assert after["status"] == "ok" and after["queue"] == {"waiting": 0, "running": False}
    assert after["requests"]["failed"] == before["requests"]["failed"]
    # a hang-up counts only when the server sees it before the reply is done (a tiny model's
    # 24 tokens may be); test_a_client_that_hangs_up_cancels_its_generation pins the count
    assert 0 <= after["requests"]["cancelled"] - before["requests"]["cancelled"] <= 6
    bound = after["prompt_cache"]["max_bytes"]
    assert after["prompt_cache"]["bytes"] <= bound
    assert after["memory"]["active_bytes"] <= before["memory"]["active_bytes"] + bound


def test_a_client_that_hangs_up_cancels_its_generation(server, client, model_id):
    """A stream closed mid-reply stops its generation; a request given up while queued behind
    it is never run. Both are counted as cancellations. (The queued request asks for logprobs,
    which run alone: it waits for the batch to drain instead of joining it.)"""
    before = settled_health(server)
    endless = {"2": -100}  # no EOS: the reply would run to max_tokens
    stream = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=480, logit_bias=endless, stream=True
    )
    next(iter(stream))  # the worker is busy with this reply now
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).chat.completions.create(
            model=model_id, messages=USER, max_tokens=4, logprobs=True
        )
    time.sleep(0.5)  # the server notices the hang-up while the request waits
    stream.close()
    after = settled_health(server)
    assert after["requests"]["cancelled"] - before["requests"]["cancelled"] == 2
    assert after["requests"]["completed"] == before["requests"]["completed"]

"""The server's continuous batching: concurrent requests share the batched forwards and each
gets the reply it gets alone; a client that hangs up frees its row for a queued request.

The server here batches at most 3 rows (`--decode-concurrency 3`), so that 4 requests fill
it and the 4th waits for a row.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlx_lm.sample_utils import make_logits_processors
from serving import API_KEY, openai_client, running, start_server

import mlx_redrafter
from mlx_redrafter.server.batching import BatchLimits, runs_alone
from mlx_redrafter.server.cli import batch_limits, check_args, setup_arg_parser
from mlx_redrafter.server.generation import GenerationRequest

ROWS = 3
SPEC = dict(beam_width=2, beam_length=3, prompt_lookup=0, guard=False)
ENDLESS = {"2": -100}  # no EOS: a reply runs to max_tokens


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    process = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("batching"),
        "--api-key",
        API_KEY,
        "--decode-concurrency",
        str(ROWS),
    )
    with running(process):
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def settled(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if health["queue"] == {"waiting": 0, "running": 0} or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def wait_for(server, check, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if check(health):
            return health
        assert time.monotonic() < deadline, f"/health never got there: {health}"
        time.sleep(0.02)


def test_concurrent_requests_share_forwards_and_equal_generate(
    server, client, model_id, tiny_model_dir
):
    """4 greedy requests at once (3 rows: one joins when a row frees), streamed and not: each
    reply is `generate`'s for its prompt alone, and the batch ran fewer forwards than the
    requests' steps together."""
    model, tokenizer, drafter = mlx_redrafter.load(tiny_model_dir)
    contents = [f"t{10 + i} t{40 + i} t{70 + i}" for i in range(4)]
    bias = {int(k): v for k, v in ENDLESS.items()}
    expected = []
    for content in contents:
        prompt = list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        )
        expected.append(
            mlx_redrafter.generate(
                model,
                tokenizer,
                prompt,
                drafter=drafter,
                max_tokens=40,
                logits_processors=make_logits_processors(logit_bias=bias),
                **SPEC,
            )
        )
    before = settled(server)
    barrier = threading.Barrier(len(contents))
    texts: dict[int, str] = {}
    errors: list[str] = []

    def ask(i: int) -> None:
        own = openai_client(server)
        messages = [{"role": "user", "content": contents[i]}]
        barrier.wait()
        try:
            if i % 2:
                chunks = own.chat.completions.create(
                    model=model_id,
                    messages=messages,
                    max_tokens=40,
                    logit_bias=ENDLESS,
                    stream=True,
                )
                texts[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                reply = own.chat.completions.create(
                    model=model_id, messages=messages, max_tokens=40, logit_bias=ENDLESS
                )
                texts[i] = reply.choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(contents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert [texts[i] for i in range(len(contents))] == expected
    after = settled(server)
    batch, was = after["batch"], before["batch"]
    assert batch["max_rows"] == ROWS
    assert batch["joined"] - was["joined"] == len(contents)
    steps = batch["row_steps"] - was["row_steps"]
    forwards = batch["forwards"] - was["forwards"]
    assert steps >= len(contents)  # every request decoded (40 tokens: several steps each)
    assert 0 < forwards < steps  # rows shared forwards
    assert after["requests"]["completed"] - before["requests"]["completed"] == len(contents)


def test_a_hang_up_frees_its_row(server, client, model_id):
    """3 endless streams fill the rows and a 4th request waits in the queue; closing one stream
    removes its row, and the 4th request is served while the other two still run."""
    before = settled(server)
    streams = []
    for _ in range(ROWS):
        stream = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "t5 t6"}],
            max_tokens=480,
            logit_bias=ENDLESS,
            stream=True,
        )
        next(iter(stream))  # its row is decoding
        streams.append(stream)
    reply: list = []
    waiter = threading.Thread(
        target=lambda: reply.append(
            client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": "t9"}], max_tokens=3
            )
        )
    )
    waiter.start()
    wait_for(server, lambda h: h["queue"] == {"waiting": 1, "running": ROWS})
    streams[0].close()
    waiter.join(60)
    assert reply and reply[0].choices[0].finish_reason in ("stop", "length")
    during = server.health()
    for stream in streams[1:]:
        stream.close()
    after = settled(server)
    # the 4th request completed while the two other endless streams were running: they end
    # cancelled (by their hang-ups), not completed
    assert during["requests"]["completed"] - before["requests"]["completed"] == 1
    assert after["requests"]["completed"] - before["requests"]["completed"] == 1
    assert after["requests"]["cancelled"] - before["requests"]["cancelled"] == ROWS


def test_a_seed_fixes_a_sampled_batched_reply(client, model_id):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "t5 t9 t14"}],
            max_tokens=8,
            temperature=5.0,
            seed=seed,
        )
        return reply.choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


# ---------------------------------------------------------------------------- units
def parse(*argv: str):
    args = setup_arg_parser().parse_args(list(argv))
    check_args(args)
    return args


def test_batching_flags_mirror_mlx_lm_server():
    assert batch_limits(parse()) == BatchLimits(32, 8)  # mlx_lm.server's defaults
    assert batch_limits(parse("--decode-concurrency", "4", "--prompt-concurrency", "2")) == (
        BatchLimits(4, 2)
    )
    assert batch_limits(parse("--completion-batch-size", "5")) == BatchLimits(5, 8)
    assert batch_limits(parse("--no-batching")) is None
    assert batch_limits(parse("--decode-concurrency", "1")) is None
    assert batch_limits(parse("--kv-bits", "8")) is None  # the batched cache is not quantized
    with pytest.raises(ValueError, match="--prompt-concurrency must be >= 1"):
        parse("--prompt-concurrency", "0")


def test_what_runs_alone():
    class Served:
        drafter = object()
        speculation = dict(beam_width=2, beam_length=3, prompt_lookup=0)

    def request(**kwargs) -> GenerationRequest:
        return GenerationRequest(prompt="t1", **kwargs)

    assert runs_alone(Served, request()) is None
    assert runs_alone(Served, request(speculation=dict(beam_width=2, use_drafter=True))) is None
    assert runs_alone(Served, request(top_logprobs=0)) == "logprobs"
    assert runs_alone(Served, request(speculation=dict(beam_length=4))) is not None
    assert runs_alone(Served, request(speculation=dict(use_drafter=False))) is not None


def test_without_batching_the_worker_runs_each_job_to_its_end_in_order():
    """--no-batching: the sequential worker (no BatchSession) runs one job at a time, FIFO."""
    import asyncio

    from mlx_redrafter.server.jobs import Job, Worker

    order, overlaps, running = [], [], []

    def run(served, job: Job) -> str:
        overlaps.append(len(running))
        running.append(job)
        time.sleep(0.01)
        order.append(job.request)
        running.remove(job)
        return "completed"

    worker = Worker(lambda: "served", run, batch=None)
    worker.start()
    wait = time.monotonic() + 10
    while worker.stats.state != "ready" and time.monotonic() < wait:
        time.sleep(0.01)
    loop = asyncio.new_event_loop()
    try:
        for i in range(5):
            worker.submit(Job(i, loop))
        wait = time.monotonic() + 10
        while worker.stats.completed < 5 and time.monotonic() < wait:
            time.sleep(0.01)
        worker.stop()
    finally:
        loop.close()
    assert worker.batch is None and order == list(range(5)) and overlaps == [0] * 5
    assert worker.stats.completed == 5 and worker.stats.state == "stopped"

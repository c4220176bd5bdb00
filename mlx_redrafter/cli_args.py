"""Command-line options users bring from mlx-lm, shared by `generate`, `chat` and the benchmark.

Same names, defaults and meanings as `mlx_lm.generate` (--temp 0.0, --top-p 1.0, --top-k 0,
--min-p 0.0, --seed none); where tree verification cannot honour one (see
`cache.refuse_max_kv_size`) the error says why instead of silently ignoring it. --max-tokens is
the one default each front end sets itself (a reply, a generation and a benchmark run differ).
"""

from __future__ import annotations

import argparse

from .accept import ACCEPT_RULES
from .sampling import SamplingParams

DEFAULT_KV_GROUP_SIZE = 64
DEFAULT_QUANTIZED_KV_START = 5000  # mlx-lm's default
# mlx_lm.generate's sampling defaults: top-p 1.0 and top-k 0 keep every token
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.0
ACCEPT_HELP = (
    "acceptance rule when sampling (temp > 0): exact (default; tokens distributed exactly as "
    "the LLM's own sampling), match (keep a drafted token only if it equals the LLM's own "
    "sample, mlx-lm's rule; also exact) or reference (the ReDrafter reference's per-beam rule; "
    "not distribution-exact). Greedy decoding ignores it"
)


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """--model and --drafter: where the model and its drafter come from."""
    parser.add_argument(
        "--model",
        default=None,
        help="model folder or Hugging Face repo id (default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--drafter",
        default=None,
        help="drafter folder or repo id (default: the model folder's drafter/)",
    )


def add_sampling_args(
    parser: argparse.ArgumentParser,
    *,
    max_tokens: int | None,
    max_tokens_help: str | None = None,
    seed: int | None = None,
) -> None:
    """--max-tokens (default given by the front end), --temp, --top-p, --top-k, --min-p,
    --seed and --accept. `seed` is the benchmark's fixed default (its runs are reproducible);
    generate and chat keep mlx-lm's none."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=max_tokens,
        help=max_tokens_help or f"most tokens to generate; -1: no limit (default {max_tokens})",
    )
    group.add_argument(
        "--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature (0: greedy)"
    )
    group.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling top-p (1: off)"
    )
    group.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, help="sample from the k likeliest (0: off)"
    )
    group.add_argument(
        "--min-p", type=float, default=DEFAULT_MIN_P, help="min-p sampling threshold (0: off)"
    )
    group.add_argument(
        "--seed",
        type=int,
        default=seed,
        help=f"random seed for sampling (default: {'none' if seed is None else seed})",
    )
    group.add_argument("--accept", choices=ACCEPT_RULES, default="exact", help=ACCEPT_HELP)


def sampling_options(args: argparse.Namespace) -> dict:
    """`generate_step`'s sampling keyword arguments from parsed `add_sampling_args` flags:
    temp, top_p, top_k, min_p and accept, checked here so that a bad value is named before any
    model loads. --seed and --max-tokens are not among them: each front end applies those."""
    options = dict(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    SamplingParams(**options)
    return dict(options, accept=args.accept)


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

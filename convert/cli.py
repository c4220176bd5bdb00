"""`mlx_redrafter.convert`: one command from PyTorch / Hugging Face / GGUF to an MLX folder.

Three jobs, picked by the output flag (see `jobs`):
- `--mlx-path OUT`: a base model (`--hf-path` or `--gguf`) in mlx-lm layout, plus `drafter/`
  when `--drafter-path` is given; with only `--drafter-path`, OUT is the MLX drafter folder.
- `--add-drafter-to DIR`: put a converted drafter into an existing model folder as `DIR/drafter`.
- `--export-torch OUT`: an MLX drafter back to the reference PyTorch / TensorRT-LLM layout; a
  reduced draft vocabulary is expanded to a full-vocabulary head with the same beams
  (`full_vocab`: one constant feature, every other token scores -50000).
Every output is written beside its target and renamed into place at the end: a failed
conversion leaves nothing behind. Errors print one line on stderr and exit with status 2;
Ctrl-C prints `mlx_redrafter.convert: interrupted` and exits with 130.
This module only parses and checks arguments (so `--help` is instant); `jobs` does the work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import ConversionError

PROG = "mlx_redrafter.convert"
DTYPE_CHOICES = ("float16", "bfloat16", "float32")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse prints the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert ReDrafter drafters (PyTorch reference layout) and base models "
        "(Hugging Face folders or repo ids, llama GGUF files) into folders that "
        "mlx_redrafter.load opens; or export an MLX drafter back to the reference layout.",
    )
    src = parser.add_argument_group("inputs")
    base = src.add_mutually_exclusive_group()
    base.add_argument("--hf-path", metavar="DIR|REPO", help="Hugging Face base model")
    base.add_argument("--gguf", metavar="FILE", help="llama-architecture GGUF file")
    src.add_argument(
        "--drafter-path",
        metavar="DIR|REPO",
        help="drafter: reference layout (config.json + model.safetensors or pytorch_model.bin) "
        "or an MLX drafter / model folder (for --export-torch)",
    )
    out = parser.add_argument_group("output (exactly one)").add_mutually_exclusive_group(
        required=True
    )
    out.add_argument("--mlx-path", metavar="OUT", help="new output folder (must not exist)")
    out.add_argument("--add-drafter-to", metavar="DIR", help="existing model folder: adds drafter/")
    out.add_argument("--export-torch", metavar="OUT", help="MLX drafter -> reference layout")
    opts = parser.add_argument_group("conversion")
    opts.add_argument("-q", "--quantize", action="store_true", help="quantize (--hf-path)")
    opts.add_argument(
        "--q-bits", type=int, default=None, metavar="N", help="bits per weight (default 4)"
    )
    opts.add_argument(
        "--q-group-size", type=int, default=None, metavar="N", help="group size (default 64)"
    )
    opts.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="float dtype of the written weights (default: the source's)",
    )
    opts.add_argument(
        "--dequantize", action="store_true", help="--gguf: write float weights (default float32)"
    )
    opts.add_argument("--force", action="store_true", help="replace an existing output")
    opts.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ------------------------------------------------------------------------------ checks
def check_args(args: argparse.Namespace) -> None:
    base = args.hf_path or args.gguf
    if args.mlx_path is not None and not (base or args.drafter_path):
        raise ConversionError("--mlx-path needs --hf-path, --gguf or --drafter-path")
    for flag in ("add_drafter_to", "export_torch"):
        if getattr(args, flag) is None:
            continue
        name = "--" + flag.replace("_", "-")
        if not args.drafter_path:
            raise ConversionError(f"{name} needs --drafter-path")
        if base:
            raise ConversionError(f"{name} takes a drafter only (drop --hf-path / --gguf)")
    if args.quantize and not args.hf_path:
        raise ConversionError(
            "-q/--quantize applies to --hf-path only (a GGUF keeps its own quantization)"
        )
    if (args.q_bits is not None or args.q_group_size is not None) and not args.quantize:
        raise ConversionError("--q-bits/--q-group-size need -q/--quantize")
    if args.dequantize and not args.gguf:
        raise ConversionError("--dequantize applies to --gguf only")


def run(args: argparse.Namespace) -> str:
    check_args(args)
    from . import jobs  # mlx, mlx-lm, transformers: imported only once there is work to do

    progress = not args.no_progress and sys.stderr.isatty()
    if args.export_torch is not None:
        return jobs.export_torch(args, progress)
    if args.add_drafter_to is not None:
        return jobs.add_drafter(args, progress)
    return jobs.convert_to_mlx(args, progress)


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the staged output is already removed on the way out
        print(f"{PROG}: interrupted", file=sys.stderr)  # as mlx_redrafter._cli.interrupted
        return 130
    print(f"{PROG}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The converter's three jobs: to an MLX folder, a drafter into a model folder, export.

Each reads and checks its inputs first, then writes through `atomic.staged_output`, so a
failure at any point (the drafter/base-model fit is checked last) leaves nothing behind.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import mlx_redrafter  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlx_redrafter.models import DRAFTER_PATTERNS, DRAFTER_SUBDIR

from .atomic import check_absent, staged_output
from .drafter_io import (
    check_against_model,
    read_drafter,
    write_mlx_drafter,
    write_reference_drafter,
)
from .errors import ConversionError
from .full_vocab import expand_to_full_vocabulary
from .hf import convert_gguf_model, convert_hf
from .hub import BASE_PATTERNS, resolve_input


def _local(path: str | None) -> Path | None:
    return Path(path).expanduser().resolve() if path and Path(path).expanduser().exists() else None


def check_no_overlap(output: Path, inputs: Sequence[str | None]) -> None:
    """Writing (or --force replacing) the output must never touch an input."""
    out = output.expanduser().resolve()
    for name in inputs:
        src = _local(name)
        if src is not None and (out == src or out.is_relative_to(src) or src.is_relative_to(out)):
            raise ConversionError(f"output {output} overlaps the input {name}")


def convert_to_mlx(args: argparse.Namespace, progress: bool) -> str:
    """`--mlx-path OUT`. A `--hf-path` folder that holds a `drafter/` (an mlx_redrafter model
    folder being re-quantized or re-cast) keeps it: the drafter is read, cast with `--dtype`
    (never quantized, as `load` runs it in the model's float dtype), checked against the new
    base model and written to OUT/drafter, as `--drafter-path SRC/drafter` would be; an explicit
    `--drafter-path` replaces it."""
    out = Path(args.mlx_path)
    check_no_overlap(out, [args.hf_path, args.gguf, args.drafter_path])
    check_absent(out, args.force)
    drafter, drafter_src = None, args.drafter_path
    if drafter_src:  # read and checked first: fail before the long base conversion
        src = resolve_input(drafter_src, what="drafter", patterns=DRAFTER_PATTERNS)
        drafter = read_drafter(src, dtype=args.dtype, progress=progress)
    hf = resolve_input(args.hf_path, what="model", patterns=BASE_PATTERNS) if args.hf_path else None
    if drafter is None and hf is not None and (hf / DRAFTER_SUBDIR / "config.json").is_file():
        drafter_src = str(hf / DRAFTER_SUBDIR)
        drafter = read_drafter(hf / DRAFTER_SUBDIR, dtype=args.dtype, progress=progress)
    with staged_output(out, force=args.force) as staged:
        if hf is not None:
            convert_hf(
                hf,
                staged,
                quantize=args.quantize,
                q_bits=args.q_bits,
                q_group_size=args.q_group_size,
                dtype=args.dtype,
                progress=progress,
            )
        elif args.gguf:
            convert_gguf_model(
                Path(args.gguf),
                staged,
                dequantize=args.dequantize,
                dtype=args.dtype,
                progress=progress,
            )
        if drafter is not None and (hf is not None or args.gguf):
            check_against_model(drafter, staged)
            write_mlx_drafter(drafter, staged / DRAFTER_SUBDIR)
        elif drafter is not None:
            write_mlx_drafter(drafter, staged)
    if hf is None and not args.gguf:
        return f"wrote the MLX drafter {out}"
    if drafter is None:
        return f"wrote {out}"
    carried = f" from {drafter_src}" if drafter_src != args.drafter_path else ""
    return f"wrote {out} (with {DRAFTER_SUBDIR}/{carried})"


def add_drafter(args: argparse.Namespace, progress: bool) -> str:
    model_dir = Path(args.add_drafter_to)
    if not (model_dir / "config.json").is_file():
        raise ConversionError(f"--add-drafter-to {model_dir}: not a model folder (no config.json)")
    target = model_dir / DRAFTER_SUBDIR
    check_no_overlap(target, [args.drafter_path])
    check_absent(target, args.force)
    src = resolve_input(args.drafter_path, what="drafter", patterns=DRAFTER_PATTERNS)
    drafter = read_drafter(src, dtype=args.dtype, progress=progress)
    check_against_model(drafter, model_dir)
    with staged_output(target, force=args.force) as staged:
        write_mlx_drafter(drafter, staged)
    return f"wrote {target}"


def export_torch(args: argparse.Namespace, progress: bool) -> str:
    out = Path(args.export_torch)
    check_no_overlap(out, [args.drafter_path])
    check_absent(out, args.force)
    src = resolve_input(args.drafter_path, what="drafter", patterns=DRAFTER_PATTERNS)
    drafter = read_drafter(src, dtype=args.dtype, progress=progress)
    reduced = drafter.config.draft_vocab_size
    if reduced is not None:
        drafter = expand_to_full_vocabulary(drafter)
    with staged_output(out, force=args.force) as staged:
        write_reference_drafter(drafter, staged)
    if reduced is None:
        return f"wrote the reference-layout drafter {out}"
    c = drafter.config
    return (
        f"wrote the reference-layout drafter {out}: its draft vocabulary of {reduced} tokens is "
        f"expanded to the full {c.vocab_size} (exit_dim {c.exit_dim}, one constant feature; "
        "other tokens score -50000), which gives the same beams in the reference's beam search"
    )

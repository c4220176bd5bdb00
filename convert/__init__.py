"""Converter: PyTorch ReDrafter drafters, Hugging Face and GGUF base models -> MLX folders.

Lives at the repository's top level as `convert/` and installs as `mlx_redrafter.convert`
(console script `mlx_redrafter.convert`, or `python -m mlx_redrafter.convert`). Import it by that
name only: a top-level `convert` would be a second copy of every module.

Modules: `cli` (arguments, the three jobs), `drafter_io` (reference layout <-> MLX drafter),
`full_vocab` (a reduced draft vocabulary as a full-vocabulary head with the same beams, for
export), `hf` (Hugging Face / GGUF base models through mlx-lm), `hub` (repo ids), `weights_io`
(safetensors and PyTorch files), `atomic` (all-or-nothing output folders), `errors`.
"""

from .errors import ConversionError

__all__ = ["ConversionError", "main"]


def main(argv=None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)

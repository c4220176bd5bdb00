"""`python -m mlx_redrafter.server`: the same as the `mlx_redrafter.server` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

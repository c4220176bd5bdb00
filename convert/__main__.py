"""`python -m convert` (from the repository root) or `python -m mlx_redrafter.convert`."""

import sys

from .cli import main

sys.exit(main())

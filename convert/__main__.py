"""`python -m mlx_redrafter.convert` (the same as the console script `mlx_redrafter.convert`)."""

import sys

from .cli import main

sys.exit(main())

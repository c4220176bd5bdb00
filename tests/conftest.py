import sys
from pathlib import Path

# OpenBLAS must be loaded before mlx.core: importing the package first does it.
import mlx_redrafter  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))

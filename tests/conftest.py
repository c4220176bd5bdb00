import sys
from pathlib import Path

# OpenBLAS must be loaded before mlx.core: importing the package first does it.
import mlx_redrafter  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny llama folder with a drafter/ inside, as `mlx_redrafter.load` expects."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))

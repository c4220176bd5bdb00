# OpenBLAS must be loaded before mlx.core: importing the package first does it.
import mlx_redrafter  # noqa: F401

# isort: split
import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny llama folder with a drafter/ inside, as `mlx_redrafter.load` expects."""
    from mlx_redrafter.benchmarks.tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))

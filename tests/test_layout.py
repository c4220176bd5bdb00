"""The package's layering: the engine (everything under mlx_redrafter/) never depends on the
benchmarks or the tests; the benchmarks may depend on the engine, never the reverse.

`mlx_redrafter.benchmarks` and `mlx_redrafter.convert` are installed from the top-level
benchmarks/ and convert/ folders (pyproject's package-dir), so they are not files under
mlx_redrafter/ and are not imported here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlx_redrafter"
FORBIDDEN = ("mlx_redrafter.benchmarks", "benchmarks", "tests")
# `import benchmarks...`, `from benchmarks...`, `from mlx_redrafter.benchmarks...`,
# `from .benchmarks...` / `from ..benchmarks...`, `from . import benchmarks`,
# `from mlx_redrafter import benchmarks`
IMPORT = re.compile(
    r"^\s*(?:import\s+(?:mlx_redrafter\.)?benchmarks\b"
    r"|from\s+(?:mlx_redrafter\.|\.+)?benchmarks\b"
    r"|from\s+(?:mlx_redrafter|\.+)\s+import\s+(?:\([^)]*|[^\n]*)\bbenchmarks\b)",
    re.MULTILINE,
)


def engine_modules() -> list[str]:
    """Every module under mlx_redrafter/ (`__main__` modules run a CLI, so they are left out)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def test_the_engine_loads_no_benchmark_or_test_module():
    modules = engine_modules()
    assert "mlx_redrafter.generate" in modules and "mlx_redrafter.train.evaluate" in modules
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        # the front ends' parsers: what runs at a command's start, lazy imports included
        "for name in ('generate', 'chat', 'train.cli'):\n"
        "    importlib.import_module('mlx_redrafter.' + name).setup_arg_parser()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    # from the root's parent: neither benchmarks/ nor tests/ is on sys.path as a folder
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.splitlines()[-1])
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"engine modules loaded {bad}"


def test_no_engine_file_imports_the_benchmarks():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for match in IMPORT.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert offenders == []


def test_the_import_pattern_catches_each_spelling():
    for line in (
        "from .benchmarks.autotune import resolve_shape",
        "    from ..benchmarks.prompts import DEFAULT_PROMPTS",
        "from mlx_redrafter.benchmarks import metrics",
        "import mlx_redrafter.benchmarks.autotune as autotune",
        "import benchmarks",
        "from benchmarks.profiling import profiled_decode",
        "from . import benchmarks",
        "from mlx_redrafter import (\n    benchmarks,\n)",
    ):
        assert IMPORT.search(line), line
    for line in ('"benchmark": "mlx_redrafter.benchmarks.run",', "# see benchmarks/autotune.py"):
        assert not IMPORT.search(line), line

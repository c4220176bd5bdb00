"""The package's layering: the engine (everything under mlx_redrafter/) never depends on the
benchmarks, the converter or the tests; they may depend on the engine, never the reverse (the
converter imports the engine's GGUF reader, mlx_redrafter/gguf.py, not the other way round).
The test fixtures the benchmarks ship (`mlx_redrafter.benchmarks.tiny`) are held out of the
engine by the same rule.

`mlx_redrafter.benchmarks` and `mlx_redrafter.convert` are installed from the top-level
benchmarks/ and convert/ folders (pyproject's package-dir). Each file has one name, the installed
one: with the repository root on sys.path the same file would also import as `benchmarks.x` or
`convert.x`, a second module object with its own globals (a monkeypatch or a cache on one is not
seen by the other). The last tests here check that nothing loads a project file twice."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlx_redrafter"
FORBIDDEN = ("mlx_redrafter.benchmarks", "benchmarks", "tests", "mlx_redrafter.convert", "convert")
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


SERVER_EXTRA = ("fastapi", "uvicorn", "starlette", "openai")


def test_the_engine_imports_without_the_server_extra():
    """Only mlx_redrafter.server needs the `server` extra: with its packages made unimportable,
    every other module (and the front ends' parsers) still imports."""
    modules = [m for m in engine_modules() if not m.startswith("mlx_redrafter.server")]
    code = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {SERVER_EXTRA!r}:\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "for name in ('generate', 'chat', 'train.cli'):\n"
        "    importlib.import_module('mlx_redrafter.' + name).setup_arg_parser()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_EXTRA!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "[]"


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


# ------------------------------------------------------------------------ one name per module
# installed package name -> the repository folder it is installed from (pyproject's package-dir)
PROJECT = {
    "mlx_redrafter": PACKAGE,
    "mlx_redrafter.convert": ROOT / "convert",
    "mlx_redrafter.benchmarks": ROOT / "benchmarks",
}
# A module may be left out only when it cannot be imported for want of one of these (optional,
# test-only or GPU-only dependencies). None is today: torch is imported lazily where it is used.
OPTIONAL = {"torch"}


def project_modules() -> list[str]:
    """Every module of the project by its installed name (`__main__` modules run a CLI)."""
    names = []
    for package, folder in PROJECT.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__main__" or "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


def files_loaded_twice(modules: list[str], extra: str = "") -> tuple[dict, dict]:
    """Import `modules` (then run `extra`) in a fresh interpreter whose sys.path has the
    repository root, as `python -m pytest` or a script run from the checkout has it; return
    ({project file: its module names} for files held by two module objects, {skipped: why})."""
    code = (
        "import importlib, json, os, sys\n"
        f"optional = {sorted(OPTIONAL)!r}\n"
        "skipped = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as e:\n"
        "        if (e.name or '').split('.')[0] not in optional:\n"
        "            raise\n"
        "        skipped[name] = repr(e)\n"
        f"{extra}\n"
        "held = {}\n"
        "for name, module in list(sys.modules.items()):\n"
        "    path = getattr(module, '__file__', None)\n"
        "    if path:\n"
        "        held.setdefault(os.path.realpath(path), {})[id(module)] = name\n"
        f"root = os.path.realpath({str(ROOT)!r}) + os.sep\n"
        "twice = {p: sorted(m.values()) for p, m in held.items()\n"
        "         if p.startswith(root) and len(m) > 1}\n"
        "print(json.dumps([twice, skipped]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    twice, skipped = json.loads(proc.stdout.splitlines()[-1])
    return twice, skipped


def test_every_project_module_is_loaded_under_one_name():
    modules = project_modules()
    for name in ("gguf", "convert.cli", "benchmarks.tiny", "kernels.launch", "train.evaluate"):
        assert "mlx_redrafter." + name in modules
    twice, skipped = files_loaded_twice(modules)
    assert twice == {}, f"loaded under two names: {twice}"
    if skipped:  # only for want of an OPTIONAL dependency (anything else fails the import)
        warnings.warn(f"not imported (optional dependency missing): {skipped}", stacklevel=1)


def test_the_check_sees_a_file_loaded_under_two_names():
    """The test above can fail: the top-level name next to the installed one is caught."""
    extra = "import benchmarks.metrics, mlx_redrafter.benchmarks.metrics"
    twice, _ = files_loaded_twice([], extra=extra)
    path = str((ROOT / "benchmarks" / "metrics.py").resolve())
    assert twice.get(path) == ["benchmarks.metrics", "mlx_redrafter.benchmarks.metrics"]


def test_this_test_run_loads_no_project_file_twice():
    """Every collected test module is imported by now (in a full run, all of them): none of
    their imports gave a project file a second module object."""
    held: dict[str, dict[int, str]] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(ROOT):
            held.setdefault(str(Path(path).resolve()), {})[id(module)] = name
    assert {p: sorted(m.values()) for p, m in held.items() if len(m) > 1} == {}


# `from benchmarks...`, `import convert`, `from tiny import ...`: names other than the installed one
OTHER_NAME = re.compile(r"^\s*(?:from|import)\s+(?:benchmarks|convert|tiny)\b", re.MULTILINE)
# a command line that runs convert/ or benchmarks/ by its folder name, in docs and docstrings
OTHER_COMMAND = re.compile(r"python3?\s+(?:-\w+\s+)*-m\s+(?:benchmarks|convert)\b")


@pytest.mark.parametrize("folder", ["mlx_redrafter", "convert", "benchmarks", "tests", "docs", "."])
def test_code_and_docs_use_only_the_installed_names(folder):
    """No import or command by a top-level name, and no sys.path insertion to make one work."""
    pattern = "*.md" if folder in ("docs", ".") else "*.py"
    offenders = []
    for path in sorted((ROOT / folder).glob(pattern if folder == "." else f"**/{pattern}")):
        text = path.read_text()
        found = OTHER_NAME.findall(text) + OTHER_COMMAND.findall(text)
        found += re.findall(r"sys\.path\.(?:insert|append)\(", text)
        offenders += [f"{path.relative_to(ROOT)}: {m.strip()}" for m in found]
    assert offenders == []

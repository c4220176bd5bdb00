"""The benchmarks as a user of a fresh clone or an installed package meets them: the MT-Bench
questions ship inside the package, and every benchmark command runs from any folder, with no
`../shared` beside the repository."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

import mlx_redrafter.benchmarks as benchmarks_pkg
from mlx_redrafter.benchmarks.prompts import DEFAULT_PROMPTS, load_questions
from mlx_redrafter.train.data import read_records
from mlx_redrafter.train.prompts import read_prompts

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(benchmarks_pkg.__file__).resolve().parent
MODULES = ["run", "cost_curve", "chat_check", "kernels", "gpu", "batch"]


def test_mt_bench_questions_ship_with_the_package():
    assert DEFAULT_PROMPTS.is_file() and DEFAULT_PROMPTS.parent == PACKAGE / "data"
    assert "shared" not in DEFAULT_PROMPTS.parts
    questions = load_questions(DEFAULT_PROMPTS)
    assert len(questions) == 80 and len({q.question_id for q in questions}) == 80
    per_category = Counter(q.category for q in questions)
    assert len(per_category) == 8 and set(per_category.values()) == {10}
    assert all(len(q.turns) == 2 for q in questions)


def test_stored_evaluation_answers_belong_to_the_packaged_questions():
    """Prompt ids hash the file name and the text: `train evaluate --offline` with the default
    prompts finds every answer in data/eval/mt_bench, so the copy is the file they came from."""
    ids = {p.id for p in read_prompts(DEFAULT_PROMPTS)}
    stored = {r["id"] for r in read_records(ROOT / "data" / "eval" / "mt_bench")}
    assert len(ids) == 80 and stored == ids


def test_package_data_covers_every_benchmark_data_file():
    """A non-editable install copies only files that pyproject's package-data names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"]["mlx_redrafter.benchmarks"] == "benchmarks"
    globs = config["package-data"]["mlx_redrafter.benchmarks"]
    files = [p.relative_to(ROOT / "benchmarks") for p in (ROOT / "benchmarks" / "data").iterdir()]
    assert any(f.name == "mt_bench.jsonl" for f in files)
    for f in files:
        assert any(fnmatch.fnmatch(f.as_posix(), g) for g in globs), f


def _elsewhere(tmp_path: Path) -> tuple[Path, dict]:
    """A working folder away from the repository, with nothing called shared beside it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert not (cwd.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLX_REDRAFTER_HOME"] = str(tmp_path / "home")
    return cwd, env


def _console_script(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    path = str(found) if found.is_file() else shutil.which(name)
    assert path, f"console script {name} is not installed (pip install -e .)"
    return path


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("module", MODULES)
def test_every_benchmark_module_runs_from_any_folder(tmp_path, module):
    cwd, env = _elsewhere(tmp_path)
    proc = _run([sys.executable, "-m", f"mlx_redrafter.benchmarks.{module}", "--help"], cwd, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prog = "mlx_redrafter.benchmark" if module == "run" else f"mlx_redrafter.benchmarks.{module}"
    assert proc.stdout.startswith("usage: ") and prog in proc.stdout.splitlines()[0]


def test_benchmark_command_runs_the_packaged_prompts_from_any_folder(tmp_path, tiny_model_dir):
    """`mlx_redrafter.benchmark --quick` with no --prompts: the packaged MT-Bench file."""
    cwd, env = _elsewhere(tmp_path)
    command = _console_script("mlx_redrafter.benchmark")
    assert "usage: mlx_redrafter.benchmark" in _run([command, "--help"], cwd, env).stdout
    out = tmp_path / "out"
    proc = _run(
        [command, "--model", str(tiny_model_dir), "--quick", "--limit", "1", "--max-tokens", "6"]
        + ["--warmup-tokens", "2", "--no-curve", "--profile-prompts", "0", "--out", str(out)],
        cwd,
        env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [json_path] = out.glob("*-quick.json")
    config = json.loads(json_path.read_text())["config"]
    assert Path(config["prompts"]) == DEFAULT_PROMPTS and config["num_prompts"] == 1
    assert "speedup vs mlx-lm" in proc.stdout
    assert list(cwd.iterdir()) == []  # nothing written to the working folder

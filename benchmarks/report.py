"""Benchmark output: the environment record, JSON, Markdown tables and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# The checkout holding benchmarks/ (its git revision goes into the record); an installed
# package sits in site-packages instead, which has no pyproject.toml beside it.
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- environment
def environment(model=None, model_name: str | None = None, drafter_name: str | None = None):
    import mlx.core as mx
    import mlx_lm

    import mlx_redrafter
    from mlx_redrafter._blas import blas_description
    from mlx_redrafter.tuning.cache import device_description

    info = {}
    try:
        info = mx.device_info()
    except Exception:
        pass
    dtype = None
    if model is not None:
        try:
            dtype = str(model.model.norm.weight.dtype).replace("mlx.core.", "")
        except AttributeError:
            dtype = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "processor": info.get("device_name") or platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "backend": str(mx.default_device()),
        "device": device_description(),
        "blas": blas_description(),
        "dtype": dtype,
        "model": model_name,
        "drafter": drafter_name,
        "versions": {
            "python": sys.version.split()[0],
            "mlx": mx.__version__,
            "mlx_lm": mlx_lm.__version__,
            "mlx_redrafter": mlx_redrafter.__version__,
            "git": _git_revision(),
        },
    }


def _git_revision() -> str | None:
    if not (REPO_ROOT / "pyproject.toml").is_file():
        return None  # installed: a git repository around site-packages is not this project
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------- files
def write_text(path: Path, text: str) -> Path:
    """Write whole or not at all (a rebuilt report replaces the existing files)."""
    from mlx_redrafter.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode()), fsync=False)
    return path


def write_json(path: Path, results: dict) -> Path:
    return write_text(path, json.dumps(results, indent=1, default=_jsonable) + "\n")


def write_report(results: dict, out_dir: Path, stem: str) -> list[Path]:
    """A run's `stem`.json, `stem`.md and plots in `out_dir`; returns the files written."""
    json_path = write_json(out_dir / f"{stem}.json", results)
    md_path = write_text(out_dir / f"{stem}.md", markdown(results))
    return [json_path, md_path, *plots(results, out_dir, stem)]


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def _f(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown(results: dict) -> str:
    env, cfg, summary = results["environment"], results["config"], results["summary"]
    decoders = results["decoders"]
    lines = [
        f"# Benchmark {env['date']}",
        "",
        f"- machine: {env['machine']['processor']} ({env['machine']['platform']}, "
        f"{env['machine']['cpu_count']} cores, load average at start "
        f"{_f((env['machine'].get('load_average') or [None])[0])})",
        f"- back-end: {env['backend']}; BLAS: {env['blas']}; dtype: {env['dtype']}",
        f"- model: {env['model']}; drafter: {env['drafter']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- prompts: {cfg['prompts']} ({cfg['num_prompts']} prompts, turns {cfg['turns']}), "
        f"max_tokens {cfg['max_tokens']}, repeats {cfg['repeats']}, temp {cfg['temp']}, "
        f"interleaved per prompt after a warm-up",
        f"- wall time: {_f(results.get('wall_s'), '.0f')} s",
        "",
        "## Speed (all prompts)",
        "",
        "| decoder | tokens/s | speedup vs mlx-lm | per-prompt geomean | tokens/step | "
        "peak memory GB | exact match | near-ties | other divergences |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    overall = summary["overall"]
    for name, d in decoders.items():
        s = overall.get(name, {})
        match = s.get("match") or {}
        lines.append(
            f"| {d['label']} | {_f(s.get('tps'), '.1f')} | {_f(s.get('speedup'), '.3f')} | "
            f"{_f(s.get('speedup_geomean'), '.3f')} | {_f(s.get('mean_accepted'))} | "
            f"{_f(s.get('peak_memory_gb'), '.3f')} | "
            f"{_f(match.get('exact_rate'), '.0%')} | {_f(match.get('near_ties'), 'd')} | "
            f"{_f(match.get('other_divergences'), 'd')} |"
        )
    cats = summary["categories"]
    if cats:
        names = [n for n in decoders if n != "mlx_lm"]
        lines += [
            "",
            "## Speedup vs mlx-lm per category",
            "",
            "| category | " + " | ".join(decoders[n]["label"] for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for cat, per in cats.items():
            lines.append(
                f"| {cat} | "
                + " | ".join(_f(per.get(n, {}).get("speedup"), ".3f") for n in names)
                + " |"
            )
        lines += loop_free_lines(summary.get("loop_free"), names)
    for name, d in decoders.items():
        hist = overall.get(name, {}).get("accepted_hist")
        if hist and sum(hist):
            total = sum(hist)
            lines += [
                "",
                f"Tokens per step, {d['label']}: "
                + ", ".join(f"{k}: {c / total:.1%}" for k, c in enumerate(hist) if k and c),
            ]
    prof = results.get("profile")
    if prof:
        lines += ["", "## Where time goes (separate profiling pass, synced phases)", ""]
        lines += [
            "| decoder | steps | draft ms | verify ms | accept+commit ms | step ms | "
            "draft % | verify % | accept+commit % |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("ours_ar", "redrafter"):
            p = prof["phases"].get(name)
            if not p:
                continue
            ps, sh = p["per_step_s"], p["shares"]
            lines.append(
                f"| {name} | {p['steps']} | {ps['draft'] * 1e3:.1f} | {ps['verify'] * 1e3:.1f} | "
                f"{ps['accept_commit'] * 1e3:.1f} | {ps['total'] * 1e3:.1f} | "
                f"{sh['draft']:.0%} | {sh['verify']:.0%} | {sh['accept_commit']:.0%} |"
            )
        ideal = prof.get("ideal") or {}
        if ideal:
            lines += [
                "",
                f"Ideal speedup = mean_accepted x t(1) / (t_verify(tree) + t_draft) = "
                f"{_f(ideal.get('mean_accepted'))} x {_f(ideal.get('t_one_ms'), '.1f')} ms / "
                f"({_f(ideal.get('t_verify_ms'), '.1f')} + {_f(ideal.get('t_draft_ms'), '.1f')}) "
                f"ms = **{_f(ideal.get('ideal_speedup'), '.3f')}**; measured "
                f"{_f(ideal.get('measured_speedup'), '.3f')}; efficiency "
                f"**{_f(ideal.get('efficiency'), '.0%')}** (profiling pass's own speedup "
                f"{_f(ideal.get('profiled_speedup'), '.3f')}, efficiency "
                f"{_f(ideal.get('efficiency_same_pass'), '.0%')}).",
            ]
    curve = results.get("verify_cost_curve")
    if curve:
        lines += [
            "",
            f"## Verify-cost curve (forward over N tokens after {curve['cache_len']} cached)",
            "",
            "| N | " + " | ".join(curve["seconds"]) + " |",
            "|---|" + "---|" * len(curve["seconds"]),
            "| ms | " + " | ".join(f"{t * 1e3:.1f}" for t in curve["seconds"].values()) + " |",
            "| x t(1) | " + " | ".join(f"{r:.2f}" for r in curve["relative"].values()) + " |",
        ]
    sweep = results.get("sweep")
    if sweep:
        lines += [
            "",
            "## Sweep (predicted from offline acceptance x measured costs; best confirmed online)",
            "",
            "| W | L | tokens/step | tree | draft ms | verify ms | predicted | measured |",
            "|---|---|---|---|---|---|---|---|",
        ]
        measured = {(c["beam_width"], c["beam_length"]): c for c in sweep.get("confirmed", [])}
        for e in sorted(sweep["estimates"], key=lambda e: -e["predicted_speedup"]):
            m = measured.get((e["beam_width"], e["beam_length"]), {})
            lines.append(
                f"| {e['beam_width']} | {e['beam_length']} | {e['mean_accepted']:.2f} | "
                f"{e['tree_size']:.1f} | {e['draft_s'] * 1e3:.1f} | {e['verify_s'] * 1e3:.1f} | "
                f"{e['predicted_speedup']:.3f} | {_f(m.get('speedup'), '.3f')} |"
            )
    auto = results.get("autotune")
    if auto:
        lines += [
            "",
            f"Auto shape: W={auto['choice'][0]} L={auto['choice'][1]} (predicted "
            f"{auto['predicted_speedup']:.3f} on the calibration prompts; "
            f"{'from the cache' if auto.get('cached') else 'tuned'}"
            f" in {_f(auto.get('seconds'), '.0f')} s).",
        ]
        versus = (sweep or {}).get("auto")
        if versus:
            lines[-1] += (
                f" Measured online {_f(versus['measured_speedup'], '.3f')} vs the best confirmed "
                f"shape's {_f(versus['best_confirmed_speedup'], '.3f')}: within 5%: "
                f"{versus['within_5_percent']}."
            )
    divs = [
        (p["question_id"], p["turn"], n, m)
        for p in results["prompts"]
        for n, m in (p.get("match") or {}).items()
        if m["first_divergence"] is not None
    ]
    if divs:
        lines += [
            "",
            "## Divergences from mlx-lm's greedy output",
            "",
            "| prompt | turn | decoder | first divergence | top-2 gap (relative) | near-tie |",
            "|---|---|---|---|---|---|",
        ]
        for qid, turn, name, m in divs:
            lines.append(
                f"| {qid} | {turn} | {name} | {m['first_divergence']} | "
                f"{_f(m['gap'], '.2e')} | {'yes' if m['near_tie'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def loop_free_lines(loop_free: dict | None, names: list[str]) -> list[str]:
    """The category table's last row: the speedups on answers without a greedy loop (where a
    copied draft is not trivially right), and what the row means."""
    if not loop_free or not loop_free.get("summary"):
        return []
    per = loop_free["summary"]
    return [
        f"| **loop-free answers ({loop_free['prompts']} of {loop_free['of']})** | "
        + " | ".join(_f(per.get(n, {}).get("speedup"), ".3f") for n in names)
        + " |",
        "",
        f"Loop-free: the prompts whose mlx-lm answer repeats no run of "
        f"{loop_free['repeat_tokens']} tokens verbatim (a greedy loop, where copying is easy).",
    ]


# ---------------------------------------------------------------------------- plots
def plots(results: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNG plots; none (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cats = results["summary"]["categories"]
    names = [n for n in results["decoders"] if n != "mlx_lm"]
    if cats and names:
        fig, ax = plt.subplots(figsize=(max(6, len(cats) * 1.1), 3.6))
        width = 0.8 / len(names)
        labels = list(cats) + ["all"]
        for i, name in enumerate(names):
            vals = [cats[c].get(name, {}).get("speedup") or 0 for c in cats]
            vals.append(results["summary"]["overall"].get(name, {}).get("speedup") or 0)
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, vals, width, label=results["decoders"][name]["label"])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel("speedup vs mlx-lm (tokens/s)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-speedup-by-category.png"))
    sweep = results.get("sweep")
    if sweep:
        est = sweep["estimates"]
        ws = sorted({e["beam_width"] for e in est})
        ls = sorted({e["beam_length"] for e in est})
        grid = [[None] * len(ls) for _ in ws]
        for e in est:
            grid[ws.index(e["beam_width"])][ls.index(e["beam_length"])] = e["predicted_speedup"]
        fig, ax = plt.subplots(figsize=(1.2 * len(ls) + 2, 0.7 * len(ws) + 1.5))
        data = [[v if v is not None else float("nan") for v in row] for row in grid]
        im = ax.imshow(data, cmap="viridis", aspect="auto", origin="lower")
        for c in sweep.get("confirmed", []):
            if c["beam_width"] in ws and c["beam_length"] in ls and c.get("speedup"):
                ax.text(
                    ls.index(c["beam_length"]),
                    ws.index(c["beam_width"]),
                    f"{c['speedup']:.2f}*",
                    ha="center",
                    va="center",
                    color="w",
                    fontsize=8,
                )
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    ax.text(j, i - 0.3, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(ls)), ls)
        ax.set_yticks(range(len(ws)), ws)
        ax.set_xlabel("beam length L")
        ax.set_ylabel("beam width W")
        ax.set_title("predicted speedup (* = measured online)", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-speedup-by-shape.png"))
    curve = results.get("verify_cost_curve")
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ns = [int(n) for n in curve["relative"]]
        ax.plot(ns, list(curve["relative"].values()), "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens verified in one forward (N)")
        ax.set_ylabel("forward time / time for N=1")
        ax.set_title(f"verify cost after {curve['cache_len']} cached tokens", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{stem}-verify-cost.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

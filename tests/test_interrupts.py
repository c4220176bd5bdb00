"""Ctrl-C in the benchmark: one line on stderr and status 130, as generate, chat, convert and
train report it (those are tested with their own CLIs)."""

from __future__ import annotations

from mlx_redrafter.benchmarks import run


def test_benchmark_ctrl_c_prints_one_line(monkeypatch, capsys, tmp_path):
    calls = []

    def interrupt(args):
        calls.append(args.out)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "_main", interrupt)
    assert run.main(["--quick", "--out", str(tmp_path / "results")]) == 130
    assert calls == [str(tmp_path / "results")]
    captured = capsys.readouterr()
    assert captured.err == "mlx_redrafter.benchmark: interrupted\n" and captured.out == ""

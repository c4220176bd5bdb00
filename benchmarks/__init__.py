"""Benchmarks for mlx_redrafter: speed against mlx-lm's decoders, cost curves, what the tuner
chose. They depend on the engine, never the reverse (tests/test_layout.py checks it).

Installed as `mlx_redrafter.benchmarks` (the repository keeps it at the top level). The speed
benchmark is the `mlx_redrafter.benchmark` command (`python -m mlx_redrafter.benchmarks.run`);
the other scripts run as `python -m mlx_redrafter.benchmarks.<module>` from any folder. Modules:

- `metrics`    pure functions: medians and ratios, histograms, divergence and near-tie checks,
               ideal speedup from measured parts;
- `prompts`    prompt files (MT-Bench layout) and chat-template prompts;
- `decoders`   one timed run of each decoder (mlx-lm autoregressive, mlx-lm draft model, ours);
- `profiling`  the engine's decode loop run with a phase-timing probe (synced phase timings;
               controlled acceptance for cost models);
- `cost_curve` the CLI for the tuner's measurements (`mlx_redrafter.tuning.costs`): LLM forward
               time against the number of verified tokens; beam-search cost;
- `report`     environment record, JSON, Markdown and PNG output;
- `run`        the CLI; `gpu` the script for MLX's CUDA back-end;
- `server`     mlx_redrafter.server against mlx_lm.server under concurrent streaming clients;
- `batch`      total tokens/s against the batch size: mlx-lm's batch_generate, ours without a
               drafter, ours with the shape tuned per batch size, with t(B, N)'s prediction.
"""

# OpenBLAS must be loaded before the first import of mlx.core: the package does it.
import mlx_redrafter  # noqa: F401

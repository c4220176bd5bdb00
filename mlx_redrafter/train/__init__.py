"""Making a drafter: distillation data, training, evaluation (`python -m mlx_redrafter.train`).

Data: `data.py` (batched answering, append-only shards), `prompts.py` (prompt files, chat
template), `self_instruct.py` and `topics.py` (the LLM writing its own requests). The CLI is in
`cli.py`.
"""

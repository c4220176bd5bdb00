"""Making a drafter: distillation data, training, evaluation (`python -m mlx_redrafter.train`).

Data: `data.py` (batched answering, append-only shards), `prompts.py` (prompt files, chat
template), `self_instruct.py` and `topics.py` (the LLM writing its own requests), `corpus.py`
(plain documents cut into chunks).

Training (`train_cmd.py` runs it): `llm_states.py` (the frozen LLM pass: hidden states and the
LLM's top-k), `states_cache.py` (that pass kept on disk), `positions.py` (what each position
learns), `drafter_init.py` (the drafter a run starts from), `loss.py` (the objective),
`accuracy.py` (held-out accuracy), `loop.py` (optimizer, schedule, checkpoints), `config.py`
(the settings). `evaluate.py` simulates acceptance offline. The CLI is in `cli.py`.
"""

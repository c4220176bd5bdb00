"""`mlx_redrafter.server`: an OpenAI-compatible HTTP server with ReDrafter on every request.

Needs the `server` extra (FastAPI, uvicorn, pydantic): `pip install 'mlx-redrafter[server]'`.
The engine never imports this package (tests/test_layout.py), so the rest of mlx_redrafter
works without those.

Modules: `cli` (options, start-up, shutdown), `app` (endpoints), `schemas` (request bodies),
`jobs` (the single generation worker and its FIFO queue), `generation` (one request on the
worker), `prompt_lru` (KV caches kept across requests), `prompts`, `responses`, `tool_calls`,
`guards` (body limit, API key), `errors`.
"""

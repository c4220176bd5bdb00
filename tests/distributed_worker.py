"""One rank of a sharded run, started by tests/test_distributed.py (N processes on 127.0.0.1,
ring back-end, as `mlx.launch` starts them): `python distributed_worker.py SPEC.json OUT`.

It loads the tiny model folder with `load(..., distributed=True)`, decodes what the spec asks,
and writes what this rank saw to OUT.rank<r>.json for the test to compare across ranks and
with single-process greedy. An error is recorded (type and text), not raised, so that the test
reads every rank's message.
"""

from __future__ import annotations

import json
import sys
import traceback

import mlx_redrafter  # noqa: F401  (OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten


def layer_parameters(model) -> int:
    return sum(v.size for _, v in tree_flatten([layer.parameters() for layer in model.layers]))


def decode(spec: dict, rank: int) -> dict:
    from mlx_redrafter import load
    from mlx_redrafter.benchmarks.tiny import (
        VOCAB,
        OracleDrafter,
        engine_tokens,
        reference_greedy,
    )

    model, _, drafter = load(spec["model_dir"], distributed=True)
    out = {"layer_parameters": layer_parameters(model), "greedy": {}, "mlx_lm": []}
    for prompt, expected in zip(spec["prompts"], spec["references"], strict=True):
        # mlx-lm's own greedy decoding on the sharded model
        out["mlx_lm"].append(reference_greedy(model, prompt, len(expected)))
    for width, length in spec["shapes"]:
        rows = []
        for i, (prompt, expected) in enumerate(
            zip(spec["prompts"], spec["references"], strict=True)
        ):
            # an oracle drafter accepts long runs (the same beams on every rank: same seed);
            # the loaded random drafter rejects almost everything, with the guard on
            oracle = OracleDrafter(prompt + expected, len(prompt), VOCAB, seed=i)
            kw = dict(beam_width=width, beam_length=length)
            got, stats = engine_tokens(model, oracle, prompt, len(expected), guard=False, **kw)
            guarded, _ = engine_tokens(model, drafter, prompt, len(expected), guard=True, **kw)
            rows.append(
                {"oracle": got, "accepted": [s.accepted for s in stats], "drafter": guarded}
            )
        out["greedy"][f"{width}x{length}"] = rows
    # no drafter: the pipelined autoregressive path, after mlx-lm's and the engine's runs
    out["no_drafter"] = [
        engine_tokens(model, None, p, len(e))[0]
        for p, e in zip(spec["prompts"], spec["references"], strict=True)
    ]
    prompt = spec["prompts"][-1]
    sample = dict(beam_width=4, beam_length=5, temp=1.0, top_p=0.95)
    out["sampled_seeded"] = engine_tokens(model, drafter, prompt, 24, seed=7, **sample)[0]
    # no seed: rank 0 draws one and broadcasts it; the guard (on) follows rank 0's choices
    out["sampled_unseeded"] = engine_tokens(model, drafter, prompt, 24, **sample)[0]
    return out


def mismatch(spec: dict, rank: int) -> dict:
    """Ranks that disagree, each refused on every rank: first rank r decodes prompt r with the
    same drafter, then rank r loads drafter folder r."""
    from mlx_redrafter import load
    from mlx_redrafter.benchmarks.tiny import engine_tokens

    out = {}
    model, _, drafter = load(spec["model_dir"], distributed=True)
    try:
        engine_tokens(model, drafter, spec["prompts"][rank], 8, beam_width=2, beam_length=3)
    except ValueError as e:
        out["prompt_error"] = str(e)
    try:
        load(spec["model_dir"], drafter_path=spec["drafter_dirs"][rank], distributed=True)
    except ValueError as e:
        out["drafter_error"] = str(e)
    return out


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    spec = json.loads(open(spec_path).read())
    group = mx.distributed.init(strict=True, backend="ring")
    rank = group.rank()
    try:
        result = {"mode": spec["mode"], "size": group.size()}
        result |= {"decode": decode, "mismatch": mismatch}[spec["mode"]](spec, rank)
    except Exception as e:  # recorded for the test to read
        result = {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

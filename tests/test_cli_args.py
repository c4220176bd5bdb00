"""The flags generate, chat and the benchmark share come from one place (`cli_args`)."""

from __future__ import annotations

import importlib

import pytest

from mlx_redrafter.benchmarks.tiny import CHAT_TEMPLATE, make_model, make_tokenizer
from mlx_redrafter.cli_args import sampling_options

FRONT_ENDS = ("mlx_redrafter.generate", "mlx_redrafter.chat", "mlx_redrafter.benchmarks.run")
SHARED = ("--model", "--drafter", "--max-tokens", "--temp", "--top-p", "--top-k", "--min-p",
          "--seed", "--accept")  # fmt: skip


def parser_of(module: str):
    return importlib.import_module(module).setup_arg_parser()


def option(parser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_front_end_declares_the_shared_flags_alike():
    parsers = {m: parser_of(m) for m in FRONT_ENDS}
    for flag in SHARED:
        actions = [option(p, flag) for p in parsers.values()]
        if flag not in ("--max-tokens", "--seed"):  # the defaults a front end chooses
            assert len({a.default for a in actions}) == 1, flag
        if flag not in ("--max-tokens", "--seed"):  # their help names the default
            assert len({a.help for a in actions}) == 1, flag
        assert len({a.type for a in actions}) == 1, flag


def test_mlx_lm_defaults_and_each_front_ends_own():
    gen, chat, bench = (parser_of(m).parse_args([]) for m in FRONT_ENDS)
    for args in (gen, chat, bench):
        assert (args.temp, args.top_p, args.top_k, args.min_p) == (0.0, 1.0, 0, 0.0)
        assert args.accept == "exact"
    assert (gen.seed, chat.seed, bench.seed) == (None, None, 0)
    assert (gen.max_tokens, chat.max_tokens, bench.max_tokens) == (256, 512, None)


def test_sampling_options_are_generate_step_keywords_and_checked():
    args = parser_of("mlx_redrafter.chat").parse_args(
        ["--temp", "0.7", "--top-k", "5", "--min-p", "0.1", "--accept", "match"]
    )
    assert sampling_options(args) == dict(temp=0.7, top_p=1.0, top_k=5, min_p=0.1, accept="match")
    bad = parser_of("mlx_redrafter.generate").parse_args(["--top-p", "1.5"])
    with pytest.raises(ValueError, match="top_p"):
        sampling_options(bad)


@pytest.mark.parametrize("module", ["mlx_redrafter.generate", "mlx_redrafter.chat"])
def test_a_bad_sampling_flag_is_named_before_any_model_loads(module, capsys):
    main = importlib.import_module(module).main
    assert main(["--model", "/nonexistent/model", "--min-p", "2"]) == 2
    err = capsys.readouterr().err
    assert "min_p" in err and "does not exist" not in err


def test_chat_passes_top_k_and_min_p_to_the_engine():
    """top-k 1 and min-p 1 keep the argmax alone: greedy whatever the temperature, while the
    same hot temperature without them leaves greedy."""
    from mlx_redrafter.chat import ChatSession

    model = make_model("llama")
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE

    def reply(**kw) -> list[int]:
        return ChatSession(model, tokenizer, None, max_tokens=10, **kw).reply("t5 t6").tokens

    greedy = reply()
    assert reply(temp=5.0, top_k=1) == greedy
    assert reply(temp=5.0, min_p=1.0) == greedy
    assert any(reply(temp=5.0) != greedy for _ in range(3))

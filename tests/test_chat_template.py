"""The one chat-prompt builder (`chat_template.chat_tokens`) and its one fallback, mlx-lm's."""

from __future__ import annotations

import pytest

from mlx_redrafter.benchmarks.tiny import CHAT_TEMPLATE, make_tokenizer
from mlx_redrafter.chat_template import chat_tokens, has_chat_template, messages_for

BOS = 99


class NoTemplateTokenizer:
    """Word-level ids ('t7' -> 7) with a BOS that only `add_special_tokens=True` adds."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [int(word[1:]) for word in text.split()]
        return [BOS, *ids] if add_special_tokens else ids


def templated():
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_template_renders_system_turns_and_message_without_extra_specials():
    tokenizer = templated()
    assert has_chat_template(tokenizer)
    messages = messages_for("t3", [("t4 t5", "t6")], "t7 t8")
    # the tiny template: "t1 <content> t2 " per message, then "t1 " (the generation prompt)
    text = "t1 t3 t2 t1 t4 t5 t2 t1 t6 t2 t1 t7 t8 t2 t1 "
    expected = tokenizer.encode(text, add_special_tokens=False)
    assert chat_tokens(tokenizer, messages) == expected


def test_without_a_template_the_last_message_alone_with_special_tokens():
    """mlx_lm.generate's behaviour: the prompt as it is, encoded with BOS, no system prompt."""
    tokenizer = NoTemplateTokenizer()
    assert not has_chat_template(tokenizer)
    messages = messages_for("t3", [("t4", "t5")], "t7 t8")
    assert chat_tokens(tokenizer, messages) == [BOS, 7, 8]


def test_ignoring_the_template_is_the_same_fallback():
    tokenizer = templated()
    messages = messages_for("t3", (), "t7 t8")
    assert chat_tokens(tokenizer, messages, use_template=False) == tokenizer.encode("t7 t8")
    assert chat_tokens(tokenizer, messages) != chat_tokens(tokenizer, messages, False)


def test_no_messages_is_a_clear_error():
    with pytest.raises(ValueError, match="no messages"):
        chat_tokens(NoTemplateTokenizer(), [])


def test_every_front_end_renders_through_the_one_builder():
    """No other module calls a tokenizer's chat template itself."""
    from pathlib import Path

    import mlx_redrafter

    root = Path(mlx_redrafter.__file__).resolve().parents[1]
    callers = sorted(
        str(path.relative_to(root))
        for folder in ("mlx_redrafter", "benchmarks")
        for path in (root / folder).rglob("*.py")
        if "apply_chat_template(" in path.read_text()
    )
    assert callers == ["mlx_redrafter/chat_template.py"]

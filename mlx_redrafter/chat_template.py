"""The one chat-prompt builder: messages -> the token ids the model is given.

Every front end renders its messages here (`generate`, the chat, the tuner's calibration
prompts, the benchmarks, the trainer's data), so one conversation becomes the same tokens
wherever it is built.

- With a chat template: the template renders the messages as text ending with the assistant's
  generation prompt, and the text is encoded without adding special tokens (the template
  writes its own), as `mlx_lm.generate` does.
- Without one (or with `use_template=False`, `--ignore-chat-template`), the one fallback is
  mlx-lm's: the last message's text alone, encoded with the tokenizer's special tokens.
  `mlx_lm.generate` then sends the prompt as it is and leaves the system prompt out; a
  transcript layout of our own ("user: ...") would be a template the model never saw, so
  earlier turns and the system prompt are left out too.
"""

from __future__ import annotations

from collections.abc import Sequence

Turn = tuple[str, str]  # (user message, assistant reply)


def messages_for(
    system: str | None, turns: Sequence[Turn] = (), user: str | None = None
) -> list[dict]:
    """Chat-template messages: the system prompt, the turns, then the new user message."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    if user is not None:
        messages.append({"role": "user", "content": user})
    return messages


def has_chat_template(tokenizer) -> bool:
    """mlx-lm's `TokenizerWrapper.has_chat_template`, or a template set on the tokenizer since
    it was wrapped (the wrapper computes its flag once)."""
    return bool(getattr(tokenizer, "has_chat_template", False)) or (
        getattr(tokenizer, "chat_template", None) is not None
    )


def template_text(tokenizer, messages: list[dict], **template_kwargs) -> str:
    """The chat template's rendering of `messages`, ending with the generation prompt.
    `template_kwargs` (e.g. the server's `tools`, `chat_template_kwargs`) go to the template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )


def chat_tokens(
    tokenizer, messages: list[dict], use_template: bool = True, **template_kwargs
) -> list[int]:
    """Token ids of the conversation, ready for the assistant's answer (see the module
    docstring for the fallback without a template)."""
    if not messages:
        raise ValueError("no messages to render: give at least the user's message")
    if use_template and has_chat_template(tokenizer):
        text = template_text(tokenizer, messages, **template_kwargs)
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    return [int(t) for t in tokenizer.encode(messages[-1]["content"], add_special_tokens=True)]

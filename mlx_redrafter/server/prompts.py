"""Prompts from requests: chat messages through the model's chat template (tools and
`chat_template_kwargs` go to `apply_chat_template`, as in mlx-lm's server), text prompts as
they are. Token ids come out; the worker thread calls these (the tokenizer is used from that
thread only).
"""

from __future__ import annotations

import json
from typing import Any

from ..chat_template import chat_tokens as template_tokens
from ..chat_template import has_chat_template
from .errors import APIError
from .schemas import Message


def message_dicts(messages: list[Message]) -> list[dict[str, Any]]:
    """Template-ready messages: text parts joined, `developer` read as `system`, and tool-call
    arguments given to the template as objects (templates index into them)."""
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": content or "",
        }
        if message.name:
            item["name"] = message.name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                arguments = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except json.JSONDecodeError as e:
                        raise APIError(
                            400,
                            f"messages.{i}.tool_calls: function arguments are not JSON ({e})",
                            param=f"messages.{i}.tool_calls",
                        ) from e
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            item["tool_calls"] = calls
        out.append(item)
    return out


def chat_tokens(
    tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict] | None,
    template_kwargs: dict[str, Any] | None,
) -> list[int]:
    """The conversation through the chat template, ending with the assistant's turn."""
    if not has_chat_template(tokenizer):
        return template_tokens(tokenizer, messages)  # the project's one no-template fallback
    kwargs = dict(template_kwargs or {})
    if tools:
        kwargs["tools"] = tools
    try:
        return template_tokens(tokenizer, messages, **kwargs)
    except Exception as e:  # jinja raises for what a template does not accept
        raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from e


def text_tokens(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A completion prompt: text (BOS added unless it starts with one) or token ids."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        return [int(t) for t in tokenizer.encode(prompt, add_special_tokens=add_special)]
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            400,
            f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
            param="prompt",
        )
    return list(prompt)

"""Tool calls in generated text: split off between the model's tool-call markers and parsed with
mlx-lm's parser for the model (`tokenizer.tool_parser`, chosen by mlx-lm from the chat template
or tokenizer config, with its `tool_call_start` / `tool_call_end` markers).

Streaming: text before a marker streams as content; a tail that could be the start of a
marker is held back, and everything from a marker on is held until the reply ends, when the
calls are parsed. A call the parser rejects (e.g. cut off by max_tokens) is returned as
content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any


class ToolCallSplitter:
    def __init__(self, start: str, end: str, parser: Callable, tools: list[dict] | None):
        self.start, self.end, self.parser, self.tools = start, end, parser, tools
        self._pending = ""  # text not yet returned as content
        self._in_call = False

    def feed(self, text: str) -> str:
        """Content that can be shown now."""
        if self._in_call:
            self._pending += text
            return ""
        self._pending += text
        at = self._pending.find(self.start)
        if at >= 0:
            self._in_call = True
            out, self._pending = self._pending[:at], self._pending[at:]
            return out
        keep = _partial_marker(self._pending, self.start)
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(remaining content, tool calls in OpenAI's shape) once the reply has ended."""
        text, self._pending = self._pending, ""
        content, calls = [], []
        while True:
            at = text.find(self.start)
            if at < 0:
                content.append(text)
                break
            content.append(text[:at])
            rest = text[at + len(self.start) :]
            stop = rest.find(self.end)
            body, text = (rest, "") if stop < 0 else (rest[:stop], rest[stop + len(self.end) :])
            parsed = self._parse(body)
            if parsed is None:
                content.append(self.start + body + (self.end if stop >= 0 else ""))
            else:
                calls.extend(parsed)
        return "".join(content), calls

    def _parse(self, body: str) -> list[dict[str, Any]] | None:
        try:
            parsed = self.parser(body, self.tools)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        items = parsed if isinstance(parsed, list) else [parsed]
        calls = []
        for item in items:
            if not isinstance(item, dict) or "name" not in item:
                return None
            arguments = item.get("arguments", {})
            calls.append(
                {
                    "id": item.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": item["name"],
                        "arguments": arguments
                        if isinstance(arguments, str)
                        else json.dumps(arguments, ensure_ascii=False),
                    },
                }
            )
        return calls


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0

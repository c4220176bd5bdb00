"""OpenAI's response shapes, built from the worker's events: `chat.completion` and
`chat.completion.chunk`, `text_completion` (streamed or whole), logprobs in each endpoint's
own layout, and tool calls split off the text (`tool_calls.py`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from .. import __version__
from .jobs import Delta, Finished
from .tool_calls import ToolCallSplitter

FINGERPRINT = f"mlx_redrafter-{__version__}"


class Reply:
    """One request's reply, fed with events; gives stream chunks or the whole body."""

    def __init__(
        self,
        chat: bool,
        model_id: str,
        splitter: ToolCallSplitter | None = None,
        top_logprobs: int | None = None,
    ):
        self.chat, self.model_id, self.splitter = chat, model_id, splitter
        self.top = top_logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text: list[str] = []
        self.logprobs: list[dict] = []  # chat entries; the text endpoint's are built from them
        self._streamed = 0  # text endpoint: offset of the next streamed token's text

    # ------------------------------------------------------------------ streaming
    def first_chunk(self) -> dict[str, Any] | None:
        """The role announcement that opens a chat stream."""
        if not self.chat:
            return None
        return self._chunk({"role": "assistant", "content": ""}, None)

    def on_delta(self, delta: Delta) -> dict[str, Any] | None:
        """Record a delta; the chunk to stream for it, if it shows anything."""
        text = delta.text
        if self.splitter is not None:
            text = self.splitter.feed(text)
        self.text.append(text)
        entries = self._logprob_entries(delta)
        if not text and not entries:
            return None
        if self.chat:
            return self._chunk({"content": text} if text else {}, None, entries)
        return self._chunk(text, None, entries)

    def last_chunks(self, finished: Finished, include_usage: bool) -> list[dict[str, Any]]:
        content, calls = self._finish_tools()
        reason = self._reason(finished, calls)
        chunks = []
        if self.chat:
            delta: dict[str, Any] = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
            chunks.append(self._chunk(delta, reason))
        else:
            chunks.append(self._chunk(content, reason))
        if include_usage:
            chunks.append(self._envelope([], usage=finished.usage))
        return chunks

    # ------------------------------------------------------------------ whole
    def completion(self, finished: Finished) -> dict[str, Any]:
        content, calls = self._finish_tools()
        text = "".join(self.text) + content
        reason = self._reason(finished, calls)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": reason}
            choice["logprobs"] = {"content": self.logprobs} if self.top is not None else None
        else:
            choice = {
                "index": 0,
                "text": text,
                "finish_reason": reason,
                "logprobs": self._text_logprobs(self.logprobs, 0) if self.top is not None else None,
            }
        return self._envelope([choice], usage=finished.usage)

    # ------------------------------------------------------------------ pieces
    def _finish_tools(self) -> tuple[str, list[dict]]:
        if self.splitter is None:
            return "", []
        return self.splitter.finish()

    @staticmethod
    def _reason(finished: Finished, calls: list) -> str:
        if calls and finished.finish_reason == "stop":
            return "tool_calls"
        return "length" if finished.finish_reason == "cancelled" else finished.finish_reason

    def _envelope(self, choices: list, usage: dict | None = None, chunk: bool = False) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        body = {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def _chunk(self, delta, reason: str | None, entries: list | None = None) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if self.chat:
            choice["delta"] = delta
            choice["logprobs"] = {"content": entries} if entries else None
        else:
            choice["text"] = delta
            choice["logprobs"] = self._text_logprobs(entries, self._streamed) if entries else None
            self._streamed += sum(len(e["token"]) for e in entries or [])
        return self._envelope([choice], chunk=True)

    def _logprob_entries(self, delta: Delta) -> list[dict]:
        scores = delta.logprobs
        if scores is None or self.top is None:
            return []
        texts = delta.token_texts or {}
        entries = []
        for i, token in enumerate(delta.tokens[: len(scores)]):
            entries.append(
                {
                    "token": texts.get(token, ""),
                    "logprob": scores.logprobs[i],
                    "bytes": list(texts.get(token, "").encode()),
                    "id": token,  # extension: the token id
                    "top_logprobs": [
                        {
                            "token": texts.get(t, ""),
                            "logprob": v,
                            "bytes": list(texts.get(t, "").encode()),
                        }
                        for t, v in zip(scores.top_tokens[i], scores.top_logprobs[i], strict=True)
                    ],
                }
            )
        self.logprobs.extend(entries)
        return entries

    def _text_logprobs(self, entries: list[dict], start: int) -> dict[str, Any]:
        """The legacy completions layout: parallel lists; offsets from `start`."""
        offsets = []
        for entry in entries:
            offsets.append(start)
            start += len(entry["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]
            if self.top
            else None,
            "text_offset": offsets,
        }

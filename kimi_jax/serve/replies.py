"""What a request's steps look like in the API: text as it streams, log-probabilities, finish
reasons, usage, and the chunks and objects of both endpoints."""

from __future__ import annotations

import codecs
import math
import time
from typing import Any

import numpy as np

from kimi_jax.run.console import TextStream
from kimi_jax.serve.api import Request
from kimi_jax.text.sampling import logit_order
from kimi_jax.text.tool_calls import MARKERS, ToolCall, ToolCallStream

# The ledger's stop reasons as the API's finish_reason.
FINISH = {"eos": "stop", "end_of_turn": "stop", "stop_string": "stop", "max_new_tokens": "length"}


class _Pieces:
    def __init__(self):
        self.pieces: list[str] = []

    def write(self, text: str) -> None:
        self.pieces.append(text)

    def flush(self) -> None:
        pass


class Reply:
    """One request's answer as its steps arrive: the text the run's console would print (special
    tokens left out, cut before a stop string), token by token."""

    def __init__(self, request: Request, tokenizer, stop_strings: tuple[str, ...], prompt_tokens: int):
        self.request, self.tokenizer, self.prompt_tokens = request, tokenizer, prompt_tokens
        self._out = _Pieces()
        self._stream = TextStream(tokenizer, stop_strings, self._out)
        self.tokens: list[int] = []
        self.logprobs: list[dict[str, Any]] = []
        self.created = int(time.time())
        self._tools = ToolCallStream() if request.tool_calls and tokenizer is not None else None
        self._markers = {tokenizer.token_id(m): m for m in MARKERS} if self._tools is not None else {}
        self._markers.pop(None, None)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.shown: list[str] = []

    @property
    def calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools is not None else []

    def add(self, record) -> tuple[str, list[ToolCall]]:
        """Take one step; returns the text it releases (possibly empty: held back or mid-character)
        and the tool calls it completes."""
        self.tokens.append(int(record.token))
        if self.request.logprobs:
            self.logprobs.append(self._logprob(record))
        if self._tools is not None:
            return self._show(self._tool_text(int(record.token)))
        before = len(self._out.pieces)
        self._stream.feed(int(record.token))
        return self._show("".join(self._out.pieces[before:]))

    def _tool_text(self, token: int) -> str:
        """A tool-calling turn's text: the markers kept (tokenizers may count them special), the
        other special tokens left out. (Stop strings are refused with tools: see the api module.)"""
        if token in self._markers:
            return self._decoder.decode(b"", final=True) + self._markers[token]
        if self.tokenizer.is_special(token):
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes(token) or b"")

    def close(self) -> tuple[str, list[ToolCall]]:
        """The text held back until the end (a possible stop string's start, an incomplete character)."""
        if self._tools is not None:
            text, calls = self._show(self._decoder.decode(b"", final=True))
            rest = self._tools.close()
            self.shown.append(rest)
            return text + rest, calls
        before = len(self._out.pieces)
        self._stream.close()
        self._out.pieces.pop()  # close() ends the console's line with "\n"; an answer has none
        return self._show("".join(self._out.pieces[before:]))

    def _show(self, text: str) -> tuple[str, list[ToolCall]]:
        shown, calls = self._tools.feed(text) if self._tools is not None else (text, [])
        self.shown.append(shown)
        return shown, calls

    @property
    def text(self) -> str:
        return "".join(self.shown)

    def finish_reason(self, stopped: dict) -> str:
        return "tool_calls" if self.calls else FINISH[stopped["reason"]]

    def usage(self) -> dict[str, int]:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _token_text(self, token: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token) if self.tokenizer is not None else None
        if raw is None:
            raw = (self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)).encode()
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _logprob(self, record) -> dict[str, Any]:
        """The model's log-probabilities (softmax of the step's logits, before sampling's filters)."""
        z = np.asarray(record.logits, dtype=np.float64)
        lse = float(z.max() + math.log(np.exp(z - z.max()).sum()))
        token = int(record.token)
        text, raw = self._token_text(token)
        top = []
        for t in logit_order(record.logits)[: self.request.top_logprobs]:
            t_text, t_raw = self._token_text(int(t))
            top.append({"token": t_text, "logprob": float(z[t]) - lse, "bytes": t_raw})
        return {"token": text, "logprob": float(z[token]) - lse, "bytes": raw, "top_logprobs": top}

    def logprobs_field(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not self.request.logprobs:
            return None
        if self.request.chat:
            return {"content": entries}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}  # fmt: skip


def completion(reply: Reply, rid: str, model: str, finish: str, extension: dict) -> dict[str, Any]:
    """The whole answer (``stream: false``)."""
    r = reply.request
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": reply.logprobs_field(reply.logprobs)}
    if r.chat:
        choice["message"] = {"role": "assistant", "content": reply.text}
        if reply.calls:
            choice["message"]["tool_calls"] = [c.as_api() for c in reply.calls]
    else:
        choice["text"] = reply.text
    return {"id": rid, "object": "chat.completion" if r.chat else "text_completion", "created": reply.created,
            "model": model, "choices": [choice], "usage": reply.usage(), "kimi_jax": extension}  # fmt: skip


def chunk(reply: Reply, rid: str, model: str, text: str | None, logprobs: list | None = None,
          finish: str | None = None, first: bool = False, extension: dict | None = None,
          calls: list[tuple[int, ToolCall]] = ()) -> dict[str, Any]:  # fmt: skip
    """One server-sent event's object (``stream: true``); ``calls``: (index, call) completed now."""
    r = reply.request
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                              "logprobs": reply.logprobs_field(logprobs) if logprobs else None}  # fmt: skip
    if r.chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = [call.as_api(index) for index, call in calls]
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": rid, "object": "chat.completion.chunk" if r.chat else "text_completion", "created": reply.created,
            "model": model, "choices": [choice]}  # fmt: skip
    if r.include_usage:
        body["usage"] = None
    if extension is not None:
        body["kimi_jax"] = extension
    return body


def usage_chunk(reply: Reply, rid: str, model: str) -> dict[str, Any]:
    r = reply.request
    return {"id": rid, "object": "chat.completion.chunk" if r.chat else "text_completion", "created": reply.created,
            "model": model, "choices": [], "usage": reply.usage()}  # fmt: skip

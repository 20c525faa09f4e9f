"""The OpenAI request bodies ``kimi-jax serve`` accepts, read into a :class:`Request`, and the API's
error shape. Without JAX or aiohttp: what a request may ask is decided here, before it reaches the
engine.

Every parameter the server does not implement is refused with a 400 naming it: a client that asks
for ``n: 3`` or a ``logit_bias`` must not get an answer computed without them. Parameters that
change nothing here are accepted only at their no-op values (``n: 1``, penalties 0). Nothing a
request says names a file: the server picks each bundle's folder itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from kimi_jax.ledger.ledger import TOP_K

# Bounds on what one request may ask (the server's memory and time, not the model's limits; those
# are checked against config.json when the request is planned).
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 256
MAX_PROMPT_CHARS = 256 * 1024
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_TOKENS_LIMIT = 4096

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "user",
          "frequency_penalty", "presence_penalty", "logprobs", "top_k", "min_p"}  # fmt: skip
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs", "tools", "tool_choice",
                 "parallel_tool_calls"}
MAX_TOOLS = 128
COMPLETION = COMMON | {"prompt", "echo"}


class ApiError(Exception):
    """A request refused, as the API's error object; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Request:
    chat: bool  # /v1/chat/completions, else /v1/completions
    prompt: dict[str, Any]  # the manifest's prompt section: {chat: [...]} or {text: ...}
    max_tokens: int | None  # None: the manifest's generate.max_new_tokens
    sampling: dict[str, Any] | None  # the manifest's generate.sampling; None: greedy
    stop: list[str] | None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tool_calls: bool = False  # read Kimi's tool calls out of the text (tools given, tool_choice not "none")


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def read_request(body: dict[str, Any], chat: bool, default_seed: int) -> Request:
    """``body`` of /v1/chat/completions (``chat``) or /v1/completions as a :class:`Request`.
    ``default_seed`` seeds a sampled request that gives no ``seed`` (recorded in its bundle)."""
    allowed = CHAT if chat else COMPLETION
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"unsupported parameter: {name!r} (kimi-jax serve implements: "
                                f"{', '.join(sorted(allowed))})", name)  # fmt: skip
    _no_op(body, "n", 1)
    _no_op(body, "frequency_penalty", 0)
    _no_op(body, "presence_penalty", 0)
    _no_op(body, "echo", False)
    prompt = _messages(body) if chat else _completion_prompt(body)
    length = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, length, 1, MAX_TOKENS_LIMIT)
    if chat:
        logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, TOP_K)
        if top and not logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    else:  # the legacy API: logprobs is how many alternatives to list
        top = _integer(body, "logprobs", 0, TOP_K)
        logprobs = top is not None
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, "stream_options must be {\"include_usage\": bool}, with stream: true", "stream_options")
    include_usage = bool(options and _boolean(options, "include_usage"))
    if chat and body.get("chat_template_kwargs") is not None:
        prompt["chat_template_kwargs"] = body["chat_template_kwargs"]  # the manifest's schema checks its values
    tools = _tools(body) if chat else None
    if tools:
        prompt["tools"] = tools
        if body.get("stop") is not None:  # the calls' text keeps markers that stop strings' text leaves out
            raise ApiError(400, "stop strings cannot be combined with tools", "stop")
    return Request(chat, prompt, max_tokens, _sampling(body, default_seed), _stop(body), stream, include_usage,
                   logprobs, top or 0, bool(tools) and body.get("tool_choice") != "none")  # fmt: skip


def _tools(body: dict) -> list | None:
    """OpenAI's function tools, passed to the chat template as given; the model is not forced to call one."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: only \"auto\" and \"none\" (the model cannot be forced to call a tool)",
                       "tool_choice")  # fmt: skip
    if tools is None:
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and t["function"]["name"] for t in tools):  # fmt: skip
        raise ApiError(400, f"tools must be a list of at most {MAX_TOOLS} {{type: function, function: {{name, ...}}}}",
                       "tools")  # fmt: skip
    return tools or None


def _no_op(body: dict, name: str, value: Any) -> None:
    if name in body and body[name] is not None and body[name] != value:
        raise ApiError(400, f"unsupported value of {name}: {_short(body[name])} (only {json.dumps(value)})", name)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, got {_short(value)}", name)
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:  # fmt: skip
        raise ApiError(400, f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got "
                            f"{_short(value)}", name)  # fmt: skip
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_short(value)}", name)
    return bool(value)


def _sampling(body: dict, default_seed: int) -> dict[str, Any] | None:
    """OpenAI's defaults (temperature 1, top_p 1) as the manifest's sampling; temperature 0 is greedy."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0, 1 << 20)
    min_p = _number(body, "min_p", 0.0, 1.0)
    seed = _integer(body, "seed", 0, 2**63 - 1)
    if temperature == 0.0:
        return None
    return {"temperature": 1.0 if temperature is None else temperature, "top_p": 1.0 if top_p is None else top_p,
            "top_k": top_k or 0, "min_p": min_p or 0.0, "seed": default_seed if seed is None else seed}  # fmt: skip


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):  # fmt: skip
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at "
                            f"most {MAX_STOP_CHARS} characters", "stop")  # fmt: skip
    return list(dict.fromkeys(stop)) or None  # the manifest wants each once


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):  # fmt: skip
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _messages(body: dict) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise ApiError(400, f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    chat, total = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise ApiError(400, f"{where} must be an object with a role", where)
        extra = set(message) - {"role", "content", "name", "tool_calls", "tool_call_id"}
        if extra:
            raise ApiError(400, f"{where}: unsupported field {sorted(extra)[0]!r}", f"{where}.{sorted(extra)[0]}")
        calls = message.get("tool_calls")
        # an assistant turn that only calls tools has no content
        content = "" if calls and message.get("content") is None else _text_content(message.get("content"), where)
        total += len(content) + len(json.dumps(calls or []))
        given = {k: message[k] for k in ("name", "tool_calls", "tool_call_id") if message.get(k) is not None}
        chat.append({"role": message["role"], "content": content, **given})  # the manifest's schema checks the rest
    if total > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the messages hold {total:,} characters, more than {MAX_PROMPT_CHARS:,}", "messages")
    return {"chat": chat}


def _completion_prompt(body: dict) -> dict[str, Any]:
    """One prompt: a string, or token ids (as the API allows; the way to a checkpoint without a tokenizer)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):  # fmt: skip
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"prompt holds {len(prompt):,} tokens, more than {MAX_PROMPT_CHARS:,}", "prompt")
        return {"tokens": prompt}  # ids outside the vocabulary are refused when the request is planned
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be one non-empty string or one list of token ids", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt holds {len(prompt):,} characters, more than {MAX_PROMPT_CHARS:,}", "prompt")
    return {"text": prompt}
